"""Tests of the behaviour-log generator: determinism, schema, partitions, sequences, labels, oracle, conflict."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import generator as gen
from features.generator import LOG_SCHEMA, ORACLE_SCHEMA, GenerationResult, GeneratorConfig, generate_logs
from features.spec import IdType, load_feature_spec

SPEC_PATH = Path(__file__).resolve().parents[1] / "configs" / "features" / "behaviour_logs.yaml"

# Small but not tiny: caps bind (max_seq_length=5), users come back across days, and label rates are measurable.
SMALL = GeneratorConfig(
    seed=11,
    start_date="2026-03-30",
    num_days=3,
    impressions_per_day=8_000,
    num_users=400,
    num_items=1_500,
    num_categories=30,
    num_sellers=100,
    files_per_day=2,
    max_seq_length=5,
    conflict=0.5,
)


def _run(cfg: GeneratorConfig, root: Path) -> tuple[GenerationResult, pa.Table, pa.Table]:
    result = generate_logs(cfg, root / "logs", root / "oracle.parquet")
    logs = pa.concat_tables([pq.read_table(f) for f in result.files])
    return result, logs, pq.read_table(result.oracle_path)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[GenerationResult, pa.Table, pa.Table]:
    return _run(SMALL, tmp_path_factory.mktemp("small"))


def test_deterministic_by_seed(tmp_path: Path, small: tuple[GenerationResult, pa.Table, pa.Table]) -> None:
    _, logs, oracle = small
    _, logs_again, oracle_again = _run(SMALL, tmp_path / "same")
    assert logs_again.equals(logs)
    assert oracle_again.equals(oracle)

    _, logs_other, oracle_other = _run(SMALL.model_copy(update={"seed": 12}), tmp_path / "other")
    assert not logs_other.equals(logs)
    assert not np.array_equal(oracle_other["p_click"].to_numpy(), oracle["p_click"].to_numpy())


def test_rerun_leaves_no_stale_partitions(tmp_path: Path) -> None:
    cfg = SMALL.model_copy(update={"num_days": 3, "impressions_per_day": 200, "start_date": "2026-01-01"})
    generate_logs(cfg, tmp_path / "logs", tmp_path / "oracle.parquet")
    cfg2 = cfg.model_copy(update={"num_days": 2, "start_date": "2026-02-01", "seed": 5})
    result = generate_logs(cfg2, tmp_path / "logs", tmp_path / "oracle.parquet")
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["dt=2026-02-01", "dt=2026-02-02"]
    assert sorted((tmp_path / "logs").rglob("*.parquet")) == sorted(result.files)


def test_schema_matches_spec(small: tuple[GenerationResult, pa.Table, pa.Table]) -> None:
    result, logs, oracle = small
    spec = load_feature_spec(SPEC_PATH)
    for f in result.files:
        assert pq.read_schema(f).remove_metadata().equals(LOG_SCHEMA)
    schema = logs.schema
    assert schema.field(spec.keys.request_id).type == pa.int64()
    assert schema.field(spec.keys.user_id).type == pa.int64()
    assert schema.field(spec.keys.timestamp).type == pa.timestamp("ms")
    for s in spec.sparse:
        assert schema.field(s.column).type in (
            (pa.string(),) if s.id_type == IdType.string else (pa.int64(), pa.int32())
        )
    for q in spec.sequences:
        assert schema.field(q.column).type == pa.list_(pa.int64())
    for d in spec.dense:
        assert schema.field(d.column).type == pa.float32()
    for label in spec.label_columns:
        assert schema.field(label).type in (pa.int8(), pa.float32())
    assert oracle.schema.remove_metadata().equals(ORACLE_SCHEMA)
    assert not set(oracle.column_names) - {"request_id"} & set(logs.column_names)  # no oracle column leaks


def test_partitions_rows_and_columns(small: tuple[GenerationResult, pa.Table, pa.Table]) -> None:
    result, logs, _ = small
    start = dt.date.fromisoformat(SMALL.start_date)
    assert result.dates == [(start + dt.timedelta(days=d)).isoformat() for d in range(SMALL.num_days)]
    assert result.rows == logs.num_rows == SMALL.num_days * SMALL.impressions_per_day
    assert len(result.files) == SMALL.num_days * SMALL.files_per_day
    for date in result.dates:
        parts = [f for f in result.files if f.parent.name == f"dt={date}"]
        assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(SMALL.files_per_day)]
        day = pa.concat_tables([pq.read_table(p) for p in parts])
        assert day.num_rows == SMALL.impressions_per_day
        ts = day["ts"].to_pylist()
        assert all(t.date().isoformat() == date for t in ts)
        assert day["hour"].to_pylist() == [t.hour for t in ts]

    rid = logs["request_id"].to_numpy()
    assert len(np.unique(rid)) == len(rid)
    slot = logs["slot"].to_numpy()
    assert slot.min() >= 0 and slot.max() < gen.NUM_SLOTS
    assert set(logs["device"].to_pylist()) <= set(gen.DEVICES)
    assert logs["price"].to_numpy().min() >= 0
    ctr = logs["item_ctr_7d"].to_numpy()
    assert ctr.min() >= 0 and ctr.max() <= 1
    assert logs["user_activity"].to_numpy().min() >= 0
    # Item attributes are fixed per item.
    items = logs["item_id"].to_numpy()
    for col in ("category_id", "seller_id", "price"):
        pairs = np.unique(np.stack([items, logs[col].to_numpy().astype(np.float64)]), axis=1)
        assert pairs.shape[1] == len(np.unique(items)), col


def _reference_histories(logs: pa.Table, events: dict[str, np.ndarray], cap: int) -> dict[str, list[list[int]]]:
    """Slow pure-Python sequences: per row, the user's earlier (strictly smaller ts) events, newest first, capped."""
    users = logs["user_id"].to_pylist()
    items = logs["item_id"].to_pylist()
    ts = logs["ts"].cast(pa.int64()).to_pylist()
    out: dict[str, list[list[int]]] = {}
    for name, flags in events.items():
        history: dict[int, list[tuple[int, int]]] = defaultdict(list)  # user -> [(ts, item)] in row (time) order
        rows = []
        for r in range(logs.num_rows):
            earlier = [item for t, item in history[users[r]] if t < ts[r]]
            rows.append(earlier[::-1][:cap])
            if flags[r]:
                history[users[r]].append((ts[r], items[r]))
        out[name] = rows
    return out


