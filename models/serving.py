"""The served model: the trained tables and layers in plain ``torch.nn`` modules, so that scoring needs torch, numpy
and pyarrow only (no TorchRec, no FBGEMM).

The tables become ``nn.EmbeddingBag`` (pooled tables: single-valued ids) and ``nn.Embedding`` (tables read by
behaviour sequences) under the same parameter names as TorchRec's collections (``sparse.ebc.embedding_bags.<table>``,
``sparse.ec.embeddings.<table>``); the dense part is :class:`~models.net.MultiTaskNet` itself. So the safetensors
file the train stage writes loads into this model as it is (``load_serving_model``), and a TorchRec model exports
by its state dict (``export_serving_model``). ``tests/test_serving.py`` checks both give the TorchRec model's scores.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import numpy as np
import torch
from torch import nn

from features.encode import ArrowData, ArrowEncoder
from features.spec import FeatureSpec, SequenceFeature, SparseFeature
from features.stats import DenseStats
from models.config import ModelConfig
from models.drgrad import DRGradConfig
from models.gradients import GradientConfig, head_config
from models.net import MultiTaskNet, predictions
from models.sparse_output import SparseOutput

if TYPE_CHECKING:
    from models.multitask import MultiTaskModel

WEIGHTS_FILE = "weights.safetensors"
MODEL_FILE = "model.json"

__all__ = [
    "MODEL_FILE",
    "WEIGHTS_FILE",
    "ModelFolder",
    "ServedModel",
    "ServingModel",
    "ServingSparseArch",
    "export_serving_model",
    "load_serving_model",
    "read_model_folder",
]


class ServingSparseArch(nn.Module):
    """Embedding lookups of every id feature with ``torch.nn`` tables; input as the encoder gives it: bucket indices
    and per-row lengths, key-major in ``spec.sparse_keys`` order (the layout of TorchRec's ``KeyedJaggedTensor``)."""

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        self.keys = list(spec.sparse_keys)
        self.max_lengths = {f.name: f.max_length for f in spec.sequences}
        id_features: list[SparseFeature | SequenceFeature] = [*spec.sparse, *spec.sequences]
        self.table_of = {f.name: f.table for f in id_features}
        sequence_tables = {t.name for t in spec.sequence_tables}
        self.pooled = {f.name for f in spec.sparse if f.table not in sequence_tables}
        # ModuleDicts named like TorchRec's collections, so the parameter names are the same.
        self.ebc = nn.ModuleDict(
            {
                "embedding_bags": nn.ModuleDict(
                    {
                        t.name: nn.EmbeddingBag(
                            t.num_buckets, t.dim, mode="mean" if t.name in spec.mean_pooled_tables else "sum"
                        )
                        for t in spec.pooled_tables
                    }
                )
            }
        )
        self.ec = nn.ModuleDict(
            {"embeddings": nn.ModuleDict({t.name: nn.Embedding(t.num_buckets, t.dim) for t in spec.sequence_tables})}
        )

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> SparseOutput:
        bags = cast(nn.ModuleDict, self.ebc["embedding_bags"])
        tables = cast(nn.ModuleDict, self.ec["embeddings"])
        per_key = lengths.view(len(self.keys), batch_size)
        chunks = torch.split(values, per_key.sum(dim=1).tolist())
        fields: dict[str, torch.Tensor] = {}
        sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, ids, key_lengths in zip(self.keys, chunks, per_key, strict=True):
            table = self.table_of[key]
            if key in self.pooled:
                offsets = torch.cumsum(key_lengths, 0) - key_lengths
                fields[key] = bags[table](ids, offsets.to(torch.int64))
            elif key not in self.max_lengths:
                fields[key] = tables[table](ids)  # exactly one id per row
            else:
                max_len = self.max_lengths[key]
                rows = tables[table](ids)
                mask = torch.arange(max_len).unsqueeze(0) < key_lengths.unsqueeze(1)
                padded = rows.new_zeros(batch_size, max_len, rows.shape[-1])
                padded[mask] = rows  # ids are row-major, newest first: the order of the mask's True positions
                sequences[key] = (padded, mask)
        return SparseOutput(fields=fields, sequences=sequences)


class ServingModel(MultiTaskNet):
    """The trained model in plain ``torch.nn``: ``forward(values, lengths, dense)`` -> one logit (or regression
    value) [B] per task, as the TorchRec model's ``forward(batch)``."""

    sparse: ServingSparseArch

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, drgrad: DRGradConfig | None = None) -> None:
        super().__init__(spec, cfg, ServingSparseArch(spec), None, drgrad)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_features(self.sparse(values, lengths, int(dense.shape[0])), dense)


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder's ``model.json`` says: enough to rebuild the model and its input transform."""

    spec: FeatureSpec
    model_config: ModelConfig
    stats: DenseStats
    drgrad: DRGradConfig | None


