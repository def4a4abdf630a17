r"""UCI Census-Income (KDD) -> Parquet partitions and a feature spec, so the pipeline trains on it unchanged.

    python -m features.census ../shared/data/census_income_kdd runs/census/logs \
        --spec configs/features/census.yaml

The MMoE protocol (Ma et al., KDD 2018; the keras-mmoe re-implementation): train on ``census-income.data``; split
``census-income.test`` 1:1 at random with a fixed seed into validation and test. The three splits become three date
partitions, so the pipeline's date-window logic selects them:

======================  =================  ========================================
partition               split              rows
======================  =================  ========================================
``dt=1994-01-01``       train              199,523 (all of census-income.data)
``dt=1994-01-02``       validation         49,881 (first half of the shuffled test)
``dt=1994-01-03``       test               49,881 (second half)
======================  =================  ========================================

Columns written (snake_case of the census names, ``'`` dropped, other non-alphanumerics -> ``_``):

* keys: ``row_id`` (int64, unique over both files: train rows 0..199,522, test rows 199,523 + their line index),
  ``user_id`` (= ``row_id``; census has no users, but the spec requires a user key) and ``ts`` (timestamp[ms]: the
  partition's midnight plus the row's position in ms, so rows stay ordered within a partition).
* 32 categorical columns as strings (integer-coded ones such as ``detailed_industry_recode`` too: they are codes, not
  quantities); ``?`` (missing) is kept as a category value of its own.
* 7 continuous columns as float32 (the spec log1p-transforms the skewed money columns).
* labels ``income`` (1 if ``50000+.``) and ``never_married`` (1 if ``marital stat == Never married``), int8.

The label sources (``income`` as text, ``marital stat``) and ``instance weight`` (a sampling weight, MARSUPWT) are not
written at all, so no spec can read them as features by mistake.

Evaluation windows. The ingest stage evaluates on the *last* ``data.eval_days`` partitions and, with
``data.validation_days: 1``, scores the partition before them at every epoch end (the validation window: it picks the
epoch whose weights are kept) and trains on the rest: ``out_dir`` itself, with both set to 1, trains on train, validates
on validation and evaluates on test (the shipped ``configs/experiments/census.yaml``). The converter also writes two
views made of symlinks to the partitions: ``out_dir/views/tune`` (train + validation: tune hyper-parameters there with
``data.validation_days: 0``) and ``out_dir/views/final`` (train + test), each used with ``data.eval_days: 1``.

Note for readers of the results: ``detailed household and family stat`` and ``detailed household summary in
household`` partly encode marital status (e.g. "Child <18 never marr not in subfamily"). They are ordinary census
attributes, kept by every published MMoE/PLE/DRGrad census experiment, and explain the ~0.99 never-married AUC.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from features.spec import IdType
from features.transform import hash_ids
from features.validate import SUCCESS_MARKER

__all__ = [
    "CATEGORICAL",
    "CENSUS_COLUMNS",
    "CONTINUOUS",
    "PARTITIONS",
    "TASKS",
    "VIEWS",
    "CensusConversion",
    "census_feature_spec",
    "convert_census",
    "read_census",
    "snake",
    "split_test_indices",
]

TRAIN_FILE = "census-income.data.bz2"
TEST_FILE = "census-income.test.gz"

#: The 42 columns of both files, in order (census-income.names; the data README lists them too).
CENSUS_COLUMNS: tuple[str, ...] = (
    "age",
    "class of worker",
    "detailed industry recode",
    "detailed occupation recode",
    "education",
    "wage per hour",
    "enroll in edu inst last wk",
    "marital stat",
    "major industry code",
    "major occupation code",
    "race",
    "hispanic origin",
    "sex",
    "member of a labor union",
    "reason for unemployment",
    "full or part time employment stat",
    "capital gains",
    "capital losses",
    "dividends from stocks",
    "tax filer stat",
    "region of previous residence",
    "state of previous residence",
    "detailed household and family stat",
    "detailed household summary in household",
    "instance weight",
    "migration code-change in msa",
    "migration code-change in reg",
    "migration code-move within reg",
    "live in this house 1 year ago",
    "migration prev res in sunbelt",
    "num persons worked for employer",
    "family members under 18",
    "country of birth father",
    "country of birth mother",
    "country of birth self",
    "citizenship",
    "own business or self employed",
    "fill inc questionnaire for veteran's admin",
    "veterans benefits",
    "weeks worked in year",
    "year",
    "income",
)

#: Continuous columns -> the spec's transform. The money columns are 0 for most rows with a long right tail (capital
#: gains reach 99,999), so they are log1p'd; age, weeks worked and the 0-6 employer count are not skewed.
CONTINUOUS: dict[str, str] = {
    "age": "none",
    "wage per hour": "log1p",
    "capital gains": "log1p",
    "capital losses": "log1p",
    "dividends from stocks": "log1p",
    "num persons worked for employer": "none",
    "weeks worked in year": "none",
}

#: Raw columns that are neither features nor written: the two label sources and the sampling weight.
EXCLUDED: tuple[str, ...] = ("marital stat", "income", "instance weight")

#: Every other column is categorical (33 nominal attributes minus ``marital stat``, which is a label source).
CATEGORICAL: tuple[str, ...] = tuple(c for c in CENSUS_COLUMNS if c not in CONTINUOUS and c not in EXCLUDED)

#: Task name -> label column (int8 0/1).
TASKS: dict[str, str] = {"income": "income", "never_married": "never_married"}

#: Split -> date partition. Consecutive dates so that ``data.eval_days: 1`` evaluates on the test split.
PARTITIONS: dict[str, str] = {"train": "1994-01-01", "validation": "1994-01-02", "test": "1994-01-03"}

_MS_PER_DAY = 86_400_000


def snake(name: str) -> str:
    """Census column name -> Parquet column name: ``fill inc questionnaire for veteran's admin`` ->
    ``fill_inc_questionnaire_for_veterans_admin``, ``migration code-change in msa`` ->
    ``migration_code_change_in_msa``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower().replace("'", "")).strip("_")


