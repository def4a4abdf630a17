"""MovieLens 100K converter: histories hold only strictly earlier ratings (same-second ratings excluded), newest first
and capped; labels; genre lists; daily partitions by UTC date. On the real files (skipped where they are missing): the
28-day evaluation window, and the spec, the experiment config, validation and the transform accept the output."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from features.movielens import (
    GENRES,
    ITEMS_FILE,
    RATINGS_FILE,
    SCHEMA,
    USERS_FILE,
    MovieLensConversion,
    bucket_collisions,
    convert_movielens,
    history_lists,
)
from features.spec import IdType, load_feature_spec
from features.stats import DenseStats
from features.transform import BatchTransform
from features.validate import SUCCESS_MARKER, check_files, validate_rows

REPO = Path(__file__).resolve().parent.parent
SRC = REPO.parent / "shared" / "data" / "movielens_100k"
if not SRC.is_dir():  # the data sits beside the checkout; also accept the absolute shared path
    SRC = Path("/work/shared/data/movielens_100k")
SPEC_YAML = REPO / "configs" / "features" / "movielens.yaml"
EXPERIMENT = REPO / "configs" / "experiments" / "movielens.yaml"

DAY = 86_400
T0 = int(dt.datetime(1997, 9, 20, tzinfo=dt.UTC).timestamp())  # midnight UTC

#: (user, movie, rating, timestamp). User 1 rates movies 2 and 3 in the same second, then 4 a second later; user 2
#: rates at the last second of 1997-09-20 and at the first of 1997-09-21 (UTC); user 3 rates five movies at once.
RATINGS = [
    (1, 1, 5, T0 + 100),
    (1, 2, 4, T0 + 200),
    (1, 3, 1, T0 + 200),
    (1, 4, 2, T0 + 201),
    (1, 5, 3, T0 + DAY + 5),
    (2, 1, 3, T0 + DAY - 1),
    (2, 6, 5, T0 + DAY),
    *((3, m, 4, T0 + 2 * DAY + 7) for m in range(1, 6)),
    (3, 6, 2, T0 + 2 * DAY + 8),
]

#: movie -> set genre flags (names from GENRES).
MOVIE_GENRES = {
    1: ["Animation", "Children's", "Comedy"],
    2: ["Action"],
    3: ["unknown"],
    4: ["Drama", "Romance"],
    5: ["Western"],
    6: ["Sci-Fi", "Thriller", "War"],
}


def write_inputs(folder: Path, ratings: list[tuple[int, int, int, int]] = RATINGS) -> Path:
    """The three shared files' schemas (brotli Parquet), with a few users and movies."""
    folder.mkdir(parents=True, exist_ok=True)
    users, movies, stars, stamps = (list(c) for c in zip(*ratings, strict=True))
    pl.DataFrame(
        {"user_id": users, "movie_id": movies, "rating": stars, "timestamp": stamps},
        schema={"user_id": pl.Int64, "movie_id": pl.Int64, "rating": pl.Int64, "timestamp": pl.Int64},
    ).write_parquet(folder / RATINGS_FILE, compression="brotli")
    pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "age": [24, 53, 7],
            "gender": ["M", "F", "M"],
            "occupation": ["technician", "other", "student"],
            "zip_code": ["85711", "94043", "t8h1n"],
        }
    ).write_parquet(folder / USERS_FILE, compression="brotli")
    ids = sorted(MOVIE_GENRES)
    items: dict[str, list] = {
        "movie_id": ids,
        "movie_title": [f"Movie {m} (1995)" for m in ids],
        "release_date": ["01-Jan-1995"] * len(ids),
        "video_release_date": [None] * len(ids),
        "IMDb_URL": [f"http://example.org/{m}" for m in ids],
    }
    for genre in GENRES:
        items[genre] = [int(genre in MOVIE_GENRES[m]) for m in ids]
    pl.DataFrame(items, schema_overrides={"video_release_date": pl.Float64}).write_parquet(
        folder / ITEMS_FILE, compression="brotli"
    )
    return folder


@pytest.fixture
def tiny(tmp_path: Path) -> MovieLensConversion:
    return convert_movielens(write_inputs(tmp_path / "src"), tmp_path / "data")


def _rows(result: MovieLensConversion) -> dict[tuple[int, int], dict]:
    """(user, movie) -> the written row, over every partition."""
    rows = pa.concat_tables([pq.read_table(result.files[d]) for d in result.dates]).to_pylist()
    return {(r["user_id"], r["movie_id"]): r for r in rows}