def read_model_folder(model_dir: str | Path) -> ModelFolder:
    description = json.loads((Path(model_dir) / MODEL_FILE).read_text())
    # Older folders have no "gradients": they were trained with ordinary towers.
    gradients = GradientConfig.model_validate(description.get("gradients") or {})
    return ModelFolder(
        spec=FeatureSpec.model_validate(description["spec"]),
        model_config=ModelConfig.model_validate(description["model"]),
        stats=DenseStats(**description["stats"]),
        drgrad=head_config(gradients),
    )


@dataclass
class ServedModel:
    """A serving model with its input transform: ``score(rows)`` -> one float64 array per prediction."""

    model: ServingModel
    folder: ModelFolder

    def __post_init__(self) -> None:
        self.encoder = ArrowEncoder(self.folder.spec, self.folder.stats)

    def score(self, data: ArrowData) -> dict[str, np.ndarray]:
        values, lengths = self.encoder.sparse_arrays(data)
        dense = torch.from_numpy(self.encoder.dense_numpy(data))
        with torch.no_grad():
            outputs = self.model(torch.from_numpy(values), torch.from_numpy(lengths), dense)
        return {k: v.numpy().astype(np.float64) for k, v in predictions(self.folder.spec, outputs).items()}


SAFETENSORS_DTYPES = {  # safetensors' dtype names (its format documentation)
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as copy-on-write memory maps of it: nothing is read until used, the pages
    are the file's (shared by every process that maps it, dropped by the kernel under pressure), and a write stays
    private to the process. The header is plain JSON (no code runs)."""
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(size))
    start = 8 + size
    out: dict[str, torch.Tensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[meta["dtype"]]
        begin, end = meta["data_offsets"]
        if end == begin:
            out[name] = torch.empty(meta["shape"], dtype=dtype)
            continue
        raw = np.memmap(path, dtype=np.uint8, mode="c", offset=start + begin, shape=(end - begin,))
        out[name] = torch.from_numpy(raw).view(dtype).reshape(meta["shape"])
    return out


def _has_meta_tensors(model: nn.Module) -> bool:
    """Whether a tensor of the model is still on the meta device after loading (one the state dict does not carry)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return any(t.is_meta for t in tensors)


_Model = TypeVar("_Model", bound=nn.Module)


def with_mapped_weights(build: Callable[[torch.device], _Model], path: Path) -> _Model:
    """``build(device)``'s model holding the weights of the safetensors file at ``path`` as memory maps
    (:func:`map_weights`): built on the meta device and assigned the maps, so its tables allocate nothing. Built on the
    CPU instead (then assigned) when a module keeps a tensor outside its state dict."""
    state = map_weights(path)
    model = build(torch.device("meta"))
    model.load_state_dict(state, strict=True, assign=True)
    if _has_meta_tensors(model):
        model = build(torch.device("cpu"))
        model.load_state_dict(state, strict=True, assign=True)
    return model


def load_serving_model(model_dir: str | Path) -> ServedModel:
    """The serving model of a trained model folder (safetensors weights: loading runs no code from the folder). Built
    on the meta device, its parameters memory maps of the weights file (:func:`map_weights`): every serving process
    of one machine shares the tables' pages, and loading allocates nothing for them."""
    folder = read_model_folder(model_dir)

    def build(device: torch.device) -> ServingModel:
        with device:
            return ServingModel(folder.spec, folder.model_config, folder.drgrad)

    model = with_mapped_weights(build, Path(model_dir) / WEIGHTS_FILE)
    model.eval()
    return ServedModel(model=model, folder=folder)


def export_serving_model(model: MultiTaskModel) -> ServingModel:
    """The TorchRec model's tables and layers copied into a :class:`ServingModel` (an unsharded model on CPU)."""
    served = ServingModel(model.spec, model.cfg, model.drgrad)
    served.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, strict=True)
    return served.eval()
