"""BatchTransform against a slow per-row reference, hash stability, nulls, dense moments, TorchRec compatibility."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig

from features.spec import FeatureSpec, IdType, load_feature_spec, parse_feature_spec
from features.stats import DenseStats
from features.transform import (
    BatchTransform,
    compute_dense_moments,
    dense_stats_from_moments,
    hash_ids,
)

REPO = Path(__file__).resolve().parents[1]

# A spec that exercises more than the shipped one: a string-id sequence in its own table, int32 ids, fill_null,
# normalize: none, short max_lengths so truncation is common.
TEST_SPEC = parse_feature_spec(
    {
        "tables": [
            {"name": "user", "num_buckets": 1000, "dim": 8},
            {"name": "item", "num_buckets": 5000, "dim": 8},
            {"name": "query", "num_buckets": 300, "dim": 8},
            {"name": "device", "num_buckets": 16, "dim": 4},
            {"name": "hour", "num_buckets": 24, "dim": 4},
        ],
        "sparse": [
            {"name": "user_id", "column": "user_id", "table": "user", "role": "user"},
            {"name": "item_id", "column": "item_id", "table": "item", "role": "item"},
            {"name": "device", "column": "device", "table": "device", "id_type": "string"},
            {"name": "hour", "column": "hour", "table": "hour"},
        ],
        "sequences": [
            {"name": "click_seq", "column": "click_seq", "behaviour": "click", "table": "item", "max_length": 5},
            {"name": "cart_seq", "column": "cart_seq", "behaviour": "cart", "table": "item", "max_length": 3},
            {
                "name": "query_seq",
                "column": "query_seq",
                "behaviour": "search",
                "table": "query",
                "max_length": 4,
                "id_type": "string",
            },
        ],
        "dense": [
            {"name": "price", "column": "price", "transform": "log1p", "min": 0},
            {"name": "item_ctr_7d", "column": "item_ctr_7d", "normalize": "none"},
            {"name": "user_activity", "column": "user_activity", "transform": "log1p", "fill_null": 0.0},
        ],
        "tasks": [
            {"name": "ctr", "label": "click", "kind": "binary"},
            {"name": "cvr", "label": "conversion", "kind": "binary", "esmm_parent": "ctr"},
            {
                "name": "dwell",
                "label": "dwell_seconds",
                "kind": "regression",
                "given": "ctr",
                "label_transform": "log1p",
            },
        ],
    }
)
SHIPPED_SPEC = load_feature_spec(REPO / "configs/features/behaviour_logs.yaml")

DEVICES = ["ios", "android", "web", "tv", "é-unicode"]
QUERIES = [f"q{i}" for i in range(40)] + ["", "长查询"]


def _lists(rng: np.random.Generator, n: int, max_len: int, draw: Any, null_rate: float) -> list[list[Any] | None]:
    out: list[list[Any] | None] = []
    for _ in range(n):
        if rng.random() < null_rate:
            out.append(None)
        else:
            out.append([draw() for _ in range(int(rng.integers(0, max_len + 1)))])
    return out


def make_table(n: int, seed: int, null_backed_lists: bool = False, activity_nulls: bool = True) -> pa.Table:
    """Logs shaped like the generator's (plus a string sequence), with edge cases: empty/null/long lists, nulls."""
    rng = np.random.default_rng(seed)
    items = rng.integers(-5, 3000, size=n)  # negative ids too: the hash must treat them as two's complement
    click = (rng.random(n) < 0.4).astype(np.int8)
    conversion = (click.astype(bool) & (rng.random(n) < 0.3)).astype(np.int8)
    dwell = np.where(click == 1, rng.exponential(30.0, n), np.nan).astype(np.float32)
    activity = rng.exponential(5.0, n).astype(np.float32)
    activity_mask = (rng.random(n) < 0.1) & activity_nulls  # nulls, filled by TEST_SPEC's fill_null
    item_pool = np.append(items, [2**40, 7])

    def draw_item() -> int:
        return int(item_pool[rng.integers(0, len(item_pool))])

    click_seq = _lists(rng, n, 12, draw_item, 0.1)
    if null_backed_lists:
        # Null list slots backed by non-empty data (legal Arrow; some writers produce it): must read as empty.
        sizes = rng.integers(0, 12, size=n)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
        values = pa.array(rng.integers(0, 3000, size=int(offsets[-1])), pa.int64())
        mask = pa.array(rng.random(n) < 0.2)
        click_seq_arr = pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)
    else:
        click_seq_arr = pa.array(click_seq, pa.list_(pa.int64()))
    return pa.table(
        {
            "request_id": pa.array(np.arange(n, dtype=np.int64) + seed * 1_000_000),
            "ts": pa.array(np.full(n, 1_767_225_600_000, dtype=np.int64), pa.timestamp("ms")),
            "user_id": pa.array(rng.integers(0, 10**12, size=n), pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "category_id": pa.array(rng.integers(0, 300, size=n), pa.int64()),
            "seller_id": pa.array(rng.integers(0, 900, size=n), pa.int64()),
            "hour": pa.array(rng.integers(0, 24, size=n), pa.int32()),
            "slot": pa.array(rng.integers(0, 20, size=n), pa.int32()),
            "device": pa.array([DEVICES[i] for i in rng.integers(0, len(DEVICES), size=n)], pa.string()),
            "price": pa.array(rng.exponential(40.0, n).astype(np.float32)),
            "item_ctr_7d": pa.array(rng.random(n).astype(np.float32)),
            "user_activity": pa.array(activity, mask=activity_mask),
            "click_seq": click_seq_arr,
            "cart_seq": pa.array(_lists(rng, n, 8, draw_item, 0.2), pa.list_(pa.int64())),
            "purchase_seq": pa.array(_lists(rng, n, 14, draw_item, 0.3), pa.list_(pa.int64())),
            "query_seq": pa.array(
                _lists(rng, n, 7, lambda: QUERIES[rng.integers(0, len(QUERIES))], 0.1), pa.list_(pa.string())
            ),
            "click": pa.array(click),
            "conversion": pa.array(conversion),
            # null outside the dwell task's sample space (no click), as a writer may leave it
            "dwell_seconds": pa.array(dwell, mask=np.isnan(dwell)),
        }
    )


# ---- slow reference: per-row Python, written independently of the vectorised code ---------------------------------
_M64 = (1 << 64) - 1


def ref_bucket(value: int | str, num_buckets: int, id_type: IdType) -> int:
    if id_type == IdType.string:
        assert isinstance(value, str)
        return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little") % num_buckets
    assert isinstance(value, int)
    z = (value + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) % num_buckets


def reference(data: pa.Table | pa.RecordBatch, spec: FeatureSpec, stats: DenseStats) -> dict[str, Any]:
    rows = data.to_pylist()
    sparse: dict[str, tuple[list[int], list[int]]] = {}
    for f in spec.sparse:
        nb = spec.table(f.table).num_buckets
        sparse[f.name] = ([ref_bucket(r[f.column], nb, f.id_type) for r in rows], [1] * len(rows))
    for s in spec.sequences:
        nb = spec.table(s.table).num_buckets
        vals: list[int] = []
        lens: list[int] = []
        for r in rows:
            kept = (r[s.column] or [])[: s.max_length]
            vals += [ref_bucket(v, nb, s.id_type) for v in kept]
            lens.append(len(kept))
        sparse[s.name] = (vals, lens)
    dense = []
    for r in rows:
        out = []
        for d in spec.dense:
            v = r[d.column] if r[d.column] is not None else d.fill_null
            v = math.log1p(v) if d.transform == "log1p" else float(v)
            if d.normalize == "standard":
                v = (v - stats.mean[d.name]) / max(stats.std[d.name], 1e-6)
            out.append(v)
        dense.append(out)
    labels = {}
    for t in spec.tasks:
        ys = [0.0 if r[t.label] is None else float(r[t.label]) for r in rows]
        labels[t.name] = [math.log1p(y) if t.label_transform == "log1p" else y for y in ys]
    return {
        "sparse": sparse,
        "dense": np.array(dense, dtype=np.float64).reshape(len(rows), len(spec.dense)),
        "labels": labels,
    }


def assert_matches_reference(data: pa.Table | pa.RecordBatch, spec: FeatureSpec, stats: DenseStats) -> None:
    batch = BatchTransform(spec, stats)(data)
    ref = reference(data, spec, stats)
    kjt = batch.sparse
    assert kjt.keys() == spec.sparse_keys
    assert kjt.values().dtype == torch.int64
    assert kjt.stride() == data.num_rows
    # TorchRec's KJT.to_dict() cannot split a 0-row KJT (IndexError inside torchrec); index per key there instead.
    per_key = kjt.to_dict() if data.num_rows else {k: kjt[k] for k in spec.sparse_keys}
    for key, (values, lengths) in ref["sparse"].items():
        assert per_key[key].lengths().tolist() == lengths, key
        assert per_key[key].values().tolist() == values, key
    assert batch.dense.dtype == torch.float32
    assert batch.dense.shape == (data.num_rows, len(spec.dense))
    np.testing.assert_allclose(batch.dense.numpy(), ref["dense"], rtol=1e-5, atol=1e-5)
    assert set(batch.labels) == {t.name for t in spec.tasks}
    for name, ys in ref["labels"].items():
        assert batch.labels[name].dtype == torch.float32
        np.testing.assert_allclose(batch.labels[name].numpy(), ys, rtol=1e-6, atol=1e-6)


def _stats(table: pa.Table, spec: FeatureSpec) -> DenseStats:
    return dense_stats_from_moments([compute_dense_moments(table, spec)], spec)


def _variants() -> dict[str, pa.Table | pa.RecordBatch]:
    t1, t2, t3 = make_table(90, seed=1), make_table(70, seed=2), make_table(60, seed=3, null_backed_lists=True)
    chunked = pa.concat_tables([t1, t2.slice(13), t3.slice(0, 41)])
    single = t1.combine_chunks()
    large = t1.cast(
        t1.schema.set(t1.schema.get_field_index("click_seq"), pa.field("click_seq", pa.large_list(pa.int64())))
        .set(t1.schema.get_field_index("device"), pa.field("device", pa.large_string()))
        .set(t1.schema.get_field_index("query_seq"), pa.field("query_seq", pa.list_(pa.large_string())))
    )
    dictionary = t2.set_column(t2.schema.get_field_index("device"), "device", pc_dictionary(t2.column("device")))
    return {
        "plain": t1,
        "sliced": t1.slice(17),
        "sliced_window": t1.slice(23, 40),
        "chunks": chunked,
        "chunks_sliced_across_boundary": chunked.slice(70, 100),
        "null_backed_lists": t3,
        "record_batch": single.to_batches()[0],
        "record_batch_sliced": single.to_batches()[0].slice(31, 50),
        "large_types": large,
        "dictionary_strings": dictionary,
        "empty": t1.slice(0, 0),
    }


def pc_dictionary(col: pa.ChunkedArray) -> pa.ChunkedArray:
    # Parquet readers return dictionary-typed strings with read_dictionary; chunks may hold different dictionaries.
    chunk = col.combine_chunks()
    return pa.chunked_array([chunk.slice(0, 30).dictionary_encode(), chunk.slice(30).dictionary_encode()])


VARIANTS = _variants()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_reference(name: str) -> None:
    data = VARIANTS[name]
    stats = _stats(VARIANTS["plain"], TEST_SPEC)
    assert_matches_reference(data, TEST_SPEC, stats)


def test_matches_reference_shipped_spec() -> None:
    # the shipped spec has no fill_null for user_activity: validated logs have no nulls there
    table = pa.concat_tables(
        [make_table(80, 5, activity_nulls=False), make_table(50, 6, activity_nulls=False).slice(9)]
    )
    assert_matches_reference(table, SHIPPED_SPEC, _stats(table, SHIPPED_SPEC))


def test_edge_cases_present() -> None:
    """Guard the fixtures: the reference comparison is only meaningful if they contain the edge cases."""
    t = VARIANTS["chunks"]
    assert t.column("click_seq").num_chunks == 3
    click_seq = t.column("click_seq").to_pylist()
    assert any(v is None for v in click_seq) and any(v == [] for v in click_seq)
    assert any(v is not None and len(v) > 5 for v in click_seq)
    assert t.column("user_activity").null_count > 0 and t.column("dwell_seconds").null_count > 0


def test_null_list_is_empty_sequence() -> None:
    table = make_table(20, seed=9).slice(0, 3)
    table = table.set_column(
        table.schema.get_field_index("click_seq"), "click_seq", pa.array([None, [], [1, 2]], pa.list_(pa.int64()))
    )
    kjt = BatchTransform(TEST_SPEC, _stats(table, TEST_SPEC))(table).sparse
    assert kjt["click_seq"].lengths().tolist() == [0, 0, 2]


def test_long_sequences_keep_first_max_length() -> None:
    table = make_table(20, seed=9).slice(0, 2)
    seqs = [list(range(100, 112)), list(range(200, 203))]
    table = table.set_column(table.schema.get_field_index("click_seq"), "click_seq", pa.array(seqs))
    kjt = BatchTransform(TEST_SPEC, _stats(table, TEST_SPEC))(table).sparse
    nb = TEST_SPEC.table("item").num_buckets
    expected = hash_ids(np.array(seqs[0][:5] + seqs[1]), nb, IdType.int).tolist()
    assert kjt["click_seq"].lengths().tolist() == [5, 3]
    assert kjt["click_seq"].values().tolist() == expected


def test_lengths_dtype_and_empty_dense() -> None:
    spec = TEST_SPEC.model_copy(update={"dense": []})
    batch = BatchTransform(spec, DenseStats.identity([]))(VARIANTS["plain"])
    assert batch.dense.shape == (90, 0)
    assert batch.sparse.lengths().dtype in (torch.int32, torch.int64)
    assert batch.batch_size == 90


# ---- hashing -------------------------------------------------------------------------------------------------------
def test_hash_pinned_values() -> None:
    """Changing the hash re-maps every id and silently breaks every trained model: these values must never change."""
    ints = hash_ids(np.array([0, 1, 2, -1, 123456789, 2**63 - 1]), 1_000_003, IdType.int)
    assert ints.tolist() == [4995, 745530, 320279, 55612, 441745, 953673]
    strs = hash_ids(pa.array(["ios", "android", "web", "", "é"]), 1_000_003, IdType.string)
    assert strs.tolist() == [397086, 449570, 27119, 984010, 202877]
    for v, b in zip([0, 1, 2, -1, 123456789, 2**63 - 1], ints.tolist(), strict=True):
        assert ref_bucket(v, 1_000_003, IdType.int) == b
    for s, b in zip(["ios", "android", "web", "", "é"], strs.tolist(), strict=True):
        assert ref_bucket(s, 1_000_003, IdType.string) == b


def test_hash_range_and_input_kinds_agree() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(-(2**62), 2**62, size=5000)
    for nb in (1, 7, 24, 100_000):
        out = hash_ids(ids, nb, IdType.int)
        assert out.dtype == np.int64 and out.min() >= 0 and out.max() < nb
    # The same id hashes the same whatever its container or integer width.
    small = np.arange(-50, 50)
    expected = hash_ids(small, 97, IdType.int)
    assert (hash_ids(pa.array(small.astype(np.int32)), 97, IdType.int) == expected).all()
    assert (hash_ids(pa.chunked_array([small[:30], small[30:]]), 97, IdType.int) == expected).all()
    assert (hash_ids(pa.array(small).slice(10), 97, IdType.int) == expected[10:]).all()
    # Spread: consecutive ids must not pile into few buckets.
    counts = np.bincount(hash_ids(np.arange(100_000), 100, IdType.int), minlength=100)
    assert counts.min() > 850 and counts.max() < 1150
    words = np.array(["a", "b", "a", "zz"], dtype=object)
    assert (hash_ids(words, 1000, IdType.string) == hash_ids(pa.array(words.tolist()), 1000, IdType.string)).all()


def test_shared_table_features_hash_identically() -> None:
    """The candidate item and the items of a sequence must land in the same row of the shared item table."""
    table = make_table(30, seed=4)
    items = table.column("item_id").to_pylist()
    table = table.set_column(
        table.schema.get_field_index("cart_seq"), "cart_seq", pa.array([[i] for i in items], pa.list_(pa.int64()))
    )
    kjt = BatchTransform(TEST_SPEC, _stats(table, TEST_SPEC))(table).sparse
    assert kjt["cart_seq"].values().tolist() == kjt["item_id"].values().tolist()


def test_string_hash_stable_across_processes() -> None:
    words = ["ios", "android", "web", "长查询", ""]
    code = (
        "import json, sys, pyarrow as pa; from features.transform import hash_ids; "
        "from features.spec import IdType; "
        "print(json.dumps(hash_ids(pa.array(json.loads(sys.argv[1])), 1_000_003, IdType.string).tolist()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different salt for Python's hash(): must not matter
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(words)], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    assert theirs == hash_ids(pa.array(words), 1_000_003, IdType.string).tolist()


# ---- nulls and errors ----------------------------------------------------------------------------------------------
def _with(table: pa.Table, column: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, values)


@pytest.fixture()
def small() -> tuple[pa.Table, BatchTransform]:
    table = make_table(6, seed=11)
    return table, BatchTransform(TEST_SPEC, _stats(table, TEST_SPEC))


def test_null_id_raises_naming_column(small: tuple[pa.Table, BatchTransform]) -> None:
    table, transform = small
    with pytest.raises(ValueError, match="'user_id'"):
        transform(_with(table, "user_id", pa.array([1, None, 3, 4, 5, 6], pa.int64())))
    with pytest.raises(ValueError, match="'device'"):
        transform(_with(table, "device", pa.array(["ios", None, "ios", "ios", "ios", "ios"])))
    with pytest.raises(ValueError, match="'click_seq'"):
        transform(_with(table, "click_seq", pa.array([[1], [2, None], [], None, [3], [4]], pa.list_(pa.int64()))))
    with pytest.raises(ValueError, match="'query_seq'"):
        transform(_with(table, "query_seq", pa.array([["a", None], [], [], [], [], []], pa.list_(pa.string()))))


def test_null_beyond_max_length_is_ignored(small: tuple[pa.Table, BatchTransform]) -> None:
    """Elements past max_length are never read, so a null there is not an error (it is not part of the input)."""
    table, transform = small
    seqs = pa.array([[1, 2, 3, 4, 5, None], [], [], [], [], []], pa.list_(pa.int64()))
    assert transform(_with(table, "click_seq", seqs)).sparse["click_seq"].lengths().tolist() == [5, 0, 0, 0, 0, 0]


def test_dense_nulls_and_non_finite(small: tuple[pa.Table, BatchTransform]) -> None:
    table, transform = small
    with pytest.raises(ValueError, match="'price'"):
        transform(_with(table, "price", pa.array([1.0, None, 2.0, 3.0, 4.0, 5.0], pa.float32())))
    with pytest.raises(ValueError, match="'item_ctr_7d'"):
        transform(_with(table, "item_ctr_7d", pa.array([0.1, float("nan"), 0.2, 0.3, 0.4, 0.5], pa.float32())))
    # user_activity has fill_null: 0 -> log1p(0) = 0, then standardised
    filled = transform(_with(table, "user_activity", pa.array([None] * 6, pa.float32()))).dense[:, 2]
    stats = transform.stats
    expected = (0.0 - stats.mean["user_activity"]) / stats.std["user_activity"]
    np.testing.assert_allclose(filled.numpy(), np.full(6, expected), rtol=1e-6)


def test_labels_errors_and_serving_path(small: tuple[pa.Table, BatchTransform]) -> None:
    table, transform = small
    with pytest.raises(ValueError, match="'conversion'"):
        transform(table.drop_columns(["conversion"]))
    serving = table.drop_columns(TEST_SPEC.label_columns)
    batch = transform(serving, with_labels=False)
    assert batch.labels == {}
    assert torch.equal(batch.dense, transform(table).dense)
    clicked = _with(table, "click", pa.array([1, 0, 0, 0, 0, 0], pa.int8()))
    with pytest.raises(ValueError, match="'dwell_seconds'"):
        transform(_with(clicked, "dwell_seconds", pa.array([None, 1.0, 2.0, 3.0, 4.0, 5.0], pa.float32())))
    with pytest.raises(ValueError, match="'click'"):
        transform(_with(table, "click", pa.array([2, 0, 0, 0, 0, 0], pa.int8())))
    with pytest.raises(ValueError, match="'click'"):
        transform(_with(table, "click", pa.array([None, 0, 0, 0, 0, 0], pa.int8())))
    bools = _with(table, "click", pa.array([True, False] * 3))
    bools = _with(bools, "dwell_seconds", pa.array([1.0] * 6, pa.float32()))
    assert transform(bools).labels["ctr"].tolist() == [1.0, 0.0] * 3
    assert transform.required_columns(with_labels=False) == [
        "user_id",
        "item_id",
        "device",
        "hour",
        "click_seq",
        "cart_seq",
        "query_seq",
        "price",
        "item_ctr_7d",
        "user_activity",
    ]


def test_stats_must_cover_spec() -> None:
    with pytest.raises(ValueError, match="'price'"):
        BatchTransform(TEST_SPEC, DenseStats.identity(["item_ctr_7d", "user_activity"]))
    # normalize: none features need no stats
    BatchTransform(TEST_SPEC, DenseStats.identity(["price", "user_activity"]))


# ---- moments -------------------------------------------------------------------------------------------------------
def test_moments_merge_equals_concatenated() -> None:
    parts = [make_table(90, seed=1), make_table(70, seed=2).slice(13), make_table(60, seed=3)]
    merged = dense_stats_from_moments([compute_dense_moments(p, TEST_SPEC) for p in parts], TEST_SPEC)
    whole = pa.concat_tables(parts)
    direct = dense_stats_from_moments([compute_dense_moments(whole, TEST_SPEC)], TEST_SPEC)
    assert merged.count == direct.count == whole.num_rows
    for name in ("price", "item_ctr_7d", "user_activity"):
        assert merged.mean[name] == pytest.approx(direct.mean[name], rel=1e-12)
        assert merged.std[name] == pytest.approx(direct.std[name], rel=1e-9)
    # and they are the mean/std of the transformed value
    price = np.log1p(np.asarray(whole.column("price").to_numpy(), dtype=np.float64))
    assert direct.mean["price"] == pytest.approx(price.mean(), rel=1e-9)
    assert direct.std["price"] == pytest.approx(price.std(), rel=1e-6)
    # standardised training data has mean 0 and std 1
    dense = BatchTransform(TEST_SPEC, direct).dense_numpy(whole)
    np.testing.assert_allclose(dense[:, [0, 2]].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(dense[:, [0, 2]].std(axis=0), 1.0, atol=1e-4)


def test_constant_feature_std_floor_and_empty_input() -> None:
    table = _with(make_table(10, seed=1), "item_ctr_7d", pa.array([0.5] * 10, pa.float32()))
    stats = _stats(table, TEST_SPEC)
    assert stats.std["item_ctr_7d"] == 1e-6
    with pytest.raises(ValueError, match="'price'"):
        dense_stats_from_moments([], TEST_SPEC)


# ---- TorchRec ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [TEST_SPEC, SHIPPED_SPEC], ids=["test_spec", "shipped_spec"])
def test_kjt_runs_through_embedding_modules(spec: FeatureSpec) -> None:
    table = pa.concat_tables(
        [make_table(40, 7, activity_nulls=False), make_table(30, 8, activity_nulls=False).slice(5)]
    )
    batch = BatchTransform(spec, _stats(table, spec))(table)
    features_of: dict[str, list[str]] = {}
    for f in [*spec.sparse, *spec.sequences]:
        features_of.setdefault(f.table, []).append(f.name)
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=t.name, embedding_dim=t.dim, num_embeddings=t.num_buckets, feature_names=features_of[t.name]
            )
            for t in spec.sequence_tables
        ]
    )
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=t.name, embedding_dim=t.dim, num_embeddings=t.num_buckets, feature_names=features_of[t.name]
            )
            for t in spec.pooled_tables
        ]
    )
    unpooled = ec(batch.sparse)
    pooled = ebc(batch.sparse).to_dict()
    for s in spec.sequences:
        jt = unpooled[s.name]
        assert jt.values().shape == (int(jt.lengths().sum()), spec.table(s.table).dim)
        assert int(jt.lengths().max()) <= s.max_length
    for f in spec.sparse:
        if f.table in {t.name for t in spec.pooled_tables}:
            assert pooled[f.name].shape == (table.num_rows, spec.table(f.table).dim)
        else:
            assert unpooled[f.name].values().shape == (table.num_rows, spec.table(f.table).dim)
