"""Behind the resource check: a training worker that waits too long for its next batch while the cluster has no CPU
for a data task fails with the reason, instead of waiting forever.

That happens when other work takes the CPUs the check counted on (another job, a node lost and its workers placed
beside the data path). The batches are pulled in a helper thread so the worker can look up while it waits; the order
of the batches is unchanged.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class DataStallError(RuntimeError):
    """No training batch within ``train.stall_timeout_s`` and no CPU free for the data path's tasks."""


def free_cpus() -> float:
    """CPUs not held by anything on the whole cluster (Ray's view), from inside a worker or driver."""
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def stall_message(waited_s: float, timeout_s: float, free: float, read_task_cpus: float) -> str:
    return (
        f"no training batch for {waited_s:.0f}s (train.stall_timeout_s={timeout_s:g}) and the Ray cluster has "
        f"{free:g} CPUs free while a data-path read task needs {read_task_cpus:g}: the training workers and other "
        "work hold every CPU, so the data stream cannot be scheduled. Lower train.num_workers or "
        "train.cpus_per_worker, or give the cluster more CPUs"
    )


def watched_batches(
    batches: Iterator[T],
    timeout_s: float,
    read_task_cpus: float,
    poll_s: float = 5.0,
    cpus_free: Callable[[], float] = free_cpus,
) -> Iterator[T]:
    """Yield from ``batches``; raise :class:`DataStallError` when none arrives within ``timeout_s`` while fewer than
    ``read_task_cpus`` CPUs are free. A slow batch with CPUs free is just slow: keep waiting."""
    items: queue.Queue[object] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=poll_s)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            items.put(err)

    threading.Thread(target=produce, name="batch-feeder", daemon=True).start()
    try:
        while True:
            started = time.monotonic()
            while True:
                try:
                    item = items.get(timeout=poll_s)
                    break
                except queue.Empty:
                    waited = time.monotonic() - started
                    if waited >= timeout_s:
                        free = cpus_free()
                        if free < read_task_cpus:
                            raise DataStallError(stall_message(waited, timeout_s, free, read_task_cpus)) from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
