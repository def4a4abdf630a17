"""The training loop runs no per-step collective to agree that every rank still has a batch: it relies on every rank
getting ``rows // world`` rows (Ray Train's ``streaming_split(equal=True)`` for streamed windows, ``split(equal=True)``
for materialised ones, :class:`pipeline.train_windows.EqualSplitsOfMaterialized`) and on ``drop_last`` batches, so
every rank gets the same number of batches. This checks that claim on Ray's real splitters, with row and block counts
that do not divide."""

from __future__ import annotations

import pytest

from pipeline.train_windows import EqualSplitsOfMaterialized


@pytest.mark.slow
@pytest.mark.parametrize("materialized", [False, True], ids=["streamed", "materialized"])
@pytest.mark.parametrize(("rows", "blocks", "world", "batch_size"), [(1003, 7, 3, 32), (517, 5, 2, 64), (96, 3, 4, 8)])
def test_ray_train_splits_give_every_rank_the_same_batch_count(
    ray_local: None, rows: int, blocks: int, world: int, batch_size: int, materialized: bool
) -> None:
    import ray
    import ray.data

    dataset = ray.data.range(rows, override_num_blocks=blocks)
    if materialized:
        dataset = dataset.materialize()
    # The splitter TorchTrainer uses for the worker shards (the train stage's data config).
    # Workers on two nodes, as Ray Train names them to the data config (node ids; the streaming split's hints).
    nodes = [f"node-{rank % 2}" for rank in range(world)] if materialized else None
    splits = EqualSplitsOfMaterialized().configure(
        {"train": dataset}, world_size=world, worker_handles=None, worker_node_ids=nodes
    )

    # The consumers hold no CPU, like Ray Train's workers leave room for the read tasks: with one CPU each, a node
    # with as many CPUs as ranks has none left for the read, and the splits never yield.
    @ray.remote(num_cpus=0)
    def ids(split: object, seed: int, epochs: int) -> list[list[int]]:
        out = []
        for _ in range(epochs):
            seen: list[int] = []
            for batch in split.iter_torch_batches(  # type: ignore[attr-defined]
                batch_size=batch_size,
                drop_last=True,
                local_shuffle_buffer_size=2 * batch_size,
                local_shuffle_seed=seed,
            ):
                seen.extend(batch["id"].tolist())
            out.append(seen)
        return out

    epochs = 2
    per_rank = ray.get([ids.remote(s["train"], rank, epochs) for rank, s in enumerate(splits)])
    counts = {len(epoch) // batch_size for rank in per_rank for epoch in rank}
    assert counts == {(rows // world) // batch_size}, f"ranks would run different step counts: {counts}"
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    # A materialised window's parts need no coordinating actor (nothing to start, nothing to sync every epoch).
    assert all(isinstance(s["train"], StreamSplitDataIterator) != materialized for s in splits)
    if materialized:
        # Fixed parts: a rank sees the same rows at every epoch, and no row reaches two ranks.
        for rank in per_rank:
            assert len({frozenset(epoch) for epoch in rank}) == 1
        firsts = [set(rank[0]) for rank in per_rank]
        assert sum(len(s) for s in firsts) == len(set().union(*firsts))
