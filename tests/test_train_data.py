"""How the training windows reach the workers: read once into the object store when they fit, and the loop's
steady-state rate that tells what the epochs' restarts cost."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.train import should_materialize, window_bytes
from pipeline.train_worker import steady_rate


def _file(path: Path, rows: int) -> str:
    pq.write_table(pa.table({"x": pa.array(range(rows), pa.int64())}), path)
    return str(path)


def test_auto_materialises_only_what_fits_a_quarter_of_the_store(tmp_path: Path) -> None:
    files = [_file(tmp_path / "a.parquet", 10_000), _file(tmp_path / "b.parquet", 30_000)]
    size = window_bytes(files)
    assert 40_000 * 8 <= size < 40_000 * 8 * 1.5  # the footers' uncompressed size of 40k int64 values (+ encoding)
    assert should_materialize("auto", files, store_bytes=8 * size)
    assert not should_materialize("auto", files, store_bytes=8 * size - 1)
    assert should_materialize("always", files, store_bytes=0)
    assert not should_materialize("never", files, store_bytes=1e15)


def test_steady_rate_leaves_out_each_epochs_first_window() -> None:
    rates = [
        {"step": 50, "samples_per_s": 5_000.0, "epoch_start": True},
        {"step": 100, "samples_per_s": 80_000.0, "epoch_start": False},
        {"step": 150, "samples_per_s": 90_000.0, "epoch_start": False},
        {"step": 200, "samples_per_s": 10_000.0, "epoch_start": True},
        {"step": 250, "samples_per_s": 85_000.0, "epoch_start": False},
    ]
    assert steady_rate(rates) == pytest.approx(85_000.0)
    assert steady_rate(rates[:1]) == 0.0
