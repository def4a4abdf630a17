"""How the training windows reach the workers: read once into the object store when they fit, the loop's
steady-state rate that tells what the epochs' restarts cost, and the Ray Train controller's settings that bound the
fixed cost around the loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import TRAIN_SCHEDULING_FIELDS
from pipeline.resources import CONTROLLER_POLL_ENV, controller_settings
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


def _write_poll_setting(config: dict[str, Any]) -> None:
    """A Ray Train worker: write down the controller poll interval it was started under."""
    Path(config["out"]).write_text(os.environ.get(CONTROLLER_POLL_ENV, "unset"))


def test_the_controller_poll_interval_reaches_ray_train_and_is_restored_after(ray_local: None, tmp_path: Path) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    before = os.environ.get(CONTROLLER_POLL_ENV)
    out = tmp_path / "seen"
    trainer = TorchTrainer(
        _write_poll_setting,
        train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name="poll", storage_path=str(tmp_path / "results")),
    )
    with controller_settings(resource_wait_s=30, poll_s=0.25):
        trainer.fit()
    # Ray Train forwards the driver's setting to its controller and from there to the workers.
    assert out.read_text() == "0.25"
    assert os.environ.get(CONTROLLER_POLL_ENV) == before
    assert "controller_poll_s" in TRAIN_SCHEDULING_FIELDS  # it changes when a run ends, not what it trains