@dataclass(frozen=True)
class CensusConversion:
    """What :func:`convert_census` wrote: paths, row counts and label rates per split, category counts."""

    out_dir: Path
    files: dict[str, list[Path]]  # split -> Parquet parts
    rows: dict[str, int]  # split -> rows
    label_rates: dict[str, dict[str, float]]  # split -> task -> positive share
    cardinalities: dict[str, int]  # Parquet column -> distinct values over train + test ('?' included)
    seed: int
    spec_path: Path | None = None


def read_census(path: Path) -> pd.DataFrame:
    """One raw census file as a DataFrame with the census column names.

    ``keep_default_na=False`` keeps ``?`` (and anything pandas would call NA) as literal strings: a missing value is a
    category of its own. ``skipinitialspace`` drops the blank after each comma.
    """
    df = pd.read_csv(path, header=None, names=list(CENSUS_COLUMNS), skipinitialspace=True, keep_default_na=False)
    if df.shape[1] != len(CENSUS_COLUMNS):
        raise ValueError(f"{path}: expected {len(CENSUS_COLUMNS)} columns, got {df.shape[1]}")
    return df


def _labels(df: pd.DataFrame) -> dict[str, np.ndarray]:
    income = df["income"].astype(str).str.strip()
    unknown = set(income.unique()) - {"- 50000.", "50000+."}
    if unknown:
        raise ValueError(f"unexpected income values {sorted(unknown)}")
    return {
        "income": (income == "50000+.").to_numpy().astype(np.int8),
        "never_married": (df["marital stat"].astype(str).str.strip() == "Never married").to_numpy().astype(np.int8),
    }


def _table(df: pd.DataFrame, row_id: np.ndarray, date: str) -> pa.Table:
    epoch_ms = (dt.date.fromisoformat(date) - dt.date(1970, 1, 1)).days * _MS_PER_DAY
    labels = _labels(df)
    arrays: dict[str, pa.Array] = {
        "row_id": pa.array(row_id, pa.int64()),
        "user_id": pa.array(row_id, pa.int64()),
        "ts": pa.array(epoch_ms + np.arange(len(df), dtype=np.int64), pa.timestamp("ms")),
    }
    for col in CATEGORICAL:
        arrays[snake(col)] = pa.array(df[col].astype(str).to_numpy(dtype=object), pa.string())
    for col in CONTINUOUS:
        arrays[snake(col)] = pa.array(df[col].to_numpy(dtype=np.float32), pa.float32())
    for task, label in TASKS.items():
        arrays[label] = pa.array(labels[task], pa.int8())
    return pa.table(arrays)


