"""Match features on hand-made rows: counts and recency of the candidate in the user's history, empty and missing
histories, the sequence's max_length, multi-valued candidates, string ids, chunked input, and spec errors."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from features.match import match_block
from features.spec import SpecError, parse_feature_spec
from features.stats import DenseStats
from features.transform import BatchTransform


def _spec(match: list[dict[str, str]] | None = None, item_type: str = "int") -> dict:
    return {
        "keys": {"user_id": "user_id", "timestamp": "ts"},
        "tables": [
            {"name": "user", "num_buckets": 50, "dim": 4},
            {"name": "item", "num_buckets": 3, "dim": 4},  # tiny on purpose: distinct ids share buckets
            {"name": "genre", "num_buckets": 20, "dim": 4},
        ],
        "sparse": [
            {"name": "user_id", "column": "user_id", "table": "user"},
            {"name": "item_id", "column": "item_id", "table": "item", "id_type": item_type},
        ],
        "sequences": [
            {
                "name": "hist",
                "column": "hist",
                "behaviour": "view",
                "table": "item",
                "max_length": 3,
                "id_type": item_type,
            },
            {"name": "genres", "column": "genres", "behaviour": "candidate", "table": "genre", "max_length": 5},
            {"name": "hist_genres", "column": "hist_genres", "behaviour": "view", "table": "genre", "max_length": 10},
        ],
        "dense": [{"name": "price", "column": "price"}],
        "match": match
        if match is not None
        else [
            {"name": "item_in_hist", "candidate": "item_id", "sequence": "hist"},
            {"name": "genre_overlap", "candidate": "genres", "sequence": "hist_genres"},
        ],
        "tasks": [{"name": "ctr", "label": "click", "kind": "binary"}],
    }


ROWS = {
    "user_id": [1, 2, 3, 4, 5],
    "item_id": [5, 3, 4, 8, 9],
    "hist": [[7, 5, 5], [], None, [1, 2, 3, 8], [9]],  # row 3: the 8 lies beyond max_length 3
    "genres": [[1, 2], [3], [], [4], None],
    "hist_genres": [[3, 2, 2, 1], [4, 4], [1], None, [2]],
    "price": [1.0, 2.0, 3.0, 4.0, 5.0],
    "click": [1, 0, 0, 1, 0],
}
# (count, newest position) per row for item_in_hist, then genre_overlap; None: no occurrence.
EXPECTED = [
    [(2, 1), (3, 1)],
    [(0, None), (0, None)],  # row 1: the 3 in row 3's history belongs to another user
    [(0, None), (0, None)],
    [(0, None), (0, None)],
    [(1, 0), (0, None)],
]


def _expected_block() -> np.ndarray:
    out = np.zeros((len(EXPECTED), 4), dtype=np.float32)
    for r, row in enumerate(EXPECTED):
        for j, (count, pos) in enumerate(row):
            out[r, 2 * j] = math.log1p(count)
            out[r, 2 * j + 1] = 0.0 if pos is None else 1.0 / (1 + pos)
    return out


def test_counts_and_recency_per_row() -> None:
    spec = parse_feature_spec(_spec())
    np.testing.assert_allclose(match_block(pa.table(ROWS), spec), _expected_block(), rtol=1e-6)


def test_chunked_and_sliced_input_give_the_same_values() -> None:
    spec = parse_feature_spec(_spec())
    table = pa.table(ROWS)
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 3)])
    assert chunked.column("hist").num_chunks == 2
    np.testing.assert_allclose(match_block(chunked, spec), _expected_block(), rtol=1e-6)
    np.testing.assert_allclose(match_block(table.slice(3, 2), spec), _expected_block()[3:], rtol=1e-6)


def test_ids_match_by_value_not_by_bucket() -> None:
    """With 3 buckets, 5 and 8 (or 2) may share a row of the item table; only equal ids count."""
    spec = parse_feature_spec(_spec([{"name": "m", "candidate": "item_id", "sequence": "hist"}]))
    rows = {**ROWS, "item_id": [6, 3, 4, 8, 9], "hist": [[0, 1, 2], [4, 5, 7], [8], [], [9, 9, 9]]}
    block = match_block(pa.table(rows), spec)
    np.testing.assert_allclose(block[:, 0], np.log1p([0, 0, 0, 0, 3]), rtol=1e-6)
    np.testing.assert_allclose(block[:, 1], [0, 0, 0, 0, 1.0])


def test_string_ids() -> None:
    spec = parse_feature_spec(_spec([{"name": "m", "candidate": "item_id", "sequence": "hist"}], item_type="string"))
    rows = {**ROWS, "item_id": ["a", "b", "c", "d", "e"], "hist": [["x", "a"], ["b"], [], None, ["e", "f", "e"]]}
    block = match_block(pa.table(rows), spec)
    np.testing.assert_allclose(block[:, 0], np.log1p([1, 1, 0, 0, 2]), rtol=1e-6)
    np.testing.assert_allclose(block[:, 1], [0.5, 1.0, 0, 0, 1.0])


def test_the_dense_input_carries_the_match_block_after_the_dense_features() -> None:
    spec = parse_feature_spec(_spec())
    assert spec.dense_width == 1 + 2 * 2
    batch = BatchTransform(spec, DenseStats(mean={"price": 3.0}, std={"price": 2.0}, count=5))(pa.table(ROWS))
    assert batch.dense.shape == (5, 5)
    np.testing.assert_allclose(batch.dense[:, 0].numpy(), (np.array(ROWS["price"]) - 3.0) / 2.0)
    np.testing.assert_allclose(batch.dense[:, 1:].numpy(), _expected_block(), rtol=1e-6)


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ({"name": "m", "candidate": "price", "sequence": "hist"}, "candidate 'price' is not a sparse or sequence"),
        ({"name": "m", "candidate": "item_id", "sequence": "item_id"}, "sequence 'item_id' is not a sequence feature"),
        ({"name": "m", "candidate": "item_id", "sequence": "hist_genres"}, None),  # same id type: allowed
        ({"name": "price", "candidate": "item_id", "sequence": "hist"}, "feature names must be unique"),
    ],
)
def test_spec_errors_name_the_match_feature(match: dict[str, str], message: str | None) -> None:
    if message is None:
        parse_feature_spec(_spec([match]))
        return
    with pytest.raises(SpecError, match=message):
        parse_feature_spec(_spec([match]))


def test_candidate_and_sequence_must_hold_the_same_kind_of_id() -> None:
    data = _spec([{"name": "m", "candidate": "item_id", "sequence": "hist_genres"}], item_type="string")
    with pytest.raises(SpecError, match=r"candidate 'item_id' holds string ids, sequence 'hist_genres' int ids"):
        parse_feature_spec(data)


def test_specs_without_match_features_keep_their_fingerprint() -> None:
    data = _spec([])
    without_key = {k: v for k, v in data.items() if k != "match"}
    assert parse_feature_spec(data).fingerprint() == parse_feature_spec(without_key).fingerprint()
    assert parse_feature_spec(_spec()).fingerprint() != parse_feature_spec(without_key).fingerprint()
