"""Benchmark the log generator: time to write N impressions (default 1M) as date-partitioned Parquet.

    .venv/bin/python benchmarks/generate.py --rows 1000000

Writes into a temporary folder (removed afterwards) and prints rows, seconds, rows/s and MB written.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from features.generator import GeneratorConfig, generate_logs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="total impressions (split evenly over the days)")
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conflict", type=float, default=0.5)
    args = parser.parse_args()

    cfg = GeneratorConfig(
        seed=args.seed,
        num_days=args.days,
        impressions_per_day=max(1, args.rows // args.days),
        num_users=args.users,
        num_items=args.items,
        conflict=args.conflict,
    )
    with tempfile.TemporaryDirectory(prefix="mtrec-gen-") as tmp:
        result = generate_logs(cfg, Path(tmp) / "logs", Path(tmp) / "oracle.parquet")
        log_bytes = sum(f.stat().st_size for f in result.files)
        oracle_bytes = result.oracle_path.stat().st_size

    rows = [
        ("rows", f"{result.rows:,}"),
        ("days x files", f"{len(result.dates)} x {cfg.files_per_day}"),
        ("users / items", f"{cfg.num_users:,} / {cfg.num_items:,}"),
        ("seconds", f"{result.seconds:.2f}"),
        ("rows/s", f"{result.rows / result.seconds:,.0f}"),
        ("MB written (logs)", f"{log_bytes / 1e6:.1f}"),
        ("MB written (oracle)", f"{oracle_bytes / 1e6:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:>14}")


if __name__ == "__main__":
    main()
