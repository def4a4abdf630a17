"""The per-file validation cache: a daily job validates only the partitions it has not seen, a changed file again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import small_config

TINY = (
    "generator.num_days=3",
    "generator.impressions_per_day=3000",
    "generator.num_users=400",
    "generator.num_items=800",
    "daily.train_days=1",
)


def test_second_day_validates_only_the_new_partition_and_a_changed_file_again(ray_local: None, tmp_path: Path) -> None:
    from jobs.daily import day_config
    from pipeline.ingest import ingest
    from pipeline.run import generate

    cfg = small_config(tmp_path, *TINY)
    dates = generate(cfg).dates
    data = tmp_path / "data"
    per_day = len(list((data / f"dt={dates[0]}").glob("*.parquet")))
    held = tmp_path / "held"
    shutil.move(data / f"dt={dates[2]}", held)  # the third day has not landed yet

    first = ingest(day_config(cfg, dates[1]))
    cache = tmp_path / "daily" / "validation_cache"
    assert first.validation_cache == str(cache.resolve())
    assert first.files_from_cache == 0
    # Generated logs have no bad row: every file is read where it is, and the cache holds only the verdicts.
    assert [*first.train_files, *first.eval_files] == sorted(str(f.resolve()) for f in data.glob("dt=*/*.parquet"))
    assert not list(cache.rglob("*.parquet"))

    shutil.move(held, data / f"dt={dates[2]}")  # it lands; the next day's job runs
    second = ingest(day_config(cfg, dates[2]))
    assert (second.train_dates, second.eval_dates) == ([dates[1]], [dates[2]])
    assert second.files_from_cache == per_day, "yesterday's evaluation day is read from the cache, not validated"
    assert second.train_files == first.eval_files  # the same clean parts, not copies

    # The cached run's counts and statistics are those of validating everything again.
    fresh_cfg = small_config(tmp_path / "fresh", *TINY, f"data.path={data}", "data.train_days=1")
    fresh = ingest(fresh_cfg)
    assert fresh.files_from_cache == 0 and fresh.validation_cache == ""
    assert fresh.counts == second.counts
    for name, mean in fresh.stats.mean.items():
        assert second.stats.mean[name] == pytest.approx(mean, rel=1e-9)
        assert second.stats.std[name] == pytest.approx(fresh.stats.std[name], rel=1e-9)

    # A file rewritten in place (a writer re-ran) is validated again: here with bad rows that must be quarantined.
    part = sorted((data / f"dt={dates[2]}").glob("*.parquet"))[0]
    table = pq.read_table(part)
    dwell = table.column("dwell_seconds").to_numpy().copy()
    dwell[::100] = -1.0  # 1 % of the file: under the run's max_bad_fraction
    column = table.schema.get_field_index("dwell_seconds")
    pq.write_table(table.set_column(column, "dwell_seconds", pa.array(dwell, pa.float32())), part)
    third = ingest(day_config(cfg, dates[2]).model_copy(update={"run_dir": tmp_path / "rerun"}))
    assert third.files_from_cache == 2 * per_day - 1
    assert third.counts_of("eval").rows_quarantined > 0
    copied = [f for f in third.eval_files if Path(f).is_relative_to(cache)]
    assert len(copied) == 1, "the rewritten file has bad rows: its clean rows are written to the cache"
    assert pq.read_metadata(copied[0]).num_rows == table.num_rows - third.counts_of("eval").rows_quarantined
    assert second.counts_of("eval").rows_quarantined == 0


@pytest.mark.parametrize("change", ["size", "spec"])
def test_cache_key_follows_the_file_and_the_spec(tmp_path: Path, change: str) -> None:
    from pipeline.ingest import cache_key

    cfg = small_config(tmp_path)
    spec = cfg.feature_spec()
    f = tmp_path / "part.parquet"
    f.write_bytes(b"abc")
    key = cache_key(f, spec)
    assert cache_key(f, spec) == key
    if change == "size":
        f.write_bytes(b"abcd")
        assert cache_key(f, spec) != key
    else:
        other = spec.model_copy(update={"dense": spec.dense[:-1]})
        assert cache_key(f, other) != key


def test_clean_files_are_read_in_place_and_a_file_changed_after_ingest_is_refused(
    ray_local: None, tmp_path: Path
) -> None:
    from features.validate import DataValidationError
    from pipeline.ingest import ingest
    from pipeline.run import generate
    from pipeline.train import train

    cfg = small_config(tmp_path, *TINY)
    generate(cfg)
    files = sorted((tmp_path / "data").glob("dt=*/*.parquet"))
    dirty = files[0]
    table = pq.read_table(dirty)
    dwell = table.column("dwell_seconds").to_numpy().copy()
    dwell[:3] = -1.0
    column = table.schema.get_field_index("dwell_seconds")
    pq.write_table(table.set_column(column, "dwell_seconds", pa.array(dwell, pa.float32())), dirty)

    result = ingest(cfg)
    read = [*result.train_files, *result.validation_files, *result.eval_files]
    assert len(read) == len(files)
    copies = [f for f in read if Path(f).is_relative_to(tmp_path / "ingested")]
    assert len(copies) == 1, "only the file with bad rows is written again"
    assert pq.read_metadata(copies[0]).num_rows == table.num_rows - 3
    assert sorted(f for f in read if f not in copies) == sorted(str(f.resolve()) for f in files[1:])
    assert sorted(result.read_in_place) == sorted(str(f.resolve()) for f in files[1:])
    assert result.counts_of("train").rows_quarantined == 3
    result.check_sources_unchanged()

    # A writer re-runs after the ingest: its rows were never validated, so training refuses them, naming the file.
    changed = files[-1]
    pq.write_table(pq.read_table(changed).slice(0, 10), changed)
    with pytest.raises(DataValidationError, match=str(changed.resolve())):
        train(cfg, result)
