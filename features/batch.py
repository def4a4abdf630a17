"""The model's input: what one Arrow batch becomes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One training/eval batch.

    sparse: every id feature of the spec in ``FeatureSpec.sparse_keys`` order; single-valued ids have length 1,
        sequences have length <= max_length (newest first). Values are bucket indices (already hashed).
    dense: [B, n_dense] float32, transformed and standardised.
    labels: task name -> [B] float32, the raw label after the task's label_transform (binary: 0/1).
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            labels={k: v.to(device=device, non_blocking=non_blocking) for k, v in self.labels.items()},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)  # type: ignore[arg-type]
        self.dense.record_stream(stream)  # type: ignore[arg-type]
        for v in self.labels.values():
            v.record_stream(stream)  # type: ignore[arg-type]

    def pin_memory(self) -> Batch:
        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=self.dense.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
        )
