"""Materialised windows: read (and globally shuffled) by one pyarrow task when a node has the memory, by Ray Data's
distributed read otherwise; either way every row of the files, once, in a seeded, reproducible order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.train_windows as windows
from pipeline.train_windows import WindowSource, block_count, read_materialized


def _files(tmp_path: Path) -> list[str]:
    paths = []
    for i, rows in enumerate([300, 500, 211]):
        path = tmp_path / f"part-{i}.parquet"
        start = sum([300, 500, 211][:i])
        pq.write_table(
            pa.table({"row": pa.array(range(start, start + rows), pa.int64()), "hist": [[1, 2]] * rows}), path
        )
        paths.append(str(path))
    return paths


def _rows(window: Any) -> list[int]:
    dataset = window() if callable(window) else window  # the one-task read: Ray Train makes the dataset
    return [r["row"] for r in dataset.take_all()]


def test_block_count_keeps_two_blocks_per_worker_and_the_target_block_size() -> None:
    assert block_count(1_000, world=3) == 6
    assert block_count(10 * 128 * 1024**2, world=1) == 10


@pytest.mark.parametrize("one_task", [True, False], ids=["one task", "ray data"])
def test_a_materialised_window_holds_every_row_once_in_a_seeded_order(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_task: bool
) -> None:
    from ray.data import DataContext
    from ray.data.dataset import MaterializedDataset

    # As the train stage sets it: Ray Data's seeded shuffle is reproducible only in order.
    monkeypatch.setattr(DataContext.get_current().execution_options, "preserve_order", True)
    if not one_task:  # no node with the memory for one task: Ray Data's distributed read and shuffle
        monkeypatch.setattr(windows, "largest_node_memory", lambda: 0.0)
    files = _files(tmp_path)
    shuffled = read_materialized(WindowSource(files, shuffle_seed=7), 1e5, world=2, read_cpus=1.0)
    again = read_materialized(WindowSource(files, shuffle_seed=7), 1e5, world=2, read_cpus=1.0)
    other = read_materialized(WindowSource(files, shuffle_seed=8), 1e5, world=2, read_cpus=1.0)
    in_order = read_materialized(WindowSource(files, shuffle_seed=None), 1e5, world=2, read_cpus=1.0)

    assert isinstance(shuffled() if callable(shuffled) else shuffled, MaterializedDataset)
    assert sorted(_rows(shuffled)) == list(range(1011))
    assert _rows(shuffled) != list(range(1011))
    assert _rows(again) == _rows(shuffled)
    assert _rows(other) != _rows(shuffled)
    assert _rows(in_order) == list(range(1011))
    if one_task:
        assert callable(shuffled)  # not awaited: made a dataset in Ray Train's controller
        assert shuffled().num_blocks() == 4
        assert list(shuffled().take(1)[0]["hist"]) == [1, 2]
