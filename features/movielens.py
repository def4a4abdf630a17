r"""MovieLens 100K (GroupLens) -> daily Parquet partitions in the pipeline's layout: real behaviour logs to train on.

    python -m features.movielens ../shared/data/movielens_100k runs/movielens/data

One row per rating (100,000), in ``out_dir/dt=YYYY-MM-DD/part-00000.parquet`` by the UTC date of the rating's
timestamp (213 dates, 1997-09-20 .. 1998-04-22; only dates with ratings get a folder), each folder closed by the
``_SUCCESS`` marker that the ingest stage's partition discovery waits for. Within a partition rows are ordered by
(timestamp, user_id, movie_id); the experiment config shuffles globally.

Columns (``configs/features/movielens.yaml`` reads them):

* ``user_id`` (int64): the rater; a key (GAUC groups by it) and an id feature.
* ``movie_id`` (int64): the rated movie, i.e. the candidate item.
* ``timestamp`` (timestamp[ms] holding whole seconds, UTC without a zone attached): when the rating was given.
* ``age`` (float32): the user's age in years (7-73), a dense feature.
* ``gender`` (string, ``M``/``F``), ``occupation`` (string, 21 values).
* ``zip_prefix`` (string): the first three characters of the zip code, upper-cased (the US sectional centre; the 18
  users with Canadian postal codes get their forward sortation area), an id: nearby users share it, where a full zip
  code would be nearly unique.
* ``genres`` (list<int64>, 1-6 ids per row): the candidate movie's genre flags as indices into :data:`GENRES`
  (0 = unknown ... 18 = Western). Every movie has at least one flag.
* ``hist_liked`` / ``hist_disliked`` / ``hist_rated`` (list<int64>): movie ids the same user rated strictly earlier in
  time (an earlier timestamp, not an earlier row: a user often rates several movies within one second) with
  rating >= 4 / rating <= 2 / any rating; newest first (ties of one second: higher movie id first), at most
  ``max_history`` (50). The row's own rating and every rating sharing its second are never in them, so no label leaks.
* labels: ``liked`` (int8, rating >= 4), ``loved`` (int8, rating == 5; ``loved`` implies ``liked``, so the spec makes it
  an ESMM child of ``liked``), ``rating`` (float32, 1-5, the regression target on every row).

Not written: the movie title, URL and release dates (text, not used by this spec).

Evaluation window. The ingest stage evaluates on the last ``data.eval_days`` partitions; with ``eval_days: 28`` that is
1998-03-26 .. 1998-04-22, 16,609 ratings by 239 users, 159 of whom rated nothing before (cold users). The 28
partitions before it are the validation window of ``configs/experiments/movielens.yaml`` (7,890 ratings).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.generator import clear_partitions
from features.spec import IdType
from features.transform import hash_ids
from features.validate import SUCCESS_MARKER

__all__ = [
    "GENRES",
    "ITEMS_FILE",
    "RATINGS_FILE",
    "SCHEMA",
    "USERS_FILE",
    "MovieLensConversion",
    "bucket_collisions",
    "build_table",
    "convert_movielens",
    "history_lists",
    "read_movielens",
]

RATINGS_FILE = "MovieLens100k_data.parquet.brotli"
USERS_FILE = "MovieLens100k_users.parquet.brotli"
ITEMS_FILE = "MovieLens100k_items.parquet.brotli"

#: The items file's genre flag columns, in file order; a genre id is the index here.
GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

#: History column -> which earlier ratings it keeps.
HISTORIES: dict[str, pl.Expr] = {
    "hist_liked": pl.col("rating") >= 4,
    "hist_disliked": pl.col("rating") <= 2,
    "hist_rated": pl.lit(True),
}

#: The columns written, in order, with their types (see the module docstring).
SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("movie_id", pa.int64()),
        ("timestamp", pa.timestamp("ms")),  # Parquet has no second unit: ms on disk either way
        ("age", pa.float32()),
        ("gender", pa.string()),
        ("occupation", pa.string()),
        ("zip_prefix", pa.string()),
        ("genres", pa.list_(pa.int64())),
        *((name, pa.list_(pa.int64())) for name in HISTORIES),
        ("liked", pa.int8()),
        ("loved", pa.int8()),
        ("rating", pa.float32()),
    ]
)


@dataclass(frozen=True)
class MovieLensConversion:
    """What :func:`convert_movielens` wrote: one Parquet file and its row count per date."""

    out_dir: Path
    files: dict[str, Path]  # date -> part file
    rows: dict[str, int]  # date -> rows
    max_history: int

    @property
    def dates(self) -> list[str]:
        return sorted(self.files)


def read_movielens(src_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(ratings, users, items) as in the shared folder's README."""
    src_dir = Path(src_dir)
    return (
        pl.read_parquet(src_dir / RATINGS_FILE),
        pl.read_parquet(src_dir / USERS_FILE),
        pl.read_parquet(src_dir / ITEMS_FILE),
    )


