"""Arrow batch -> model ``Batch``: the arrays of ``features/encode.py`` (hashing, sequences, dense standardisation,
labels; its docstring has the conventions) wrapped into a TorchRec ``KeyedJaggedTensor`` and torch tensors for
training and evaluation. The served model reads the same arrays without TorchRec (``models/serving.py``)."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.batch import Batch
from features.encode import (
    STD_FLOOR,
    ArrowData,
    ArrowEncoder,
    compute_dense_moments,
    dense_stats_from_moments,
    hash_ids,
)

__all__ = [
    "STD_FLOOR",
    "BatchTransform",
    "compute_dense_moments",
    "dense_stats_from_moments",
    "hash_ids",
]


class BatchTransform(ArrowEncoder):
    """Turns an Arrow table/record batch (validated rows) into a ``Batch`` for the model.

    Cheap to construct and stateless per call, so it can be built in every data-loader worker.
    """

    def sparse(self, data: ArrowData) -> KeyedJaggedTensor:
        """Every id feature as one KJT in ``spec.sparse_keys`` order (key-major, as TorchRec expects)."""
        values, lengths = self.sparse_arrays(data)
        return KeyedJaggedTensor(
            keys=list(self.spec.sparse_keys),
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths),
            stride=data.num_rows,  # explicit: inference from lengths fails for a spec without id features
        )

    def __call__(self, data: ArrowData, with_labels: bool = True) -> Batch:
        """One ``Batch``. ``with_labels=False`` is the serving path: label columns may be absent, labels are ``{}``."""
        labels = {k: torch.from_numpy(v) for k, v in self.labels_numpy(data).items()} if with_labels else {}
        return Batch(sparse=self.sparse(data), dense=torch.from_numpy(self.dense_numpy(data)), labels=labels)