def test_sequences_match_slow_reference(small: tuple[GenerationResult, pa.Table, pa.Table]) -> None:
    _, logs, _ = small
    logs = logs.sort_by("request_id")  # request ids follow the global time order
    ts = logs["ts"].cast(pa.int64()).to_numpy()
    assert np.all(np.diff(ts) >= 0)
    # Cart events are not a log column; rebuild them from the generator's own label draw.
    world = gen._build_world(SMALL)
    imp = gen._sample_impressions(SMALL, world)
    click, cart, conversion, _ = gen._draw_labels(gen._truth(SMALL, world, imp), gen._label_draws(SMALL, len(imp.user)))
    assert np.array_equal(click, logs["click"].to_numpy() == 1)
    assert np.array_equal(conversion, logs["conversion"].to_numpy() == 1)
    assert np.all(cart[conversion]) and not np.any(cart & ~click)

    events = {"click_seq": click, "cart_seq": cart, "purchase_seq": conversion}
    expected = _reference_histories(logs, events, SMALL.max_seq_length)
    for name in events:
        got = logs[name].to_pylist()
        assert got == expected[name], name
    lengths = [len(s) for s in logs["click_seq"].to_pylist()]
    assert max(lengths) == SMALL.max_seq_length  # the cap binds in this config
    # click_category_seq: the category of each click_seq item, position by position.
    category = dict(zip(logs["item_id"].to_pylist(), logs["category_id"].to_pylist(), strict=True))
    clicked_categories = [[category[i] for i in seq] for seq in logs["click_seq"].to_pylist()]
    assert logs["click_category_seq"].to_pylist() == clicked_categories
    # History crosses days: a user's first impression of day 2 already carries day 1's clicks.
    day = ts // gen.MS_PER_DAY - ts[0] // gen.MS_PER_DAY
    users = logs["user_id"].to_numpy()
    first_of_day2 = np.flatnonzero(day == 1)[np.unique(users[day == 1], return_index=True)[1]]
    assert sum(lengths[r] > 0 for r in first_of_day2) > 0.2 * len(first_of_day2)

    # user_activity: the user's impressions strictly before this one.
    seen: dict[int, list[int]] = defaultdict(list)
    activity = []
    for u, t in zip(logs["user_id"].to_pylist(), ts.tolist(), strict=True):
        activity.append(sum(1 for s in seen[u] if s < t))
        seen[u].append(t)
    assert logs["user_activity"].to_numpy().tolist() == activity


