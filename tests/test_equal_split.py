"""The training loop runs no per-step collective to agree that every rank still has a batch: it relies on Ray Train
splitting the dataset with ``streaming_split(equal=True)`` and on ``drop_last`` batches, so every rank gets the same
number of batches. This checks that claim on Ray's real splitter, with row and block counts that do not divide."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize(("rows", "blocks", "world", "batch_size"), [(1003, 7, 3, 32), (517, 5, 2, 64), (96, 3, 4, 8)])
def test_ray_train_splits_give_every_rank_the_same_batch_count(
    ray_local: None, rows: int, blocks: int, world: int, batch_size: int
) -> None:
    import ray
    import ray.data
    import ray.train

    dataset = ray.data.range(rows, override_num_blocks=blocks)
    # The same splitter TorchTrainer uses for the worker shards (Ray Train's default DataConfig).
    splits = ray.train.DataConfig().configure(
        {"train": dataset}, world_size=world, worker_handles=None, worker_node_ids=None
    )

    # The consumers hold no CPU, like Ray Train's workers leave room for the read tasks: with one CPU each, a node
    # with as many CPUs as ranks has none left for the read, and the splits never yield.
    @ray.remote(num_cpus=0)
    def count(split: object, seed: int) -> int:
        n = 0
        for _ in split.iter_torch_batches(  # type: ignore[attr-defined]
            batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=2 * batch_size, local_shuffle_seed=seed
        ):
            n += 1
        return n

    counts = ray.get([count.remote(s["train"], rank) for rank, s in enumerate(splits)])
    assert len(set(counts)) == 1, f"ranks would run different step counts: {counts}"
    assert counts[0] == (rows // world) // batch_size