def test_histories_hold_only_strictly_earlier_ratings_newest_first(tiny: MovieLensConversion) -> None:
    rows = _rows(tiny)
    first = rows[(1, 1)]
    assert first["hist_rated"] == first["hist_liked"] == first["hist_disliked"] == []
    # Movies 2 and 3 share one second: neither is in the other's history.
    for movie in (2, 3):
        assert rows[(1, movie)]["hist_rated"] == [1]
        assert rows[(1, movie)]["hist_liked"] == [1]
        assert rows[(1, movie)]["hist_disliked"] == []
    # One second later both are history; same-second ratings are ordered by movie id, higher first.
    fourth = rows[(1, 4)]
    assert fourth["hist_rated"] == [3, 2, 1]
    assert fourth["hist_liked"] == [2, 1]  # ratings 4 and 5
    assert fourth["hist_disliked"] == [3]  # rating 1 (movie 4's own 2 is not history)
    fifth = rows[(1, 5)]
    assert fifth["hist_rated"] == [4, 3, 2, 1]
    assert fifth["hist_disliked"] == [4, 3]
    # Histories are per user: user 2 never sees user 1's ratings.
    assert rows[(2, 1)]["hist_rated"] == [] and rows[(2, 6)]["hist_rated"] == [1]
    assert rows[(2, 6)]["hist_liked"] == [] and rows[(2, 6)]["hist_disliked"] == []
    # Five ratings in one second: none sees another; the next second sees all five.
    assert all(rows[(3, m)]["hist_rated"] == [] for m in range(1, 6))
    assert rows[(3, 6)]["hist_rated"] == rows[(3, 6)]["hist_liked"] == [5, 4, 3, 2, 1]


def test_histories_are_capped_to_the_newest(tmp_path: Path) -> None:
    result = convert_movielens(write_inputs(tmp_path / "src"), tmp_path / "data", max_history=2)
    rows = _rows(result)
    assert rows[(1, 5)]["hist_rated"] == [4, 3]
    assert rows[(1, 5)]["hist_liked"] == [2, 1]
    assert rows[(3, 6)]["hist_rated"] == [5, 4]
    with pytest.raises(ValueError, match="max_history"):
        convert_movielens(tmp_path / "src", tmp_path / "other", max_history=0)


def test_history_lists_match_a_direct_definition() -> None:
    """Random ratings with many ties against the definition, row by row."""
    rng = np.random.default_rng(0)
    n = 400
    user = np.sort(rng.integers(0, 6, n))
    ts = np.zeros(n, dtype=np.int64)
    for u in np.unique(user):
        ts[user == u] = np.sort(rng.integers(0, 15, np.count_nonzero(user == u)))  # about 5 ratings per second
    item = rng.integers(0, 1000, n)
    stars = rng.integers(1, 6, n)
    keep = stars >= 4
    got = history_lists(user, ts, item, keep, 7).to_pylist()
    for i in range(n):
        earlier = [j for j in range(n) if user[j] == user[i] and ts[j] < ts[i] and keep[j]]
        assert got[i] == [int(item[j]) for j in reversed(earlier)][:7], i
    with pytest.raises(ValueError, match="sorted"):
        history_lists(user[::-1].copy(), ts, item, keep, 7)


def test_labels(tiny: MovieLensConversion) -> None:
    rows = _rows(tiny)
    stars = {(u, m): r for u, m, r, _ in RATINGS}
    assert len(rows) == len(RATINGS)
    for key, row in rows.items():
        assert row["rating"] == stars[key]
        assert row["liked"] == int(stars[key] >= 4)
        assert row["loved"] == int(stars[key] == 5)
        assert row["loved"] <= row["liked"]  # the ESMM child implies its parent


def test_genres_and_user_attributes(tiny: MovieLensConversion) -> None:
    rows = _rows(tiny)
    for (_, movie), row in rows.items():
        assert row["genres"] == sorted(GENRES.index(g) for g in MOVIE_GENRES[movie])
    assert rows[(1, 1)]["genres"] == [3, 4, 5]  # Animation, Children's, Comedy: several ids in one row
    assert rows[(1, 3)]["genres"] == [0]  # unknown
    assert (rows[(1, 1)]["age"], rows[(1, 1)]["gender"], rows[(1, 1)]["occupation"]) == (24.0, "M", "technician")
    assert rows[(1, 1)]["zip_prefix"] == "857"
    assert rows[(3, 1)]["zip_prefix"] == "T8H"  # a Canadian postal code: its forward sortation area


def test_daily_partitions_by_utc_date(tiny: MovieLensConversion) -> None:
    out = tiny.out_dir
    assert tiny.dates == ["1997-09-20", "1997-09-21", "1997-09-22"]
    assert sorted(p.name for p in out.iterdir()) == [f"dt={d}" for d in tiny.dates]
    for date in tiny.dates:
        folder = out / f"dt={date}"
        assert sorted(p.name for p in folder.iterdir()) == [SUCCESS_MARKER, "part-00000.parquet"]
        table = pq.read_table(folder / "part-00000.parquet")
        assert table.schema.remove_metadata() == SCHEMA
        stamps = table.column("timestamp").to_pylist()
        assert all(s.date().isoformat() == date for s in stamps)
        assert stamps == sorted(stamps)
        assert table.num_rows == tiny.rows[date]
    rows = _rows(tiny)
    # The last second of a UTC day and the first of the next land in different partitions.
    assert rows[(2, 1)]["timestamp"] == dt.datetime(1997, 9, 20, 23, 59, 59)
    assert rows[(2, 6)]["timestamp"] == dt.datetime(1997, 9, 21, 0, 0, 0)
    assert tiny.rows == {"1997-09-20": 5, "1997-09-21": 2, "1997-09-22": 6}
    # A new conversion replaces the old partitions.
    again = convert_movielens(write_inputs(out.parent / "src2", RATINGS[:1]), out)
    assert sorted(p.name for p in out.iterdir()) == ["dt=1997-09-20"] and again.rows == {"1997-09-20": 1}