def test_labels_consistent_with_oracle(small: tuple[GenerationResult, pa.Table, pa.Table]) -> None:
    _, logs, oracle = small
    logs, oracle = logs.sort_by("request_id"), oracle.sort_by("request_id")
    assert np.array_equal(logs["request_id"].to_numpy(), oracle["request_id"].to_numpy())
    assert len(np.unique(oracle["request_id"].to_numpy())) == oracle.num_rows

    click = logs["click"].to_numpy().astype(bool)
    conv = logs["conversion"].to_numpy().astype(bool)
    dwell = logs["dwell_seconds"].to_numpy()
    assert not np.any(conv & ~click)
    assert np.all(dwell[click] > 0) and np.all(dwell[~click] == 0.0)

    p_click, p_conv = oracle["p_click"].to_numpy(), oracle["p_conversion"].to_numpy()
    np.testing.assert_allclose(oracle["p_ctcvr"].to_numpy(), p_click * p_conv)
    assert 0.03 <= click.mean() <= 0.10 and 0.05 <= conv[click].mean() <= 0.20  # realistic base rates
    n = len(click)
    assert abs(click.mean() - p_click.mean()) < 4 * np.sqrt(p_click.mean() / n)
    # Conversion among clicks against the oracle's CVR on the same rows (the draw is independent of the click).
    k = int(click.sum())
    assert abs(conv[click].mean() - p_conv[click].mean()) < 4 * np.sqrt(0.2 / k)
    log_dwell = np.log1p(dwell[click].astype(np.float64))
    assert abs(log_dwell.mean() - oracle["dwell_log_mean"].to_numpy()[click].mean()) < 4 * 0.5 / np.sqrt(k)
    # The oracle ranks better than chance: clicked rows have higher p_click.
    assert p_click[click].mean() > 1.5 * p_click[~click].mean()


def test_click_history_predicts_clicks(small: tuple[GenerationResult, pa.Table, pa.Table]) -> None:
    _, logs, _ = small
    item_cat = dict(zip(logs["item_id"].to_pylist(), logs["category_id"].to_pylist(), strict=True))
    hit: list[int] = []
    miss: list[int] = []
    for seq, cat, c in zip(
        logs["click_seq"].to_pylist(), logs["category_id"].to_pylist(), logs["click"].to_pylist(), strict=True
    ):
        if seq:
            (hit if any(item_cat[i] == cat for i in seq) else miss).append(c)
    assert np.mean(hit) > 1.3 * np.mean(miss)  # candidates in a recently clicked category get clicked more


def _item_corr(cfg: GeneratorConfig, root: Path) -> float:
    _, logs, oracle = _run(cfg, root)
    logs, oracle = logs.sort_by("request_id"), oracle.sort_by("request_id")
    items = logs["item_id"].to_numpy()
    _, inv, counts = np.unique(items, return_inverse=True, return_counts=True)
    pc = np.bincount(inv, weights=oracle["p_click"].to_numpy()) / counts
    pv = np.bincount(inv, weights=oracle["p_conversion"].to_numpy()) / counts
    return float(np.corrcoef(pc, pv)[0, 1])


def test_conflict_decorrelates_click_and_conversion(tmp_path: Path) -> None:
    base = SMALL.model_copy(update={"num_days": 2, "impressions_per_day": 5_000, "seed": 4})
    aligned = _item_corr(base.model_copy(update={"conflict": 0.0}), tmp_path / "aligned")
    conflicting = _item_corr(base.model_copy(update={"conflict": 1.0}), tmp_path / "conflicting")
    assert aligned > 0.2
    assert aligned - conflicting > 0.3, (aligned, conflicting)


def test_repeat_knob_returns_users_to_their_history(
    tmp_path: Path, small: tuple[GenerationResult, pa.Table, pa.Table]
) -> None:
    _, logs_off, _ = small
    cfg = SMALL.model_copy(update={"repeat": 1.0})
    _, logs, oracle = _run(cfg, tmp_path / "repeat")
    _, logs_again, _ = _run(cfg, tmp_path / "again")
    assert logs_again.equals(logs)  # deterministic with the knob on too

    def in_click_history(table: pa.Table) -> np.ndarray:
        items, seqs = table["item_id"].to_pylist(), table["click_seq"].to_pylist()
        return np.array([item in (seq or []) for item, seq in zip(items, seqs, strict=True)])

    hit, hit_off = in_click_history(logs), in_click_history(logs_off)
    assert hit.mean() > 1.5 * hit_off.mean()  # items re-shown from the user's own clicks
    p_click = oracle["p_click"].to_numpy()
    click = logs["click"].to_numpy().astype(bool)
    # The oracle holds the pull of the history: re-shown clicked items are likelier clicks, and the labels agree.
    assert p_click[hit].mean() > 2 * p_click[~hit].mean()
    assert click[hit].mean() > 2 * click[~hit].mean()
    # The intercepts are re-solved: the mean CTR stays near its target.
    assert abs(p_click.mean() - gen.TARGET_CTR) < 0.1 * gen.TARGET_CTR