def history_lists(
    user: np.ndarray, ts: np.ndarray, item: np.ndarray, keep: np.ndarray, max_length: int
) -> pa.ListArray:
    """Per row: the ``item`` of the same user's ``keep`` rows with a strictly smaller ``ts``, newest first, at most
    ``max_length``. The rows must be sorted by (user, ts, ...).

    No loop over rows: a row's history is a contiguous slice of the kept rows (they stay in sorted order), ending just
    before the first row of its (user, ts) group and starting no earlier than the user's first row, read backwards.
    """
    n = len(user)
    keep = np.asarray(keep, dtype=bool)
    if not (len(ts) == len(item) == len(keep) == n):
        raise ValueError("user, ts, item and keep must have one element per row")
    if n == 0:
        return pa.ListArray.from_arrays(pa.array([0], pa.int32()), pa.array([], pa.int64()))
    if np.any((np.diff(user) < 0) | ((np.diff(user) == 0) & (np.diff(ts) < 0))):
        raise ValueError("rows must be sorted by (user, timestamp)")
    index = np.arange(n)
    new_user = np.r_[True, user[1:] != user[:-1]]
    new_group = new_user | np.r_[True, ts[1:] != ts[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, index, 0))
    group_start = np.maximum.accumulate(np.where(new_group, index, 0))
    kept_before = np.r_[0, np.cumsum(keep, dtype=np.int64)]  # kept rows with a sorted index < i
    kept_items = item[keep].astype(np.int64)
    hi = kept_before[group_start]
    lo = np.maximum(kept_before[user_start], hi - max_length)
    lengths = hi - lo
    offsets = np.r_[0, np.cumsum(lengths)]
    # Element k of row r is kept_items[hi[r] - 1 - (k - offsets[r])]: newest (highest sorted index) first.
    gather = np.repeat(hi - 1 + offsets[:-1], lengths) - np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(kept_items[gather], pa.int64()))


def _genre_lists(items: pl.DataFrame) -> pl.DataFrame:
    """movie_id -> ``genres``: indices of the movie's set flags, ascending."""
    missing = [g for g in GENRES if g not in items.columns]
    if missing:
        raise ValueError(f"items file lacks genre columns {missing}")
    flags = items.select(GENRES).to_numpy().astype(bool)
    rows, cols = np.nonzero(flags)  # row-major: each movie's genres come together, ascending
    offsets = np.r_[0, np.cumsum(np.bincount(rows, minlength=len(items)))]
    genres = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(cols.astype(np.int64), pa.int64()))
    return pl.DataFrame({"movie_id": items["movie_id"], "genres": pl.Series("genres", genres)})


