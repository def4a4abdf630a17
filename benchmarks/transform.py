"""Benchmark BatchTransform against plain Parquet reading: can the transform keep up with the reader?

    .venv/bin/python benchmarks/transform.py --rows 200000 --batch-size 4096

Builds a random table shaped like the generator's behaviour logs (the columns of
``configs/features/behaviour_logs.yaml``, sequences of random length 0..50), writes it to a temporary Parquet file, and
times in one run (best of ``--repeats``):

* ``read``: ``pyarrow.parquet.read_table`` of the file;
* ``read + transform``: the same read, then ``BatchTransform`` over batches of ``--batch-size`` rows;
* ``transform only``: ``BatchTransform`` over the batches of an already-read table (measured, not a difference of
  two noisy timings), i.e. the transform's own throughput on one core.

Prints rows/s for each and the ratio of read + transform to read alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.spec import load_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments

SPEC_PATH = Path(__file__).resolve().parents[1] / "configs/features/behaviour_logs.yaml"


def _sequences(rng: np.random.Generator, n: int, max_len: int, num_items: int) -> pa.ListArray:
    """n lists of random length 0..max_len, built from offsets (no per-row Python)."""
    lengths = rng.integers(0, max_len + 1, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = pa.array(rng.integers(0, num_items, size=int(offsets[-1])), pa.int64())
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def make_logs(n: int, seed: int = 0, max_seq: int = 50) -> pa.Table:
    rng = np.random.default_rng(seed)
    click = (rng.random(n) < 0.1).astype(np.int8)
    conversion = (click.astype(bool) & (rng.random(n) < 0.2)).astype(np.int8)
    devices = np.array(["ios", "android", "web", "tablet"], dtype=object)
    return pa.table(
        {
            "request_id": pa.array(np.arange(n, dtype=np.int64)),
            "ts": pa.array(1_767_225_600_000 + np.sort(rng.integers(0, 86_400_000, size=n)), pa.timestamp("ms")),
            "user_id": pa.array(rng.integers(0, 20_000, size=n), pa.int64()),
            "item_id": pa.array(rng.integers(0, 50_000, size=n), pa.int64()),
            "category_id": pa.array(rng.integers(0, 200, size=n), pa.int64()),
            "seller_id": pa.array(rng.integers(0, 2_000, size=n), pa.int64()),
            "hour": pa.array(rng.integers(0, 24, size=n).astype(np.int32)),
            "slot": pa.array(rng.integers(0, 20, size=n).astype(np.int32)),
            "device": pa.array(devices[rng.integers(0, len(devices), size=n)].tolist(), pa.string()),
            "price": pa.array(rng.lognormal(3.0, 1.0, size=n).astype(np.float32)),
            "item_ctr_7d": pa.array(rng.beta(2, 30, size=n).astype(np.float32)),
            "user_activity": pa.array(rng.exponential(10.0, size=n).astype(np.float32)),
            "click_seq": _sequences(rng, n, max_seq, 50_000),
            "cart_seq": _sequences(rng, n, max_seq, 50_000),
            "purchase_seq": _sequences(rng, n, max_seq, 50_000),
            "click": pa.array(click),
            "conversion": pa.array(conversion),
            "dwell_seconds": pa.array(np.where(click == 1, rng.exponential(30.0, n), 0.0).astype(np.float32)),
        }
    )


def _best(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = load_feature_spec(SPEC_PATH)
    table = make_logs(args.rows, args.seed)
    stats = dense_stats_from_moments([compute_dense_moments(table, spec)], spec)
    transform = BatchTransform(spec, stats)

    with tempfile.TemporaryDirectory(prefix="mtrec-bench-") as tmp:
        path = Path(tmp) / "logs.parquet"
        pq.write_table(table, path)
        mb = path.stat().st_size / 1e6

        def read() -> pa.Table:
            return pq.read_table(path)

        ids_per_batch: list[int] = []

        def read_and_transform() -> None:
            ids_per_batch.clear()
            for batch in read().to_batches(max_chunksize=args.batch_size):
                ids_per_batch.append(int(transform(batch).sparse.values().numel()))

        def transform_only() -> None:
            for batch in batches:
                transform(batch)

        # Warm-up: the first reads of a fresh file are several times slower (page cache, allocator growth); without
        # this the first timed variant pays for it and the ratio is meaningless.
        for _ in range(2):
            read_and_transform()
        batches = read().to_batches(max_chunksize=args.batch_size)
        t_read = _best(read, args.repeats)
        t_both = _best(read_and_transform, args.repeats)
        t_transform = _best(transform_only, args.repeats)

    n = args.rows
    rows = [
        ("rows", f"{n:,}", ""),
        ("parquet MB", f"{mb:.1f}", ""),
        ("batches", f"{len(ids_per_batch)}", f"ids/row {sum(ids_per_batch) / n:.1f}"),
        ("read_table", f"{t_read:.3f} s", f"{n / t_read:,.0f} rows/s"),
        ("read + transform", f"{t_both:.3f} s", f"{n / t_both:,.0f} rows/s"),
        ("transform only", f"{t_transform:.3f} s", f"{n / t_transform:,.0f} rows/s"),
        ("ratio (read+transform / read)", f"{t_both / t_read:.2f}x", ""),
    ]
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>12}  {b:>20}")


if __name__ == "__main__":
    main()
