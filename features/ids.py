"""Ids as the model sees them: stable 64-bit hashes, bucketing, and the flat values/lengths of list (sequence)
columns. numpy and pyarrow only. The conventions (hash functions, newest-first sequences, null lists) are described in
:mod:`features.encode`; changing a hash silently invalidates every trained model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.spec import IdType

ArrowData: TypeAlias = pa.Table | pa.RecordBatch

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


def list_values(
    col: pa.Array | pa.ChunkedArray, max_length: int, column: str
) -> tuple[pa.Array | pa.ChunkedArray | np.ndarray, np.ndarray]:
    """The kept (unhashed) values of a list column over all its chunks, each list cut to its first ``max_length``,
    and the per-row lengths (``LENGTH_DTYPE``)."""
    parts = [_sequence_chunk(c, max_length, column) for c in _chunks(col)]
    lengths = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, dtype=LENGTH_DTYPE)
    raw = [p[0] for p in parts]
    if not raw:
        return np.empty(0, dtype=np.int64), lengths
    if all(isinstance(r, np.ndarray) for r in raw):
        return np.concatenate(raw), lengths  # type: ignore[arg-type]
    return pa.chunked_array([pa.array(r) if isinstance(r, np.ndarray) else r for r in raw]), lengths
