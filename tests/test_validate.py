"""Validation of behaviour logs: file-level problems fail loudly, bad rows go to the quarantine with a reason."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.spec import FeatureSpec, load_feature_spec, parse_feature_spec
from features.validate import (
    DataValidationError,
    TooManyBadRowsError,
    ValidationCounts,
    check_file_schema,
    check_files,
    counts_of,
    expected_columns,
    validate_rows,
    write_quarantine,
)

SPEC_PATH = Path(__file__).resolve().parents[1] / "configs" / "features" / "behaviour_logs.yaml"

# The logs' schema as documented in configs/features/behaviour_logs.yaml, written out by hand so these tests do not
# depend on the generator.
SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("ts", pa.timestamp("ms")),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("category_id", pa.int64()),
        ("seller_id", pa.int64()),
        ("hour", pa.int32()),
        ("slot", pa.int32()),
        ("device", pa.string()),
        ("price", pa.float32()),
        ("item_ctr_7d", pa.float32()),
        ("user_activity", pa.float32()),
        ("click_seq", pa.list_(pa.int64())),
        ("cart_seq", pa.list_(pa.int64())),
        ("purchase_seq", pa.list_(pa.int64())),
        ("click", pa.int8()),
        ("conversion", pa.int8()),
        ("dwell_seconds", pa.float32()),
    ]
)


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec(SPEC_PATH)


def good_rows(n: int = 6) -> list[dict[str, Any]]:
    """n valid rows: clicks on odd rows, a conversion and dwell only on clicked rows, a null (empty) sequence."""
    rows = []
    for i in range(n):
        click = i % 2
        rows.append(
            {
                "request_id": 1000 + i,
                "ts": 1_767_225_600_000 + i,
                "user_id": 10 + i,
                "item_id": 20 + i,
                "category_id": 3,
                "seller_id": 4,
                "hour": i % 24,
                "slot": i,
                "device": "ios",
                "price": 9.5 + i,
                "item_ctr_7d": 0.05,
                "user_activity": 2.0,
                "click_seq": [5, 6] if i else None,  # a null list is an empty history, not an error
                "cart_seq": [],
                "purchase_seq": [7],
                "click": click,
                "conversion": 1 if i == 3 else 0,
                "dwell_seconds": 12.5 * click,
            }
        )
    return rows


def make_table(rows: list[dict[str, Any]], schema: pa.Schema = SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def with_bad(index: int, **changes: Any) -> pa.Table:
    """Good rows with row ``index`` changed."""
    rows = good_rows()
    rows[index].update(changes)
    return make_table(rows)


def only_reason(table: pa.Table, spec: FeatureSpec) -> tuple[pa.Table, str]:
    """Validate a table with exactly one bad row; return (clean, reason)."""
    clean, bad = validate_rows(table, spec, source="part-0.parquet")
    assert bad.num_rows == 1, bad.to_pylist()
    assert clean.num_rows == table.num_rows - 1
    return clean, bad.column("reason")[0].as_py()


# ---- schema ----------------------------------------------------------------------------------------------------------
def test_expected_columns_follow_the_spec(spec: FeatureSpec) -> None:
    cols = expected_columns(spec)
    assert list(cols)[:3] == ["request_id", "user_id", "ts"]  # keys first, then features and labels as in the spec
    assert set(cols) == set(SCHEMA.names)
    assert cols["request_id"] == "int"
    assert cols["ts"] == "timestamp"
    assert cols["device"] == "string"
    assert cols["click_seq"] == "list<int>"
    assert cols["price"] == "float"
    assert cols["click"] == "label_binary"
    assert cols["dwell_seconds"] == "label_float"


def test_good_file_passes(tmp_path: Path, spec: FeatureSpec) -> None:
    path = tmp_path / "good.parquet"
    pq.write_table(make_table(good_rows()), path)
    assert check_file_schema(path, spec).names == SCHEMA.names
    check_files([path], spec)


def test_compatible_widths_are_accepted(tmp_path: Path, spec: FeatureSpec) -> None:
    widths = {
        "request_id": pa.uint64(),
        "ts": pa.int64(),  # epoch
        "user_id": pa.int32(),
        "hour": pa.int8(),
        "device": pa.large_string(),
        "price": pa.float64(),
        "item_ctr_7d": pa.int32(),
        "click_seq": pa.large_list(pa.int32()),
        "click": pa.bool_(),
        "dwell_seconds": pa.int64(),
    }
    schema = pa.schema([pa.field(f.name, widths.get(f.name, f.type)) for f in SCHEMA])
    rows = good_rows()
    for r in rows:
        r.update(ts=int(r["ts"]), click=bool(r["click"]), item_ctr_7d=0, dwell_seconds=int(r["dwell_seconds"]))
    path = tmp_path / "wide.parquet"
    pq.write_table(make_table(rows, schema), path)
    check_file_schema(path, spec)
    clean, bad = validate_rows(pq.read_table(path), spec)
    assert (clean.num_rows, bad.num_rows) == (len(rows), 0)


def test_missing_column_names_file_and_column(tmp_path: Path, spec: FeatureSpec) -> None:
    path = tmp_path / "no_price.parquet"
    pq.write_table(make_table(good_rows()).drop_columns(["price"]), path)
    with pytest.raises(DataValidationError) as err:
        check_file_schema(path, spec)
    assert err.value.file == str(path)
    assert err.value.column == "price"
    assert str(path) in str(err.value) and "price" in str(err.value) and "missing" in str(err.value)


@pytest.mark.parametrize(
    ("column", "bad_type", "value"),
    [
        ("user_id", pa.string(), "u1"),
        ("price", pa.string(), "9.5"),
        ("click_seq", pa.list_(pa.string()), ["a"]),
        ("device", pa.int64(), 1),
        ("ts", pa.string(), "2026-01-01"),
        ("click", pa.float32(), 1.0),
    ],
)
def test_wrong_type_names_file_and_column(
    tmp_path: Path, spec: FeatureSpec, column: str, bad_type: pa.DataType, value: Any
) -> None:
    schema = SCHEMA.set(SCHEMA.get_field_index(column), pa.field(column, bad_type))
    rows = good_rows()
    for r in rows:
        r[column] = value
    path = tmp_path / "typed.parquet"
    pq.write_table(make_table(rows, schema), path)
    with pytest.raises(DataValidationError) as err:
        check_file_schema(path, spec)
    assert (err.value.file, err.value.column) == (str(path), column)
    assert f"{column}: wrong type" in str(err.value)


def test_unreadable_file_fails_loudly(tmp_path: Path, spec: FeatureSpec) -> None:
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DataValidationError) as err:
        check_file_schema(path, spec)
    assert err.value.file == str(path) and err.value.column is None
    assert str(path) in str(err.value)


def test_truncated_file_fails_loudly(tmp_path: Path, spec: FeatureSpec) -> None:
    path = tmp_path / "truncated.parquet"
    pq.write_table(make_table(good_rows()), path)
    path.write_bytes(path.read_bytes()[:-20])  # a copy cut short: the footer is gone
    with pytest.raises(DataValidationError, match=r"truncated\.parquet"):
        check_file_schema(path, spec)


def test_check_files_reports_every_problem_at_once(tmp_path: Path, spec: FeatureSpec) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(make_table(good_rows()), good)
    missing = tmp_path / "missing.parquet"
    pq.write_table(make_table(good_rows()).drop_columns(["price", "click"]), missing)
    typed = tmp_path / "typed.parquet"
    schema = SCHEMA.set(SCHEMA.get_field_index("item_id"), pa.field("item_id", pa.float64()))
    pq.write_table(make_table(good_rows(), schema), typed)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"\x00" * 64)
    absent = tmp_path / "absent.parquet"

    with pytest.raises(DataValidationError) as err:
        check_files([good, missing, typed, garbage, absent], spec)
    msg = str(err.value)
    assert f"{missing}: price: missing column" in msg
    assert f"{missing}: click: missing column" in msg
    assert f"{typed}: item_id: wrong type double" in msg
    assert f"{garbage}: cannot read" in msg
    assert f"{absent}: cannot read" in msg
    assert str(good) not in msg
    assert len(err.value.problems) == 5
    assert err.value.file is None and err.value.column is None  # several files, several columns


def test_check_files_rejects_an_empty_list(spec: FeatureSpec) -> None:
    with pytest.raises(DataValidationError, match="no Parquet files"):
        check_files([], spec)


def test_validate_rows_rejects_a_table_that_does_not_match_the_spec(spec: FeatureSpec) -> None:
    table = make_table(good_rows()).drop_columns(["user_activity"])
    with pytest.raises(DataValidationError) as err:
        validate_rows(table, spec, source="logs/part-3.parquet")
    assert (err.value.file, err.value.column) == ("logs/part-3.parquet", "user_activity")


# ---- rows ------------------------------------------------------------------------------------------------------------
def test_good_rows_pass_untouched(spec: FeatureSpec) -> None:
    table = make_table(good_rows())
    clean, bad = validate_rows(table, spec, source="a.parquet")
    assert clean.equals(table)
    assert bad.num_rows == 0
    assert bad.schema.names == [*SCHEMA.names, "reason", "source_file"]


def test_clean_rows_keep_values_and_order(spec: FeatureSpec) -> None:
    rows = good_rows()
    rows[1]["user_id"] = None
    rows[4]["price"] = -1.0
    table = make_table(rows)
    clean, bad = validate_rows(table, spec, source="a.parquet")
    assert clean.to_pylist() == [table.slice(i, 1).to_pylist()[0] for i in (0, 2, 3, 5)]
    assert clean.schema == table.schema
    assert bad.column("request_id").to_pylist() == [1001, 1004]  # quarantined rows keep their order too
    assert bad.column("source_file").to_pylist() == ["a.parquet", "a.parquet"]
    assert bad.drop_columns(["reason", "source_file"]).to_pylist() == [table.slice(i, 1).to_pylist()[0] for i in (1, 4)]


@pytest.mark.parametrize(
    ("index", "changes", "reason"),
    [
        (0, {"request_id": None}, "null request_id"),
        (2, {"user_id": None}, "null user_id"),
        (2, {"ts": None}, "null ts"),
        (2, {"item_id": None}, "null item_id"),
        (2, {"device": None}, "null device"),
        (2, {"click": None}, "null click"),
        (3, {"dwell_seconds": None}, "null dwell_seconds"),
        (2, {"price": None}, "null price"),
        (2, {"price": -0.5}, "price < min 0.0"),
        (2, {"item_ctr_7d": 1.5}, "item_ctr_7d > max 1.0"),
        (2, {"user_activity": math.nan}, "NaN user_activity"),
        (2, {"price": math.inf}, "inf price"),
        (3, {"dwell_seconds": -3.0}, "dwell_seconds < min 0.0"),
        (3, {"dwell_seconds": math.nan}, "NaN dwell_seconds"),
        (2, {"click": 2}, "click not in {0,1}"),
        (2, {"conversion": -1}, "conversion not in {0,1}"),
        (2, {"conversion": 1}, "conversion=1 without click"),
        (2, {"dwell_seconds": 4.0}, "dwell_seconds > 0 without click"),
        (2, {"click_seq": [5, None, 6]}, "null element in click_seq"),
        (2, {"purchase_seq": [None]}, "null element in purchase_seq"),
    ],
)
def test_bad_row_is_quarantined_with_its_reason(
    spec: FeatureSpec, index: int, changes: dict[str, Any], reason: str
) -> None:
    table = with_bad(index, **changes)
    clean, got = only_reason(table, spec)
    assert got == reason
    assert index + 1000 not in clean.column("request_id").to_pylist()


def test_first_rule_wins(spec: FeatureSpec) -> None:
    # null id beats a bad label, a bad label beats inconsistency, which beats a bad feature.
    assert only_reason(with_bad(2, user_id=None, click=2, price=-1.0), spec)[1] == "null user_id"
    assert only_reason(with_bad(2, conversion=1, price=-1.0), spec)[1] == "conversion=1 without click"
    assert only_reason(with_bad(2, price=math.nan, click_seq=[None]), spec)[1] == "NaN price"


def test_null_list_is_an_empty_history_but_null_element_is_not(spec: FeatureSpec) -> None:
    rows = good_rows()
    rows[1]["click_seq"] = None
    rows[2]["cart_seq"] = [None]
    # A list array with several chunks exercises the per-chunk offsets.
    table = pa.concat_tables([make_table(rows[:2]), make_table(rows[2:])])
    assert table.column("cart_seq").num_chunks == 2
    clean, bad = validate_rows(table, spec)
    assert bad.column("request_id").to_pylist() == [1002]
    assert bad.column("reason").to_pylist() == ["null element in cart_seq"]
    assert clean.num_rows == 5


def test_fill_null_makes_a_null_dense_value_acceptable() -> None:
    data = {
        "tables": [{"name": "item", "num_buckets": 10, "dim": 4}],
        "sparse": [{"name": "item_id", "column": "item_id", "table": "item"}],
        "dense": [{"name": "price", "column": "price", "fill_null": 0.0}],
        "tasks": [{"name": "ctr", "label": "click", "kind": "binary"}],
    }
    spec = parse_feature_spec(data)
    table = pa.table(
        {
            "request_id": [1, 2],
            "user_id": [1, 2],
            "ts": pa.array([1, 2], pa.timestamp("ms")),
            "item_id": [1, 2],
            "price": pa.array([None, 1.0], pa.float32()),
            "click": pa.array([0, 1], pa.int8()),
        }
    )
    clean, bad = validate_rows(table, spec)
    assert (clean.num_rows, bad.num_rows) == (2, 0)


def test_counts_add_up(spec: FeatureSpec) -> None:
    rows = good_rows(10)
    rows[0]["user_id"] = None
    rows[1]["conversion"] = 1  # row 1 is a click: fine
    rows[2]["conversion"] = 1  # row 2 is not: bad
    rows[4]["click"] = 3
    rows[6]["user_id"] = None
    table = make_table(rows)
    clean, bad = validate_rows(table, spec)
    counts = counts_of(clean, bad)
    assert counts.rows_read == table.num_rows == counts.rows_used + counts.rows_quarantined
    assert (counts.rows_used, counts.rows_quarantined) == (6, 4)
    assert counts.by_reason == {"null user_id": 2, "conversion=1 without click": 1, "click not in {0,1}": 1}

    merged = counts.merge(counts_of(*validate_rows(make_table(good_rows(3)), spec)))
    assert (merged.rows_read, merged.rows_used, merged.rows_quarantined) == (13, 9, 4)
    assert merged.by_reason == counts.by_reason
    assert counts.rows_read == 10  # merge does not change its inputs


def test_counts_refuse_to_lose_rows() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        ValidationCounts(rows_read=10, rows_used=8, rows_quarantined=1, by_reason={"x": 1})
    with pytest.raises(ValueError, match="add up"):
        ValidationCounts(rows_read=10, rows_used=8, rows_quarantined=2, by_reason={"x": 1})


def test_too_many_bad_rows_raises_with_counts_and_path() -> None:
    counts = ValidationCounts(rows_read=100, rows_used=95, rows_quarantined=5, by_reason={"null user_id": 3, "x": 2})
    assert counts.bad_fraction() == pytest.approx(0.05)
    with pytest.raises(TooManyBadRowsError) as err:
        counts.check(0.01, "runs/demo/quarantine.parquet")
    msg = str(err.value)
    assert "5 of 100 rows" in msg
    assert "null user_id: 3" in msg and "x: 2" in msg
    assert "runs/demo/quarantine.parquet" in msg
    assert isinstance(err.value, DataValidationError)
    assert err.value.quarantine_path == "runs/demo/quarantine.parquet"

    counts.check(0.05, "q.parquet")  # at the limit: fine
    counts.check(0.10, "q.parquet")
    ValidationCounts().check(0.0, "q.parquet")  # nothing read: nothing bad


# ---- quarantine file -------------------------------------------------------------------------------------------------
def test_write_quarantine_concatenates_files(tmp_path: Path, spec: FeatureSpec) -> None:
    _, bad_a = validate_rows(with_bad(0, user_id=None), spec, source="a.parquet")
    wide = SCHEMA.set(SCHEMA.get_field_index("hour"), pa.field("hour", pa.int64()))  # another width, same meaning
    rows = good_rows()
    rows[2]["click"] = 5
    _, bad_b = validate_rows(make_table(rows, wide), spec, source="b.parquet")
    path = tmp_path / "q" / "quarantine.parquet"
    assert write_quarantine([bad_a, bad_b], path) == 2
    back = pq.read_table(path)
    assert back.column("source_file").to_pylist() == ["a.parquet", "b.parquet"]
    assert back.column("reason").to_pylist() == ["null user_id", "click not in {0,1}"]


def test_write_quarantine_with_no_bad_rows_writes_a_valid_file(tmp_path: Path, spec: FeatureSpec) -> None:
    _, bad = validate_rows(make_table(good_rows()), spec, source="a.parquet")
    path = tmp_path / "quarantine.parquet"
    assert write_quarantine([bad], path) == 0
    back = pq.read_table(path)
    assert back.num_rows == 0
    assert back.schema.names == [*SCHEMA.names, "reason", "source_file"]

    path2 = tmp_path / "quarantine2.parquet"
    assert write_quarantine([], path2, schema=SCHEMA) == 0
    assert pq.read_schema(path2).names == [*SCHEMA.names, "reason", "source_file"]
    assert write_quarantine([], path2) == 0  # without a schema: still a valid file with the reason columns
    assert pq.read_schema(path2).names == ["reason", "source_file"]


# ---- nothing hard-coded ----------------------------------------------------------------------------------------------
def test_a_spec_with_other_column_names_validates_its_own_columns(tmp_path: Path) -> None:
    spec = parse_feature_spec(
        {
            "keys": {"request_id": "rid", "user_id": "member", "timestamp": "event_time"},
            "tables": [{"name": "member", "num_buckets": 10, "dim": 4}, {"name": "song", "num_buckets": 10, "dim": 4}],
            "sparse": [
                {"name": "member", "column": "member", "table": "member", "id_type": "string"},
                {"name": "song", "column": "song_id", "table": "song"},
            ],
            "sequences": [{"name": "plays", "column": "played", "behaviour": "play", "table": "song", "max_length": 5}],
            "dense": [{"name": "tempo", "column": "bpm", "min": 40, "max": 240}],
            "tasks": [
                {"name": "play", "label": "played_30s", "kind": "binary"},
                {"name": "like", "label": "liked", "kind": "binary", "esmm_parent": "play"},
                {"name": "listen", "label": "listen_min", "kind": "regression", "given": "play", "max": 60},
            ],
        }
    )
    assert expected_columns(spec) == {
        "rid": "int",
        "member": "string",  # a key that is a string feature is expected as a string
        "event_time": "timestamp",
        "song_id": "int",
        "played": "list<int>",
        "bpm": "float",
        "played_30s": "label_binary",
        "liked": "label_binary",
        "listen_min": "label_float",
    }
    table = pa.table(
        {
            "rid": [1, 2, 3, 4, 5, 6, 7],
            "member": ["a", "b", None, "d", "e", "f", "g"],
            "event_time": pa.array(range(7), pa.timestamp("s")),
            "song_id": [1, 2, 3, 4, 5, 6, 7],
            "played": [[1], None, [2], [None], [3], [4], [5]],
            "bpm": [120.0, 90.0, 100.0, 100.0, 300.0, 100.0, 100.0],
            "played_30s": [1, 0, 1, 1, 1, 0, 0],
            "liked": [1, 0, 0, 0, 0, 1, 0],
            "listen_min": [3.0, 0.0, 1.0, 1.0, 1.0, 0.0, 61.0],
        }
    )
    clean, bad = validate_rows(table, spec, source="songs.parquet")
    assert clean.column("rid").to_pylist() == [1, 2]
    assert dict(zip(bad.column("rid").to_pylist(), bad.column("reason").to_pylist(), strict=True)) == {
        3: "null member",
        4: "null element in played",
        5: "bpm > max 240.0",
        6: "liked=1 without played_30s",
        7: "listen_min > max 60.0",
    }

    # The file check uses the same names: the behaviour-log columns mean nothing here.
    path = tmp_path / "songs.parquet"
    pq.write_table(table.drop_columns(["bpm"]), path)
    with pytest.raises(DataValidationError) as err:
        check_file_schema(path, spec)
    assert (err.value.file, err.value.column) == (str(path), "bpm")
    assert "price" not in str(err.value) and "user_id" not in str(err.value)


# ---- logs without a request id ---------------------------------------------------------------------------------------
def test_a_spec_without_request_id_accepts_logs_without_that_column(tmp_path: Path, spec: FeatureSpec) -> None:
    no_id = spec.model_copy(update={"keys": spec.keys.model_copy(update={"request_id": None})})
    path = tmp_path / "no_id.parquet"
    table = make_table(good_rows())
    pq.write_table(table.drop_columns(["request_id"]), path)
    assert "request_id" not in expected_columns(no_id)
    check_files([path], no_id)
    clean, bad = validate_rows(pq.read_table(path), no_id, source=str(path))
    assert clean.num_rows == table.num_rows and bad.num_rows == 0
    assert no_id.row_key == "_row_id" and spec.row_key == "request_id"


def test_row_ids_are_stable_per_file_and_row() -> None:
    from features.spec import row_ids

    a = row_ids("/mnt/a/dt=2026-01-01/part-0.parquet", 0, 5)
    assert (a == row_ids("/elsewhere/dt=2026-01-01/part-0.parquet", 0, 5)).all()  # the mount point does not count
    assert (row_ids("/mnt/a/dt=2026-01-01/part-0.parquet", 3, 2) == a[3:]).all()
    other = row_ids("/mnt/a/dt=2026-01-02/part-0.parquet", 0, 5)
    assert not set(a.tolist()) & set(other.tolist())
    assert a.dtype.name == "int64" and (a >= 0).all()