def _collision_free_buckets(values: list[str], start: int, limit: int) -> int:
    """Smallest bucket count in ``[start, limit]`` where the pipeline's string hash puts every value in its own row.

    ``hash_ids`` is fixed (blake2b-64 mod buckets), so for a known, small vocabulary we can pick a table size without
    collisions instead of merging unrelated categories; falls back to ``start`` if none exists below ``limit``.
    """
    arr = pa.array(values, pa.string())
    for m in range(start, limit + 1):
        if len(np.unique(hash_ids(arr, m, IdType.string))) == len(values):
            return m
    return start


def census_feature_spec(vocabularies: dict[str, list[str]]) -> dict[str, Any]:
    """The FeatureSpec (as plain data) for the converted Parquet: one small table per categorical column.

    Table size: about 2x the column's cardinality, raised to the first size where the observed vocabulary hashes
    without collisions (at most 64x); dim 4 for columns with at most 10 values, else 8.
    """
    tables, sparse = [], []
    for col in CATEGORICAL:
        name = snake(col)
        vocab = vocabularies[name]
        n = len(vocab)
        buckets = _collision_free_buckets(vocab, max(2 * n, 4), max(64 * n, 64))
        tables.append({"name": name, "num_buckets": buckets, "dim": 4 if n <= 10 else 8})
        sparse.append({"name": name, "column": name, "table": name, "role": "context", "id_type": "string"})
    dense = [
        {"name": snake(col), "column": snake(col), "transform": transform, "min": 0.0}
        for col, transform in CONTINUOUS.items()
    ]
    return {
        "keys": {"request_id": "row_id", "user_id": "user_id", "timestamp": "ts"},
        "tables": tables,
        "sparse": sparse,
        "dense": dense,
        "tasks": [{"name": task, "label": label, "kind": "binary"} for task, label in TASKS.items()],
    }


_SPEC_HEADER = """\
# Feature spec of UCI Census-Income (KDD) as written by features.census (MMoE protocol; see that module).
# Generated by: python -m features.census <census dir> <out dir> --spec configs/features/census.yaml
# One table per categorical column (about 2x its cardinality, raised until the observed values hash without
# collisions). Not features: the label sources (income, marital stat) and the sampling weight (instance weight).
"""


def _dump_spec(spec: dict[str, Any]) -> str:
    """Readable YAML: one flow mapping per table / feature / task line, as in behaviour_logs.yaml."""
    lines = [_SPEC_HEADER.rstrip("\n"), "keys:"]
    lines += [f"  {k}: {v}" for k, v in spec["keys"].items()]
    for section in ("tables", "sparse", "dense", "tasks"):
        lines.append("")
        lines.append(f"{section}:")
        for item in spec[section]:
            body = ", ".join(f"{k}: {v}" for k, v in item.items())
            lines.append(f"  - {{{body}}}")
    text = "\n".join(lines) + "\n"
    assert yaml.safe_load(text) == spec, "spec YAML does not round-trip"
    return text


#: View -> the splits it holds; the last one is the evaluation window (``data.eval_days: 1``).
VIEWS: dict[str, tuple[str, str]] = {"tune": ("train", "validation"), "final": ("train", "test")}


def _clear_partitions(out_dir: Path) -> None:
    if out_dir.exists():
        for child in out_dir.iterdir():
            if child.is_dir() and (child.name.startswith("dt=") or child.name == "views"):
                shutil.rmtree(child)
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_views(out_dir: Path) -> None:
    """``views/<name>/dt=...`` -> ``../../dt=...`` (relative symlinks: the folder can be moved or mounted)."""
    for view, splits in VIEWS.items():
        folder = out_dir / "views" / view
        folder.mkdir(parents=True)
        for split in splits:
            name = f"dt={PARTITIONS[split]}"
            (folder / name).symlink_to(Path("..") / ".." / name, target_is_directory=True)


