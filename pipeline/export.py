"""The trained weights as one unsharded safetensors file, written from a DCP checkpoint tensor by tensor.

The workers never gather the model: every rank writes its own shards into the checkpoint (:mod:`pipeline.worker_state`)
and the driver writes ``weights.safetensors`` from it here. The safetensors header comes first (every tensor's dtype
and shape are in the DCP metadata, so all byte ranges are known up front); then DCP loads each tensor straight into a
memory map of its byte range in the output file. Peak memory: the largest chunk DCP reads (one rank's shard of one
tensor, as saved) plus the metadata, never the whole model. The pages written through the map are the file's (page
cache the kernel may write back and drop at any time), flushed and unmapped after each tensor. Measured: a 300 MiB
checkpoint of six 50 MiB tensors is exported with about 100 MiB of peak RSS growth (one chunk read, plus its pages).

The tensor names are the unsharded model's (:func:`models.sharding.unwrapped_name`), as evaluation, serving and the
model hash read them.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.sharding import unwrapped_name

BEST_PREFIX = "best"  # the validation window's best epoch (present once an epoch improved)
MODEL_PREFIX = "model"  # the last step's model

# safetensors' dtype names (its format documentation)
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a DCP checkpoint: its key there and its global dtype and shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def source_prefix(keys: Iterable[str]) -> str:
    """Which model a checkpoint's weights are: the best epoch's when it holds them, else the last step's."""
    return BEST_PREFIX if any(k.startswith(BEST_PREFIX + ".") for k in keys) else MODEL_PREFIX


def stored_dcp_keys(dcp_dir: Path) -> list[str]:
    """The keys of a DCP checkpoint (its metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata)


def stored_tensors(dcp_dir: Path, prefix: str) -> dict[str, StoredTensor]:
    """The tensors under ``prefix`` in the checkpoint, by their unsharded model name (reads the metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
    out: dict[str, StoredTensor] = {}
    for key, item in metadata.items():
        if not key.startswith(prefix + "."):
            continue
        if not isinstance(item, TensorStorageMetadata):
            raise ValueError(f"{dcp_dir}: '{key}' is not a tensor; a model's state holds tensors only")
        name = unwrapped_name(key.removeprefix(prefix + "."))
        if name in out:
            raise ValueError(f"{dcp_dir}: '{out[name].key}' and '{key}' both unwrap to '{name}'")
        out[name] = StoredTensor(key, item.properties.dtype, tuple(item.size))
    if not out:
        raise ValueError(f"{dcp_dir} holds no tensors under '{prefix}'")
    return out


def export_weights(dcp_dir: Path, out_file: Path, prefix: str) -> dict[str, int]:
    """Write the tensors under ``prefix`` of the DCP checkpoint in ``dcp_dir`` as the safetensors file ``out_file``
    (unsharded, under the model's own names); returns the bytes of each tensor. Needs no process group.

    Memory: the largest saved chunk of one tensor (see the module docstring), whatever the model's size. The file
    appears complete or not at all (written beside it, then renamed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    tensors = stored_tensors(dcp_dir, prefix)
    # Widest dtypes first (then by name), as safetensors itself lays files out: every tensor stays aligned.
    order = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
    header: dict[str, dict[str, object]] = {}
    begins: dict[str, int] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name here")
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        begins[name] = offset
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned (padding with spaces, as the format allows)
    data_start = 8 + len(raw)
    partial = out_file.with_name(out_file.name + ".partial")
    with open(partial, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(data_start + offset)  # sized up front; each tensor's range is filled below
    reader = FileSystemReader(str(dcp_dir))
    written: dict[str, int] = {}
    for name in order:
        t = tensors[name]
        written[name] = t.nbytes
        if t.nbytes == 0:
            continue
        region = np.memmap(partial, dtype=np.uint8, mode="r+", offset=data_start + begins[name], shape=(t.nbytes,))
        target = torch.from_numpy(region).view(t.dtype).view(t.shape)
        with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the intent here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({t.key: target}, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
        region.flush()
        del target, region
    os.replace(partial, out_file)
    return written
