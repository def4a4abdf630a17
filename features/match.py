"""Match features: the candidate against the user's own history, computed per batch with numpy (no per-row Python).

For each ``match`` entry of the spec and each row: ``count`` = log1p(number of elements of the behaviour sequence,
within its ``max_length``, equal to one of the candidate's ids) and ``recency`` = 1 / (1 + position of the newest such
element), 0 when there is none (sequences are newest first: position 0 is the latest behaviour). A missing or empty
sequence gives 0 and 0. Ids are compared by their 64-bit hash before bucketing, so two distinct ids that share an
embedding bucket still do not match.

"How often is the candidate in this user's own history" is a strong signal on real logs; a pooled sequence embedding
cannot express it, because pooling forgets which ids were there.
"""

from __future__ import annotations

import numpy as np

from features.ids import ArrowData, _column, _hash_uint64, _mix64, list_values
from features.spec import MATCH_OUTPUTS, FeatureSpec, SequenceFeature, SparseFeature

_ROW_SALT = np.uint64(0x9E3779B97F4A7C15)


def _flat_ids(data: ArrowData, feature: SparseFeature | SequenceFeature) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashed ids, row of each id, position of each id within its row) of a feature, sequences cut to max_length."""
    n = data.num_rows
    col = _column(data, feature.column, f"match input '{feature.name}'")
    if isinstance(feature, SparseFeature) and feature.max_values is None:
        return _hash_uint64(col, feature.id_type), np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    limit = feature.max_values if isinstance(feature, SparseFeature) else feature.max_length
    assert limit is not None
    values, kept = list_values(col, limit, feature.column)
    lengths = kept.astype(np.int64)
    if int(lengths.sum()) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    hashed = _hash_uint64(values, feature.id_type)
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(len(rows), dtype=np.int64) - np.repeat(starts, lengths)
    return hashed, rows, positions


def _row_keys(hashed: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One 64-bit key per (row, id): membership of a history element in its own row's candidate set is one isin."""
    return _mix64(hashed ^ (rows.astype(np.uint64) * _ROW_SALT))


def match_block(data: ArrowData, spec: FeatureSpec) -> np.ndarray:
    """[B, len(MATCH_OUTPUTS) * len(spec.match)] float32, in ``spec.match`` order (count, recency per feature)."""
    n = data.num_rows
    out = np.zeros((n, len(MATCH_OUTPUTS) * len(spec.match)), dtype=np.float32)
    by_name: dict[str, SparseFeature | SequenceFeature] = {f.name: f for f in spec.sparse}
    by_name.update({f.name: f for f in spec.sequences})
    for j, m in enumerate(spec.match):
        history, rows, positions = _flat_ids(data, by_name[m.sequence])
        candidate, candidate_rows, _ = _flat_ids(data, by_name[m.candidate])
        hit = np.isin(_row_keys(history, rows), _row_keys(candidate, candidate_rows))
        hit_rows = rows[hit]
        count = np.bincount(hit_rows, minlength=n)
        recency = np.zeros(n, dtype=np.float64)
        # Rows are ascending and positions ascending within a row: a row's first hit is its newest occurrence.
        first_rows, first_index = np.unique(hit_rows, return_index=True)
        recency[first_rows] = 1.0 / (1.0 + positions[hit][first_index])
        width = len(MATCH_OUTPUTS)
        out[:, width * j] = np.log1p(count)
        out[:, width * j + 1] = recency
    return out
