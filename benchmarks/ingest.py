"""Ingest-path throughput: generation, validation and transform, each beside a plain pyarrow read of the same files,
measured in one run on one core (``torch.set_num_threads(1)``; pyarrow limited to one thread).

    .venv/bin/python benchmarks/ingest.py --rows 1000000

Prints rows/s per step and the ratio of each step's rate to the plain read's rate.
"""

from __future__ import annotations

import argparse
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


if __name__ == "__main__":
    main()
