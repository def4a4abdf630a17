"""Ingest-path throughput, each step beside a plain pyarrow read of the same files, in one run.

    .venv/bin/python benchmarks/ingest.py --rows 1000000

First table, one core (``torch.set_num_threads(1)``; pyarrow limited to one thread): generation, validation and the
transform. Second table, the whole machine: the ingest stage itself (Ray Data, one task per file, writing only what
it must) against a plain read of the window with pyarrow's threads, then a daily job's two days with the validation
cache: day 1 validates every file of its window, day 2 (one new partition) validates only the new one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.generator import GeneratorConfig, generate_logs
from features.spec import load_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from features.validate import check_files, validate_rows

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "configs" / "features" / "behaviour_logs.yaml"


def timed(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Best wall time of ``repeats`` runs (after one warm-up) and the row count the function returns."""
    rows = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        rows = fn()
        best = min(best, time.perf_counter() - start)
    return best, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    spec = load_feature_spec(SPEC)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GeneratorConfig(
            num_days=args.days, impressions_per_day=args.rows // args.days, num_users=20_000, num_items=50_000
        )
        gen = generate_logs(cfg, Path(tmp) / "logs", Path(tmp) / "oracle.parquet")
        files = [str(f) for f in gen.files]

        def plain_read() -> int:
            return sum(pq.read_table(f).num_rows for f in files)

        def validate() -> int:
            check_files([Path(f) for f in files], spec)
            n = 0
            for f in files:
                clean, bad = validate_rows(pq.read_table(f), spec, source=f)
                n += clean.num_rows + bad.num_rows
            return n

        stats = dense_stats_from_moments([compute_dense_moments(pq.read_table(files[0]), spec)], spec)
        transform = BatchTransform(spec, stats)

        def read_and_transform() -> int:
            n = 0
            for f in files:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=args.batch_size):
                    n += transform(pa.Table.from_batches([rb])).batch_size
            return n

        read_s, rows = timed(plain_read, args.repeats)
        validate_s, _ = timed(validate, args.repeats)
        transform_s, _ = timed(read_and_transform, args.repeats)
        stage = ingest_stage(Path(tmp), [Path(f) for f in files], args.repeats)

    base = rows / read_s
    table = [
        ("generate (write Parquet + oracle)", gen.seconds, gen.rows),
        ("plain pyarrow read", read_s, rows),
        ("read + validate", validate_s, rows),
        ("read + transform to KJT/dense/labels", transform_s, rows),
    ]
    print(f"\n{rows:,} rows in {len(files)} files, batch {args.batch_size}, one thread\n")
    print("| step | seconds | rows/s | rate / plain read |\n|---|---:|---:|---:|")
    for name, seconds, n in table:
        rate = n / seconds
        print(f"| {name} | {seconds:.2f} | {rate:,.0f} | {rate / base:.2f} |")
    print(f"\nthe ingest stage (Ray Data, {os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f}\n")
    print("| step | files validated | seconds | rows/s | rate / plain read |\n|---|---:|---:|---:|---:|")
    stage_base = stage[0][3] / stage[0][2]
    for name, validated, seconds, n in stage:
        rate = n / seconds
        print(f"| {name} | {validated} | {seconds:.2f} | {rate:,.0f} | {rate / stage_base:.2f} |")


def ingest_stage(tmp: Path, files: list[Path], repeats: int) -> list[tuple[str, int, float, int]]:
    """(step, files validated, seconds, rows of the window) for a plain read and the ingest stage, on the same files.

    The window is every day but the last for training and the last for evaluation; the daily job's day 1 is the same
    window one day earlier. Ray is started (and Ray Data warmed up) before anything is timed; the plain read and the
    uncached stage are the best of ``repeats``."""
    from pipeline.config import load_config
    from pipeline.ingest import ingest
    from pipeline.partitions import DataWindow
    from pipeline.runtime import ensure_ray

    pa.set_cpu_count(os.cpu_count() or 1)
    pa.set_io_thread_count(os.cpu_count() or 1)
    by_date: dict[str, list[str]] = {}
    for f in files:
        by_date.setdefault(f.parent.name.removeprefix("dt="), []).append(str(f.resolve()))
    dates = sorted(by_date)

    def window(last: int) -> DataWindow:
        train = dates[: last - 1]
        return DataWindow(train, [dates[last - 1]], [f for d in train for f in by_date[d]], by_date[dates[last - 1]])

    def run(name: str, win: DataWindow, cache: Path | None) -> tuple[float, int, int]:
        overrides = [f"run_dir={tmp / name}", f"data.path={files[0].parent.parent}", "data.eval_days=1"]
        if cache is not None:
            overrides.append(f"data.validation_cache={cache}")
        cfg = load_config(REPO / "configs" / "experiments" / "small.yaml", overrides)
        ensure_ray(cfg)
        start = time.perf_counter()
        result = ingest(cfg, window=win)
        seconds = time.perf_counter() - start
        validated = len(win.train_sources) + len(win.eval_sources) - result.files_from_cache
        return seconds, validated, result.total_counts().rows_read

    full = window(len(dates))
    run("warm-up", window(2), None)
    read_s, rows = timed(lambda: pq.read_table([*full.train_sources, *full.eval_sources]).num_rows, repeats)
    out = [("plain pyarrow read, all threads", 0, read_s, rows)]
    seconds, validated, n = min(run(f"no-cache-{i}", full, None) for i in range(repeats))
    out.append(("ingest stage, no cache", validated, seconds, n))
    cache = tmp / "validation_cache"
    seconds, validated, n = run("day1", window(len(dates) - 1), cache)
    out.append(("daily job day 1 (cache empty, one day earlier)", validated, seconds, n))
    seconds, validated, n = run("day2", full, cache)
    out.append(("daily job day 2 (one new partition)", validated, seconds, n))
    return out


if __name__ == "__main__":
    main()