def test_ratings_of_unknown_users_or_movies_fail(tmp_path: Path) -> None:
    src = write_inputs(tmp_path / "src", [*RATINGS, (9, 1, 3, T0)])
    with pytest.raises(ValueError, match="missing from the users/items file"):
        convert_movielens(src, tmp_path / "data")


# ---- the real files ----------------------------------------------------------------------------------------------
needs_data = pytest.mark.skipif(not (SRC / RATINGS_FILE).exists(), reason="MovieLens 100K not available")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> MovieLensConversion:
    return convert_movielens(SRC, tmp_path_factory.mktemp("movielens") / "data")


@needs_data
def test_real_data_evaluation_and_validation_windows(converted: MovieLensConversion, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.ingest import split_validation
    from pipeline.partitions import discover_partitions, split_windows

    cfg = load_config(EXPERIMENT, [f"data.path={converted.out_dir}", f"run_dir={tmp_path}"])
    assert (cfg.data.eval_days, cfg.data.validation_days) == (28, 28)
    assert cfg.train.validation.metric == "liked.auc"
    assert cfg.mlflow.experiment == cfg.mlflow.model_name == "mtrec-movielens"

    parts = discover_partitions(converted.out_dir)
    assert len(parts) == 213 and sum(converted.rows.values()) == 100_000
    before, evaluation = split_windows(list(parts), cfg.data.train_days, cfg.data.eval_days)
    train, validation = split_validation(before, cfg.data.validation_days)
    assert (evaluation[0], evaluation[-1]) == ("1998-03-26", "1998-04-22")
    rows = {name: sum(converted.rows[d] for d in dates) for name, dates in [("eval", evaluation), ("val", validation)]}
    assert rows == {"eval": 16_609, "val": 7_890}  # the data README: 16,609 ratings in the last 28 dates
    eval_users = pl.read_parquet([parts[d][0] for d in evaluation], columns=["user_id"])["user_id"].unique()
    seen = pl.read_parquet([parts[d][0] for d in [*train, *validation]], columns=["user_id"])["user_id"].unique()
    assert len(eval_users) == 239 and len(set(eval_users) - set(seen)) == 159  # cold users
    assert len(train) == 157


@needs_data
def test_real_data_passes_validation_and_the_transform(converted: MovieLensConversion) -> None:
    spec = load_feature_spec(SPEC_YAML)
    files = [converted.files[d] for d in converted.dates]
    check_files(files, spec)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    clean, bad = validate_rows(table, spec, source="all")
    assert bad.num_rows == 0 and clean.num_rows == 100_000
    assert pc.max(table.column("genres").combine_chunks().value_lengths()).as_py() == 6
    assert pc.max(table.column("hist_rated").combine_chunks().value_lengths()).as_py() == 50

    batch_table = pq.read_table(converted.files["1998-04-22"]).slice(0, 256)
    batch = BatchTransform(spec, DenseStats.identity([d.name for d in spec.dense]))(batch_table)
    assert batch.batch_size == 256
    assert batch.dense.shape == (256, 1)
    assert set(batch.labels) == {"liked", "loved", "rating"}
    lengths = batch.sparse.length_per_key()
    keys = batch.sparse.keys()
    assert lengths[keys.index("movie_id")] == 256
    assert lengths[keys.index("genres")] == sum(len(g) for g in batch_table.column("genres").to_pylist())


@needs_data
def test_table_sizes_as_documented(converted: MovieLensConversion) -> None:
    """The spec's sizes: every user, genre, gender, occupation and zip prefix gets a row of its own; 11 movie ids
    share one."""
    spec = load_feature_spec(SPEC_YAML)
    table = pa.concat_tables([pq.read_table(converted.files[d]) for d in converted.dates])
    columns = {f.table: (f.column, f.id_type) for f in spec.sparse}
    columns["genre"] = ("genres", IdType.int)
    collisions = {}
    for name, (column, id_type) in columns.items():
        values = table.column(column).combine_chunks()
        if name == "genre":
            values = values.flatten()
        collisions[name] = bucket_collisions(values, spec.table(name).num_buckets, id_type)
    assert collisions == {"user": 0, "movie": 11, "gender": 0, "occupation": 0, "zip_prefix": 0, "genre": 0}
