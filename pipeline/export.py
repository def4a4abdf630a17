"""The trained weights as one unsharded safetensors file, written from a DCP checkpoint tensor by tensor.

The workers never gather the model: every rank writes its own shards into the checkpoint (:mod:`pipeline.worker_state`)
and the driver writes ``weights.safetensors`` from it here. The safetensors header comes first (every tensor's dtype
and shape are in the DCP metadata, so all byte ranges are known up front); then DCP loads each tensor straight into a
memory map of its byte range in the output file. Each saved chunk (one rank's shard of one tensor) is a ``torch.save``
archive inside a ``.distcp`` file, whose tensor bytes are stored uncompressed: they are located through the archive's
zip directory and copied from a memory map of the checkpoint file to a memory map of the output, ``COPY_ROWS`` rows
at a time, so the process allocates next to nothing whatever the shard's size (the pages moved are the files' page
cache, which the kernel writes back and drops at will). A chunk stored otherwise (a storage transform, a compressed or
unexpected archive) goes through DCP's own reader, which holds that chunk in memory about three times over.

The tensor names are the unsharded model's (:func:`models.sharding.unwrapped_name`), as evaluation, serving and the
model hash read them.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import numpy as np
import torch

from models.serving import SAFETENSORS_DTYPES
from models.sharding import unwrapped_name

COPY_ROWS = 1 << 16  # rows per copy from the checkpoint's map to the output's: bounds the pages touched at once
BEST_PREFIX = "best"  # the validation window's best epoch (present once an epoch improved)
MODEL_PREFIX = "model"  # the last step's model

_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors name


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
    metadata = reader.read_metadata()
    written: dict[str, int] = {}
    for name in order:
        t = tensors[name]
        written[name] = t.nbytes
        if t.nbytes == 0:
            continue
        region = np.memmap(partial, dtype=np.uint8, mode="r+", offset=data_start + begins[name], shape=(t.nbytes,))
        target = torch.from_numpy(region).view(t.dtype).view(t.shape)
        if not _copy_raw_chunks(dcp_dir, metadata, t, target):
            with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the intent here
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load({t.key: target}, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
        region.flush()
        del target, region
    os.replace(partial, out_file)
    return written


def _raw_tensor_bytes(path: Path, offset: int, length: int) -> tuple[int, int] | None:
    """Where the tensor bytes of the ``torch.save`` archive at ``offset`` (``length`` bytes) of ``path`` lie: (absolute
    offset, size); None unless the archive holds exactly one uncompressed, little-endian storage."""
    with open(path, "rb") as fh:
        with zipfile.ZipFile(cast(IO[bytes], _FileSlice(fh, offset, length))) as zf:
            infos = zf.infolist()
            storages = [i for i in infos if "/data/" in i.filename and not i.filename.endswith("/")]
            order = [i for i in infos if i.filename.endswith("/byteorder")]
            if len(storages) != 1 or storages[0].compress_type != zipfile.ZIP_STORED:
                return None
            if order and zf.read(order[0]).strip() != b"little":
                return None
            info = storages[0]
        fh.seek(offset + info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return offset + info.header_offset + 30 + name_len + extra_len, info.file_size


class _FileSlice:
    """A read-only, seekable view of ``length`` bytes at ``offset`` of an open file (for ``zipfile``)."""

    def __init__(self, fh: object, offset: int, length: int) -> None:
        self.fh, self.offset, self.length, self.pos = fh, offset, length, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.fh.seek(self.offset + self.pos)  # type: ignore[attr-defined]
        data: bytes = self.fh.read(n)  # type: ignore[attr-defined]
        self.pos += len(data)
        return data


def _copy_raw_chunks(dcp_dir: Path, metadata: object, t: StoredTensor, target: torch.Tensor) -> bool:
    """Copy every saved chunk of ``t`` into ``target`` (a view of the output file) through memory maps, rows at a
    time. False, having written nothing, when a chunk is not stored as plain bytes (then DCP's reader does it)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    item = metadata.state_dict_metadata[t.key]  # type: ignore[attr-defined]
    if not isinstance(item, TensorStorageMetadata) or len(t.shape) not in (1, 2):
        return False
    plans = []
    for chunk in item.chunks:
        info = metadata.storage_data[MetadataIndex(t.key, torch.Size(chunk.offsets))]  # type: ignore[attr-defined]
        if getattr(info, "transform_descriptors", None):
            return False
        path = dcp_dir / info.relative_path
        located = _raw_tensor_bytes(path, info.offset, info.length)
        numel = int(np.prod(chunk.sizes, dtype=np.int64))
        if located is None or located[1] != numel * t.dtype.itemsize:
            return False
        plans.append((path, located[0], tuple(chunk.offsets), tuple(chunk.sizes)))
    out = target.numpy() if t.dtype != torch.bfloat16 else target.view(torch.int16).numpy()
    for path, start, offsets, sizes in plans:
        if not sizes or 0 in sizes:
            continue
        src = np.memmap(path, dtype=out.dtype, mode="r", offset=start, shape=sizes)
        r0 = offsets[0]
        for i in range(0, sizes[0], COPY_ROWS):
            rows = slice(i, min(i + COPY_ROWS, sizes[0]))
            if len(sizes) == 1:
                out[r0 + rows.start : r0 + rows.stop] = src[rows]
            else:
                c0 = offsets[1]
                out[r0 + rows.start : r0 + rows.stop, c0 : c0 + sizes[1]] = src[rows]
        del src
    return True