def build_table(ratings: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame, max_history: int = 50) -> pl.DataFrame:
    """Every rating as one row with the columns of the module docstring (and ``dt``, the UTC date as text), sorted by
    (timestamp, user_id, movie_id)."""
    df = ratings.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("movie_id").cast(pl.Int64),
        pl.col("rating").cast(pl.Int64),
        pl.col("timestamp").cast(pl.Int64).alias("ts_s"),
    ).sort("user_id", "ts_s", "movie_id")
    bad = df.filter(~pl.col("rating").is_between(1, 5))
    if bad.height:
        raise ValueError(f"{bad.height} rating(s) outside 1-5")
    user, ts, movie = (df[c].to_numpy() for c in ("user_id", "ts_s", "movie_id"))
    # with_columns broadcasts a literal condition (hist_rated's) to every row.
    keeps = df.with_columns(*(keep.alias(name) for name, keep in HISTORIES.items()))
    histories = {
        name: pl.Series(name, history_lists(user, ts, movie, keeps[name].to_numpy(), max_history)) for name in HISTORIES
    }
    df = df.with_columns(**histories)

    user_attrs = users.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("age").cast(pl.Float32),
        pl.col("gender").cast(pl.String),
        pl.col("occupation").cast(pl.String),
        pl.col("zip_code").cast(pl.String).str.strip_chars().str.slice(0, 3).str.to_uppercase().alias("zip_prefix"),
    )
    n = df.height
    df = df.join(user_attrs, on="user_id", how="left").join(_genre_lists(items), on="movie_id", how="left")
    if df.height != n:
        raise ValueError("users or items file repeats an id")
    for col in ("age", "gender", "occupation", "zip_prefix", "genres"):
        nulls = df[col].null_count()
        if nulls:
            raise ValueError(f"{nulls} rating(s) of a user or movie missing from the users/items file ({col})")

    return df.with_columns(
        pl.from_epoch("ts_s", time_unit="s").alias("timestamp"),
        pl.from_epoch("ts_s", time_unit="s").dt.date().cast(pl.String).alias("dt"),
        (pl.col("rating") >= 4).cast(pl.Int8).alias("liked"),
        (pl.col("rating") == 5).cast(pl.Int8).alias("loved"),
        pl.col("rating").cast(pl.Float32),
    ).sort("ts_s", "user_id", "movie_id")


def _arrow(df: pl.DataFrame) -> pa.Table:
    """The written schema (polars would write large/view types and microsecond timestamps)."""
    return df.select(SCHEMA.names).to_arrow().cast(SCHEMA)


def convert_movielens(src_dir: Path, out_dir: Path, max_history: int = 50) -> MovieLensConversion:
    """Convert the three files in ``src_dir`` into ``out_dir/dt=YYYY-MM-DD/part-00000.parquet`` + ``_SUCCESS`` (see the
    module). Earlier ``dt=`` folders in ``out_dir`` are removed first. Deterministic: same inputs, same files."""
    if max_history <= 0:
        raise ValueError(f"max_history must be positive, got {max_history}")
    out_dir = Path(out_dir)
    ratings, users, items = read_movielens(src_dir)
    df = build_table(ratings, users, items, max_history)
    clear_partitions(out_dir)
    files: dict[str, Path] = {}
    rows: dict[str, int] = {}
    for (date,), part in df.partition_by("dt", as_dict=True, maintain_order=True).items():
        folder = out_dir / f"dt={date}"
        folder.mkdir()
        path = folder / "part-00000.parquet"
        pq.write_table(_arrow(part), path)
        (folder / SUCCESS_MARKER).touch()  # last: the partition is complete
        files[str(date)] = path
        rows[str(date)] = part.height
    return MovieLensConversion(out_dir=out_dir, files=files, rows=rows, max_history=max_history)


def bucket_collisions(values: pa.Array | np.ndarray, num_buckets: int, id_type: IdType) -> int:
    """How many of the distinct ``values`` share a table row with another under the pipeline's hash (distinct values
    minus occupied rows): how the table sizes in ``configs/features/movielens.yaml`` were chosen and are checked."""
    distinct = pa.array(values).unique()
    return len(distinct) - len(np.unique(hash_ids(distinct, num_buckets, id_type)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("src_dir", type=Path, help="folder with the three MovieLens100k_*.parquet.brotli files")
    parser.add_argument("out_dir", type=Path, help="where the dt=YYYY-MM-DD partitions go")
    parser.add_argument("--max-history", type=int, default=50, help="longest behaviour sequence kept (newest first)")
    args = parser.parse_args(argv)
    result = convert_movielens(args.src_dir, args.out_dir, args.max_history)
    dates = result.dates
    total = sum(result.rows.values())
    last = sum(result.rows[d] for d in dates[-28:])
    print(f"{total:,} rows in {len(dates)} partitions {dates[0]} .. {dates[-1]} under {result.out_dir}")
    print(f"last 28 partitions ({dates[-28]} .. {dates[-1]}): {last:,} rows")


if __name__ == "__main__":
    main()
