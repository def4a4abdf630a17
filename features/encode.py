"""Arrow batch -> numpy arrays for the model: hashed ids (values and lengths, key-major), standardised dense features,
labels. numpy and pyarrow only (no torch, no TorchRec), so the served model's transform imports nothing else;
``features/transform.py`` wraps these arrays into the training ``Batch`` (a TorchRec ``KeyedJaggedTensor``).

Everything here is column-at-a-time numpy/pyarrow work; nothing loops over rows in Python, so the transform keeps up
with Parquet decoding (see ``benchmarks/transform.py``).

Conventions (shared with every other module that reads ids, so do not change them lightly):

* **Hashing.** Ids are hashed into ``[0, num_buckets)`` with a hash that is stable across processes, machines and
  Python versions (never Python's salted ``hash()``): integer ids go through the splitmix64 finaliser in wrapping
  uint64 arithmetic, string ids through ``blake2b(utf8, digest_size=8)``. The hash is NOT salted by feature name, so
  every feature that shares a table (the candidate ``item_id`` and the items of ``click_seq``) puts the same id in the
  same row. Changing either hash silently invalidates every trained model; ``tests/test_transform.py`` pins values.
* **Sequences** are newest first; the first ``max_length`` elements are kept. A null list (the whole sequence
  missing) is treated as an empty sequence, because "no recorded behaviour" is what it means in the logs.
* **Nulls** elsewhere are expected to have been quarantined by validation. A null id, a null dense value without
  ``fill_null``, or a non-finite dense value still reaching the transform raises ``ValueError`` naming the column
  instead of producing garbage. Labels: a null label is allowed only for a ``given:`` task on rows where the parent
  label is 0 (outside the task's sample space, e.g. no dwell time without a click); it becomes 0 and the loss masks
  it. Anywhere else it raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.ids import (
    LENGTH_DTYPE,
    ArrowData,
    _column,
    hash_ids,
    list_values,
)
from features.match import match_block
from features.spec import FeatureSpec, IdType, TaskKind
from features.stats import DenseStats

__all__ = [
    "STD_FLOOR",
    "ArrowEncoder",
    "compute_dense_moments",
    "dense_stats_from_moments",
    "hash_ids",
]

Moments: TypeAlias = dict[str, tuple[int, float, float]]

#: Smallest std used for standardisation: a constant feature maps to 0 instead of dividing by zero.
STD_FLOOR = 1e-6


def _non_null_float64(col: pa.Array | pa.ChunkedArray, fill: float | None, column: str, what: str) -> np.ndarray:
    if fill is not None and col.null_count:
        col = pc.fill_null(col, pa.scalar(fill, type=col.type))
    if col.null_count:
        raise ValueError(f"column '{column}' ({what}) has {col.null_count} null value(s)")
    if isinstance(col, pa.ChunkedArray) and col.num_chunks == 0:
        return np.empty(0, dtype=np.float64)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def _apply(transform: str, x: np.ndarray) -> np.ndarray:
    if transform == "log1p":
        return np.log1p(x)
    if transform == "none":
        return x
    raise ValueError(f"unknown transform '{transform}'")


@dataclass(frozen=True)
class _IdKey:
    """Precomputed per KJT key: where to read it and how to hash it."""

    name: str
    column: str
    num_buckets: int
    id_type: IdType
    max_length: int | None  # None: single-valued


class ArrowEncoder:
    """Turns an Arrow table/record batch (validated rows) into the model's input arrays.

    Cheap to construct and stateless per call, so it can be built in every data-loader worker.
    """

    def __init__(self, spec: FeatureSpec, stats: DenseStats) -> None:
        self.spec = spec
        self.stats = stats
        self._keys = [
            _IdKey(f.name, f.column, spec.table(f.table).num_buckets, f.id_type, f.max_values) for f in spec.sparse
        ] + [_IdKey(f.name, f.column, spec.table(f.table).num_buckets, f.id_type, f.max_length) for f in spec.sequences]
        assert [k.name for k in self._keys] == spec.sparse_keys
        # Fail at construction, not on the first batch, when the stats do not cover the spec (e.g. a stale file).
        self._mean = np.zeros(len(spec.dense))
        self._std = np.ones(len(spec.dense))
        for j, f in enumerate(spec.dense):
            if f.normalize != "standard":
                continue
            if f.name not in stats.mean or f.name not in stats.std:
                raise ValueError(f"dense stats have no mean/std for feature '{f.name}'; recompute them for this spec")
            self._mean[j] = stats.mean[f.name]
            self._std[j] = max(float(stats.std[f.name]), STD_FLOOR)

    def required_columns(self, with_labels: bool = True) -> list[str]:
        """Columns the transform reads, for column projection when reading Parquet."""
        cols = [k.column for k in self._keys] + [f.column for f in self.spec.dense]
        if with_labels:
            cols += self.spec.label_columns
        return list(dict.fromkeys(cols))

    # ---- sparse ----------------------------------------------------------------------------------------------------
    def sparse_arrays(self, data: ArrowData) -> tuple[np.ndarray, np.ndarray]:
        """Every id feature in ``spec.sparse_keys`` order, key-major (as TorchRec's KJT expects): bucket indices
        (int64) and per-row lengths (int32, ``len(sparse_keys) * num_rows``)."""
        n = data.num_rows
        values: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for key in self._keys:
            col = _column(data, key.column, f"id feature '{key.name}'")
            if key.max_length is None:
                if col.null_count:
                    raise ValueError(
                        f"column '{key.column}' (id feature '{key.name}') has {col.null_count} null id(s); "
                        "validation should have quarantined these rows"
                    )
                try:
                    values.append(hash_ids(col, key.num_buckets, key.id_type))
                except TypeError as err:
                    raise TypeError(f"column '{key.column}' (id feature '{key.name}'): {err}") from None
                lengths.append(np.ones(n, dtype=LENGTH_DTYPE))
                continue
            ids, key_lengths = list_values(col, key.max_length, key.column)
            try:
                values.append(hash_ids(ids, key.num_buckets, key.id_type))
            except TypeError as err:
                raise TypeError(f"column '{key.column}' (sequence '{key.name}'): {err}") from None
            lengths.append(key_lengths)
        return (
            np.concatenate(values) if values else np.empty(0, dtype=np.int64),
            np.concatenate(lengths) if lengths else np.empty(0, dtype=LENGTH_DTYPE),
        )

    # ---- dense -----------------------------------------------------------------------------------------------------
    def dense_numpy(self, data: ArrowData) -> np.ndarray:
        """[B, spec.dense_width] float32: the dense features in ``spec.dense`` order (fill_null -> transform ->
        standardise), then the match features (:mod:`features.match`).

        Computed in float64 (cheap at these widths) and rounded once at the end.
        """
        out = np.empty((data.num_rows, self.spec.dense_width), dtype=np.float32)
        for j, f in enumerate(self.spec.dense):
            x = _transformed_dense(data, f.name, f.column, f.fill_null, f.transform)
            out[:, j] = (x - self._mean[j]) / self._std[j]
        if self.spec.match:
            out[:, len(self.spec.dense) :] = match_block(data, self.spec)  # bounded already: not standardised
        return out

    # ---- labels ----------------------------------------------------------------------------------------------------
    def labels_numpy(self, data: ArrowData) -> dict[str, np.ndarray]:
        """Task name -> float32 [B]: the label column after the task's label_transform (binary labels stay 0/1)."""
        raw: dict[str, np.ndarray] = {}
        out: dict[str, np.ndarray] = {}
        # Parents first: a 'given' task needs its parent's labels to decide which nulls are allowed.
        for task in sorted(self.spec.tasks, key=lambda t: t.given is not None):
            col = _column(data, task.label, f"label of task '{task.name}'")
            what = f"label of task '{task.name}'"
            if col.null_count and task.given is not None:
                null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
                outside = raw[self.spec.task(task.given).label] == 0
                if np.any(null & ~outside):
                    bad = int(np.count_nonzero(null & ~outside))
                    raise ValueError(
                        f"column '{task.label}' ({what}) has {bad} null value(s) on rows where "
                        f"'{task.given}' is positive"
                    )
                # Outside the task's sample space; the loss masks these rows, 0 keeps the tensor finite.
                col = pc.fill_null(col, pa.scalar(0, type=col.type))
            y = _non_null_float64(col, None, task.label, what)
            raw[task.label] = y
            if task.kind == TaskKind.binary and not np.all((y == 0) | (y == 1)):
                raise ValueError(f"column '{task.label}' ({what}) is binary but has values other than 0/1")
            y = _apply(task.label_transform, y)
            if not np.all(np.isfinite(y)):
                raise ValueError(f"column '{task.label}' ({what}) has non-finite values after '{task.label_transform}'")
            out[task.name] = y.astype(np.float32)
        return {t.name: out[t.name] for t in self.spec.tasks}


def _transformed_dense(data: ArrowData, name: str, column: str, fill: float | None, transform: str) -> np.ndarray:
    """float64 value of one dense feature after fill_null and its transform; raises on nulls and non-finite values."""
    what = f"dense feature '{name}'"
    x = _apply(transform, _non_null_float64(_column(data, column, what), fill, column, what))
    if not np.all(np.isfinite(x)):
        # NaN/inf are not Arrow nulls, so fill_null does not catch them; they would poison the whole batch's loss.
        raise ValueError(f"column '{column}' ({what}) has non-finite values after transform '{transform}'")
    return x


# ---- statistics ----------------------------------------------------------------------------------------------------
def compute_dense_moments(data: ArrowData, spec: FeatureSpec) -> Moments:
    """Per dense feature: (count, sum, sum of squares) of the transformed value (before standardisation).

    Plain sums so that per-file/per-worker results merge by addition (``dense_stats_from_moments``); sums are in
    float64 with numpy's pairwise summation.
    """
    moments: Moments = {}
    for f in spec.dense:
        x = _transformed_dense(data, f.name, f.column, f.fill_null, f.transform)
        moments[f.name] = (int(x.size), float(x.sum()), float(np.dot(x, x)))
    return moments


def dense_stats_from_moments(moments: list[Moments], spec: FeatureSpec) -> DenseStats:
    """Merge per-batch moments and finalise into mean and (population) std, std floored at ``STD_FLOOR``."""
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    count = 0
    for f in spec.dense:
        n, s, ss = 0, 0.0, 0.0
        for m in moments:
            if f.name not in m:
                raise ValueError(f"moments for dense feature '{f.name}' are missing from one of the inputs")
            n += m[f.name][0]
            s += m[f.name][1]
            ss += m[f.name][2]
        if n == 0:
            raise ValueError(f"no rows to compute statistics of dense feature '{f.name}'")
        mu = s / n
        # E[x^2] - E[x]^2 can come out slightly negative from rounding when the spread is tiny: clamp before sqrt.
        var = max(ss / n - mu * mu, 0.0)
        mean[f.name] = mu
        std[f.name] = max(math.sqrt(var), STD_FLOOR)
        count = max(count, n)
    return DenseStats(mean=mean, std=std, count=count)
