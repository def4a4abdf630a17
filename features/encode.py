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

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.spec import FeatureSpec, IdType, TaskKind
from features.stats import DenseStats

__all__ = [
    "STD_FLOOR",
    "ArrowEncoder",
    "compute_dense_moments",
    "dense_stats_from_moments",
    "hash_ids",
]

ArrowData: TypeAlias = pa.Table | pa.RecordBatch
Moments: TypeAlias = dict[str, tuple[int, float, float]]

#: Smallest std used for standardisation: a constant feature maps to 0 instead of dividing by zero.
STD_FLOOR = 1e-6

# splitmix64 (Steele et al.; the output function of Java's SplittableRandom). The finaliser alone maps 0 to 0, so the
# golden-ratio increment comes first; the two multiply-xorshift rounds give full avalanche, so consecutive ids (which
# real id spaces are full of) spread uniformly over the buckets.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

# Lengths as int32: half the bytes of int64 to copy to the device, and TorchRec's kernels (offsets cumsum,
# EmbeddingCollection / EmbeddingBagCollection, FBGEMM TBE which casts indices and offsets to one type) accept it.
LENGTH_DTYPE = np.int32


# ---- hashing -------------------------------------------------------------------------------------------------------
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 over a uint64 array; numpy array arithmetic wraps on overflow without warnings."""
    z = x + _GAMMA  # a fresh array: the in-place steps below never touch the caller's (possibly zero-copy) buffer
    z ^= z >> _S30
    z *= _MUL1
    z ^= z >> _S27
    z *= _MUL2
    z ^= z >> _S31
    return z


def _int_ids_to_uint64(values: np.ndarray) -> np.ndarray:
    """Reinterpret integer ids as uint64 so that an id hashes the same whatever its integer width.

    Signed ids are widened to int64 first (sign-extended), then viewed as uint64 (two's complement): -1 as int32 and
    -1 as int64 land in the same bucket, and so do 7 as int32 and 7 as uint64.
    """
    if values.dtype.kind == "i":
        return values.astype(np.int64, copy=False).view(np.uint64)
    if values.dtype.kind == "u":
        return values.astype(np.uint64, copy=False)
    raise TypeError(f"integer ids expected, got numpy dtype {values.dtype}")


def _hash_strings(values: Sequence[str | bytes]) -> np.ndarray:
    """blake2b-64 of each (unique) string as uint64; stable everywhere, unlike ``hash()``."""
    digests = b"".join(
        hashlib.blake2b(v.encode("utf-8") if isinstance(v, str) else v, digest_size=8).digest() for v in values
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _hash_dictionary(dictionary: pa.Array, indices: pa.Array | pa.ChunkedArray, id_type: IdType) -> np.ndarray:
    """uint64 hash of every element, hashing each distinct value once and gathering by the dictionary indices."""
    if id_type == IdType.string:
        if not (
            pa.types.is_string(dictionary.type)
            or pa.types.is_large_string(dictionary.type)
            or pa.types.is_binary(dictionary.type)
            or pa.types.is_large_binary(dictionary.type)
        ):
            raise TypeError(f"string ids expected, got Arrow type {dictionary.type}")
        hashed = _hash_strings(dictionary.to_pylist())
    else:
        if not pa.types.is_integer(dictionary.type):
            raise TypeError(f"integer ids expected, got Arrow type {dictionary.type}")
        hashed = _mix64(_int_ids_to_uint64(dictionary.to_numpy(zero_copy_only=False)))
    return hashed[indices.to_numpy(zero_copy_only=False).astype(np.intp, copy=False)]


def _hash_arrow(values: pa.Array | pa.ChunkedArray, id_type: IdType) -> np.ndarray:
    if values.null_count:
        raise ValueError(f"{values.null_count} null id(s); ids must be non-null (validation quarantines them)")
    if pa.types.is_dictionary(values.type) or id_type == IdType.string:
        # Dictionary-encode so that each distinct string is hashed in Python exactly once per batch; the per-row work
        # is a numpy gather. Chunks can carry different dictionaries, so unify them to gather with one table.
        encoded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.unify_dictionaries()
            if encoded.num_chunks == 0:
                return np.empty(0, dtype=np.uint64)
            dictionary = encoded.chunk(0).dictionary
            indices: pa.Array | pa.ChunkedArray = pa.chunked_array(
                [c.indices for c in encoded.chunks], type=encoded.type.index_type
            )
        else:
            dictionary, indices = encoded.dictionary, encoded.indices
        return _hash_dictionary(dictionary, indices, id_type)
    if not pa.types.is_integer(values.type):
        raise TypeError(f"integer ids expected for id_type 'int', got Arrow type {values.type}")
    return _mix64(_int_ids_to_uint64(values.to_numpy(zero_copy_only=False)))


def _hash_uint64(values: pa.Array | pa.ChunkedArray | np.ndarray, id_type: IdType) -> np.ndarray:
    if isinstance(values, np.ndarray):
        if id_type == IdType.int:
            return _mix64(_int_ids_to_uint64(values))
        values = pa.array(values)  # numpy str/object array: let Arrow dictionary-encode it
    return _hash_arrow(values, id_type)


def hash_ids(values: pa.Array | pa.ChunkedArray | np.ndarray, num_buckets: int, id_type: IdType) -> np.ndarray:
    """Hash ids into int64 bucket indices in ``[0, num_buckets)``.

    Stable across processes, machines and Python versions, and independent of the feature: the same id gives the same
    bucket for every feature of a table. Integer ids hash by value whatever their width (int32 7 == int64 7).

    Raises ``ValueError`` on null ids and ``TypeError`` when the values do not match ``id_type``.
    """
    if num_buckets <= 0:
        raise ValueError(f"num_buckets must be positive, got {num_buckets}")
    # The bucket is < num_buckets <= 2**63 - 1, so the uint64 -> int64 cast is exact.
    return (_hash_uint64(values, id_type) % np.uint64(num_buckets)).astype(np.int64)


# ---- column access -------------------------------------------------------------------------------------------------
def _column(data: ArrowData, name: str, what: str) -> pa.Array | pa.ChunkedArray:
    """A column by name, with an error that says which feature/label needed it."""
    try:
        return data.column(name)
    except KeyError:
        raise ValueError(
            f"column '{name}' ({what}) is missing from the batch; available columns: {data.schema.names}"
        ) from None


def _chunks(col: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(col.chunks) if isinstance(col, pa.ChunkedArray) else [col]


def _sequence_chunk(arr: pa.Array, max_length: int, column: str) -> tuple[pa.Array | np.ndarray, np.ndarray]:
    """Kept values (unhashed) and per-row lengths of one list chunk, keeping each list's first ``max_length``.

    Works on the list offsets directly rather than ``flatten()``: offsets of a sliced array already point into the
    unsliced child, nulls (which may be backed by non-empty sub-lists) are zeroed here, and the gather index touches
    only kept elements, so truncated tails are never copied or hashed.
    """
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise TypeError(f"sequence column '{column}' must be a list, got Arrow type {arr.type}")
    offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths[arr.is_null().to_numpy(zero_copy_only=False)] = 0  # a missing sequence is an empty sequence
    kept = np.minimum(lengths, max_length)
    total = int(kept.sum())
    child = arr.values
    if len(offsets) > 1 and total == offsets[-1] - offsets[0]:
        # Nothing truncated and no null backed by data: the kept values are one contiguous, zero-copy slice.
        taken = child.slice(int(offsets[0]), total)
    else:
        # Element k of the output, in row r, is child[starts[r] + (k - out_start[r])]: one repeat builds the index.
        out_start = np.cumsum(kept) - kept
        index = np.arange(total, dtype=np.int64) - np.repeat(out_start - starts, kept)
        if pa.types.is_integer(child.type) and child.null_count == 0:
            return child.to_numpy(zero_copy_only=False)[index], kept.astype(LENGTH_DTYPE)
        taken = child.take(pa.array(index))
    if taken.null_count:
        raise ValueError(f"sequence column '{column}' has {taken.null_count} null id(s) inside its lists")
    return taken, kept.astype(LENGTH_DTYPE)


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
            _IdKey(f.name, f.column, spec.table(f.table).num_buckets, f.id_type, None) for f in spec.sparse
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
            parts = [_sequence_chunk(c, key.max_length, key.column) for c in _chunks(col)]
            raw = [p[0] for p in parts]
            if not raw:
                ids: pa.Array | pa.ChunkedArray | np.ndarray = np.empty(0, dtype=np.int64)
            elif all(isinstance(r, np.ndarray) for r in raw):
                ids = np.concatenate(raw)  # type: ignore[arg-type]
            else:
                ids = pa.chunked_array([pa.array(r) if isinstance(r, np.ndarray) else r for r in raw])
            try:
                values.append(hash_ids(ids, key.num_buckets, key.id_type))
            except TypeError as err:
                raise TypeError(f"column '{key.column}' (sequence '{key.name}'): {err}") from None
            lengths.append(np.concatenate([p[1] for p in parts]) if parts else np.empty(0, dtype=LENGTH_DTYPE))
        return (
            np.concatenate(values) if values else np.empty(0, dtype=np.int64),
            np.concatenate(lengths) if lengths else np.empty(0, dtype=LENGTH_DTYPE),
        )

    # ---- dense -----------------------------------------------------------------------------------------------------
    def dense_numpy(self, data: ArrowData) -> np.ndarray:
        """[B, n_dense] float32 in ``spec.dense`` order: fill_null -> transform -> standardise.

        Computed in float64 (cheap at these widths) and rounded once at the end.
        """
        out = np.empty((data.num_rows, len(self.spec.dense)), dtype=np.float32)
        for j, f in enumerate(self.spec.dense):
            x = _transformed_dense(data, f.name, f.column, f.fill_null, f.transform)
            out[:, j] = (x - self._mean[j]) / self._std[j]
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
