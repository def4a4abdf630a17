"""The training and validation windows as the train stage hands them to Ray Train.

Streamed (``train.materialize: never``, or windows too large for the object store): Ray Data reads the files every
epoch, and Ray Train's default :class:`ray.train.DataConfig` splits the stream over the workers
(``streaming_split(equal=True)``, coordinated by an actor per window).

Materialised: the windows are read once into the object store. A window that one node can hold is read, and globally
shuffled with a seeded permutation, by one Ray task with pyarrow; Ray Data's distributed shuffle would launch a map and
a reduce task per block, seconds of fixed cost on a small window. Larger windows keep Ray Data's read and shuffle.
The task is started, not awaited: Ray Train makes the dataset of its blocks in its controller, once the workers
exist, so the read overlaps their start. The workers then get equal, fixed parts of the materialised blocks
(:class:`EqualSplitsOfMaterialized`): no coordinating actor to start, and no coordination again at every epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.train

if TYPE_CHECKING:
    from ray.data import DataIterator, Dataset, NodeIdStr

# Over the decoded window: the read table and its permuted copy, with room for the Arrow buffers in between.
ONE_TASK_MEMORY_FACTOR = 3.0


class EqualSplitsOfMaterialized(ray.train.DataConfig):
    """Ray Train's data config, with materialised windows split into fixed, equal parts: ``Dataset.split(equal=True)``
    hands each worker ``rows // world`` rows (the same accounting as the streaming split), decided once, so every epoch
    iterates the worker's own blocks from the object store. Streamed windows keep Ray Train's streaming split."""

    def configure(
        self,
        datasets: dict[str, Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: list[NodeIdStr] | None,
        **kwargs: Any,
    ) -> list[dict[str, DataIterator]]:
        from ray.data.dataset import MaterializedDataset

        streamed = {name: ds for name, ds in datasets.items() if not isinstance(ds, MaterializedDataset)}
        output: list[dict[str, DataIterator]] = (
            super().configure(streamed, world_size, worker_handles, worker_node_ids, **kwargs)
            if streamed
            else [{} for _ in range(world_size)]
        )
        for name, ds in datasets.items():
            if name in streamed:
                continue
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            # No locality hints: Dataset.split takes them as actor handles, Ray Train hands node ids.
            for rank, part in enumerate(ds.split(world_size, equal=True)):
                output[rank][name] = part.iterator()
        return output


@dataclass(frozen=True)
class WindowSource:
    """One window's files and how to read them."""

    files: list[str]
    shuffle_seed: int | None  # a global shuffle's seed; None keeps the files' order


def _read_in_one_task(files: list[str], shuffle_seed: int | None, blocks: int) -> list[pa.Table]:
    table = pq.read_table(files)
    if shuffle_seed is not None:
        table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
    step = max(1, math.ceil(table.num_rows / blocks))
    return [table.slice(i * step, step) for i in range(blocks)]


def block_count(decoded_bytes: float, world: int) -> int:
    """Blocks of at most Ray Data's target block size, and at least two per worker so the equal split has blocks to
    hand out rather than cut."""
    from ray.data import DataContext

    target = DataContext.get_current().target_max_block_size or 128 * 1024**2
    return max(2 * world, math.ceil(decoded_bytes / target))


def largest_node_memory() -> float:
    from pipeline.resources import alive_nodes

    return max((node.memory for node in alive_nodes()), default=0.0)


def read_with_ray_data(source: WindowSource, read_cpus: float) -> Dataset:
    """The window as Ray Data's lazy read, with its seeded distributed shuffle when the source has a seed."""
    import ray.data

    dataset = ray.data.read_parquet(source.files, num_cpus=read_cpus)
    return dataset.random_shuffle(seed=source.shuffle_seed) if source.shuffle_seed is not None else dataset


@dataclass(frozen=True)
class BlocksInStore:
    """A window being read into the object store by one task (its blocks' refs), made a dataset where Ray Train calls
    it: in its controller, once the workers exist, so the read runs while the controller and the workers start."""

    refs: list[Any]

    def __call__(self) -> Dataset:
        import ray.data

        return ray.data.from_arrow_refs(self.refs)


def read_materialized(
    source: WindowSource, decoded_bytes: float, world: int, read_cpus: float
) -> Dataset | BlocksInStore:
    """The window in the object store: one pyarrow task when a node has the memory for it (started, not awaited),
    otherwise Ray Data's distributed read (and seeded shuffle), materialised here."""
    import ray

    needed = ONE_TASK_MEMORY_FACTOR * decoded_bytes
    if needed > largest_node_memory():
        return read_with_ray_data(source, read_cpus).materialize()
    blocks = block_count(decoded_bytes, world)
    task = ray.remote(_read_in_one_task).options(num_returns=blocks, num_cpus=read_cpus, memory=needed or None)
    refs: Any = task.remote(source.files, source.shuffle_seed, blocks)  # one ref per block (num_returns)
    return BlocksInStore(list(refs))