def split_test_indices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of census-income.test for (validation, test): a seeded 1:1 split, each half sorted.

    ``default_rng(seed).permutation`` (PCG64) gives the same split for the same seed; numpy may in principle change a
    Generator stream between releases (NEP 19), so ``tests/test_census.py`` pins a few indices to catch that.
    99,762 rows give 49,881 + 49,881.
    """
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def convert_census(
    src_dir: Path,
    out_dir: Path,
    seed: int = 0,
    *,
    files_per_partition: dict[str, int] | None = None,
    spec_path: Path | None = None,
) -> CensusConversion:
    """Convert the census files in ``src_dir`` into ``out_dir/dt=YYYY-MM-DD/part-NNNNN.parquet`` (see the module).

    ``seed`` fixes the 1:1 validation/test split of census-income.test (numpy ``default_rng(seed).permutation``; each
    half keeps the file's row order). ``files_per_partition`` (split -> parts; default train 4, validation 2, test 2)
    lets Ray Data read and validate in parallel. ``spec_path``, when given, receives the matching feature spec YAML.
    Earlier ``dt=`` partitions in ``out_dir`` are removed first. Deterministic: same inputs and seed, same files.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    parts = {"train": 4, "validation": 2, "test": 2, **(files_per_partition or {})}
    train = read_census(src_dir / TRAIN_FILE)
    test = read_census(src_dir / TEST_FILE)

    val_idx, test_idx = split_test_indices(len(test), seed)
    splits = {
        "train": (train, np.arange(len(train), dtype=np.int64)),
        "validation": (test.iloc[val_idx], len(train) + val_idx.astype(np.int64)),
        "test": (test.iloc[test_idx], len(train) + test_idx.astype(np.int64)),
    }

    _clear_partitions(out_dir)
    files: dict[str, list[Path]] = {}
    rows: dict[str, int] = {}
    rates: dict[str, dict[str, float]] = {}
    for split, (df, row_id) in splits.items():
        table = _table(df, row_id, PARTITIONS[split])
        part_dir = out_dir / f"dt={PARTITIONS[split]}"
        part_dir.mkdir(parents=True)
        bounds = np.linspace(0, table.num_rows, parts[split] + 1).astype(np.int64)
        files[split] = []
        for p in range(parts[split]):
            path = part_dir / f"part-{p:05d}.parquet"
            pq.write_table(table.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p])), path)
            files[split].append(path)
        (part_dir / SUCCESS_MARKER).touch()  # last: the partition is complete
        rows[split] = table.num_rows
        rates[split] = {task: float(np.mean(table.column(label).to_numpy())) for task, label in TASKS.items()}

    _write_views(out_dir)
    both = pd.concat([train, test], ignore_index=True)
    vocabularies = {snake(c): sorted(both[c].astype(str).unique().tolist()) for c in CATEGORICAL}
    if spec_path is not None:
        spec_path = Path(spec_path)
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(_dump_spec(census_feature_spec(vocabularies)))
    return CensusConversion(
        out_dir=out_dir,
        files=files,
        rows=rows,
        label_rates=rates,
        cardinalities={k: len(v) for k, v in vocabularies.items()},
        seed=seed,
        spec_path=spec_path,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src_dir", type=Path, help="folder with census-income.data.bz2 and census-income.test.gz")
    parser.add_argument("out_dir", type=Path, help="where the dt=YYYY-MM-DD partitions go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 1:1 validation/test split")
    parser.add_argument("--spec", type=Path, default=None, help="also write the feature spec YAML here")
    args = parser.parse_args(argv)
    result = convert_census(args.src_dir, args.out_dir, args.seed, spec_path=args.spec)
    for split, n in result.rows.items():
        rates = ", ".join(f"{t} {r:.4f}" for t, r in result.label_rates[split].items())
        print(f"{split:<10} dt={PARTITIONS[split]}  {n:>7,} rows  positives: {rates}")


if __name__ == "__main__":
    main()
