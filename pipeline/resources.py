"""Does the training run fit the Ray cluster? Checked before the trainer starts, so a cluster that is too small fails
in seconds with the numbers and the settings to change, instead of hanging.

A run needs, at the same time: the training workers (``train.num_workers`` x ``train.cpus_per_worker`` CPUs, a GPU
each with ``train.use_gpu``, and ``train.sharding.memory_per_worker_gb`` of memory when set), and room for the data
path: Ray Data's read tasks stream the training window while the workers train, ``min(1, train.data_cpus)`` CPUs
each, ``train.data_cpus`` in all. The split coordinator that deals the stream out to the workers asks for no CPU, and
the collate function runs inside the workers. When the workers take every CPU, the read tasks can never start and the
workers wait for them forever: that is the hang this check prevents.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.config import ExperimentConfig
from pipeline.watchdog import DataStallError

GIB = 1024**3


class ClusterTooSmallError(RuntimeError):
    """The Ray cluster cannot hold the training workers and the data path together."""


class ResourceWaitError(RuntimeError):
    """The training workers did not get their resources within ``train.resource_wait_s`` (e.g. a lost node was not
    replaced)."""


@dataclass(frozen=True)
class TrainingNeeds:
    num_workers: int
    cpus_per_worker: int
    gpus_per_worker: int
    memory_per_worker: float  # bytes; 0 = not reserved
    data_cpus: float
    placement_strategy: str

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> TrainingNeeds:
        memory_gb = cfg.train.sharding.memory_per_worker_gb
        return cls(
            num_workers=cfg.train.num_workers,
            cpus_per_worker=cfg.train.cpus_per_worker,
            gpus_per_worker=1 if cfg.train.use_gpu else 0,
            memory_per_worker=memory_gb * GIB if memory_gb else 0.0,
            data_cpus=cfg.train.data_cpus,
            placement_strategy=cfg.train.placement_strategy,
        )

    @property
    def read_task_cpus(self) -> float:
        return min(1.0, self.data_cpus)

    @property
    def worker_cpus(self) -> int:
        return self.num_workers * self.cpus_per_worker

    @property
    def total_cpus(self) -> float:
        return self.worker_cpus + self.data_cpus

    def resources_per_worker(self) -> dict[str, float]:
        """Ray Train's ``resources_per_worker`` (the GPU comes from ``use_gpu``)."""
        out: dict[str, float] = {"CPU": float(self.cpus_per_worker)}
        if self.memory_per_worker:
            out["memory"] = self.memory_per_worker
        return out

    def per_worker(self) -> str:
        parts = [f"{self.cpus_per_worker} CPU (train.cpus_per_worker)"]
        if self.gpus_per_worker:
            parts.append(f"{self.gpus_per_worker} GPU (train.use_gpu)")
        if self.memory_per_worker:
            parts.append(f"{self.memory_per_worker / GIB:g} GiB memory (train.sharding.memory_per_worker_gb)")
        return ", ".join(parts)

    def describe(self) -> str:
        parts = [
            f"train.num_workers={self.num_workers} x train.cpus_per_worker={self.cpus_per_worker} = "
            f"{self.worker_cpus} CPUs for the workers"
        ]
        if self.gpus_per_worker:
            parts.append(f"{self.num_workers} GPUs (train.use_gpu=true)")
        if self.memory_per_worker:
            gib = self.memory_per_worker / GIB
            parts.append(f"{gib:g} GiB memory per worker (train.sharding.memory_per_worker_gb)")
        parts.append(f"train.data_cpus={self.data_cpus:g} for the data path (Ray Data read tasks)")
        return " + ".join(parts)


@dataclass(frozen=True)
class NodeResources:
    address: str
    cpus: float
    gpus: float
    memory: float  # bytes
    is_head: bool = False

    def describe(self) -> str:
        role = " (head)" if self.is_head else ""
        gpus = f", {self.gpus:g} GPUs" if self.gpus else ""
        return f"{self.address}{role}: {self.cpus:g} CPUs{gpus}, {self.memory / GIB:.1f} GiB"


def alive_nodes() -> list[NodeResources]:
    """The cluster's alive nodes and their total (not currently free) resources; needs a connected Ray."""
    import ray

    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        nodes.append(
            NodeResources(
                address=str(node.get("NodeManagerAddress", "?")),
                cpus=float(res.get("CPU", 0.0)),
                gpus=float(res.get("GPU", 0.0)),
                memory=float(res.get("memory", 0.0)),
                is_head=any(key.startswith("node:__internal_head__") for key in res),
            )
        )
    return nodes


def _workers_fitting(node: NodeResources, needs: TrainingNeeds) -> int:
    fits = [math.floor(node.cpus / needs.cpus_per_worker + 1e-9)]
    if needs.gpus_per_worker:
        fits.append(math.floor(node.gpus / needs.gpus_per_worker + 1e-9))
    if needs.memory_per_worker:
        fits.append(math.floor(node.memory / needs.memory_per_worker))
    n = max(0, min(fits))
    return min(n, 1) if needs.placement_strategy == "STRICT_SPREAD" else n


def _best_data_node_room(needs: TrainingNeeds, nodes: list[NodeResources], fits: list[int]) -> float:
    """The most CPUs one node can keep free for a read task, over the placements of the workers that fit."""
    best = -1.0
    for k, node in enumerate(nodes):
        if needs.placement_strategy == "STRICT_PACK":
            if any(f >= needs.num_workers for i, f in enumerate(fits) if i != k):
                best = max(best, node.cpus)
            elif fits[k] >= needs.num_workers:
                best = max(best, node.cpus - needs.worker_cpus)
            continue
        elsewhere = sum(f for i, f in enumerate(fits) if i != k)
        here = max(0, needs.num_workers - elsewhere)
        if here <= fits[k]:
            best = max(best, node.cpus - here * needs.cpus_per_worker)
    return best


def check_fits(needs: TrainingNeeds, nodes: list[NodeResources]) -> None:
    """Raise :class:`ClusterTooSmallError` unless the workers and the data path fit on ``nodes`` together."""
    have = "; ".join(n.describe() for n in nodes) or "no alive node"
    total_cpus = sum(n.cpus for n in nodes)
    knobs = "Lower train.num_workers or train.cpus_per_worker, or add nodes/CPUs to the cluster"
    fits = [_workers_fitting(n, needs) for n in nodes]
    placeable = max(fits, default=0) if needs.placement_strategy == "STRICT_PACK" else sum(fits)
    if placeable < needs.num_workers:
        raise ClusterTooSmallError(
            f"the Ray cluster cannot place the training workers: train.num_workers={needs.num_workers} of "
            f"{needs.per_worker()} each (train.placement_strategy={needs.placement_strategy}), room for "
            f"{placeable}. The cluster has: {have}. {knobs}."
        )
    free_after_workers = total_cpus - needs.worker_cpus
    room = _best_data_node_room(needs, nodes, fits)
    if free_after_workers + 1e-9 < needs.data_cpus or room + 1e-9 < needs.read_task_cpus:
        raise ClusterTooSmallError(
            f"the Ray cluster has {total_cpus:g} CPUs; training needs {needs.total_cpus:g} at once: "
            f"{needs.describe()}. With the workers on every CPU the data path cannot start and training would wait "
            f"forever. {knobs}, or lower train.data_cpus (at least one node must keep "
            f"{needs.read_task_cpus:g} CPU free beside its workers). The cluster has: {have}."
        )


def check_cluster(cfg: ExperimentConfig) -> TrainingNeeds:
    """Connect to Ray (see :func:`pipeline.runtime.ensure_ray`) and check that the run fits; returns the needs."""
    from pipeline.runtime import ensure_ray

    ensure_ray(cfg)
    needs = TrainingNeeds.of(cfg)
    check_fits(needs, alive_nodes())
    return needs


def local_cpus(cfg: ExperimentConfig) -> int:
    """Logical CPUs for a local Ray: the machine's cores, or what the run needs at once when that is more (the
    workers and the data path then share the cores; ``ray.init`` cannot give a local node fewer than it needs)."""
    return max(os.cpu_count() or 1, math.ceil(TrainingNeeds.of(cfg).total_cpus))


# Ray Train reads how long a worker group may wait for its placement group from this variable (driver side; it passes
# it on to its controller).
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextlib.contextmanager
def controller_settings(resource_wait_s: float, poll_s: float) -> Iterator[None]:
    """Ray Train's controller settings for one ``fit()``, passed the way it reads them: environment variables of the
    driver, which it forwards to the controller actor (on a cluster too).

    ``resource_wait_s``: how long it waits for the workers' resources (its default is a minute, then retry forever).
    ``poll_s``: how often it polls the workers. It takes their reports and notices that they finished only at a poll,
    so at its default of 2 s every run ended up to 4 s after its last step.
    """
    values = {WORKER_START_TIMEOUT_ENV: str(resource_wait_s), CONTROLLER_POLL_ENV: str(poll_s)}
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_STALL = re.compile(r"no training batch for .*?give the cluster more CPUs")


def explain_training_failure(err: BaseException, cfg: ExperimentConfig, needs: TrainingNeeds) -> Exception | None:
    """A clear error for the failures that are about the cluster, not the model; None for the others."""
    import ray.train

    if isinstance(err, ray.train.ControllerError):
        cause = err.controller_failure
        if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
            try:
                have = "; ".join(n.describe() for n in alive_nodes()) or "no alive node"
            except Exception:  # the cluster itself may be what went away
                have = "unknown (the cluster does not answer)"
            return ResourceWaitError(
                f"the training workers did not get their resources within train.resource_wait_s="
                f"{cfg.train.resource_wait_s:g}s: they need {needs.describe()} "
                f"(train.placement_strategy={needs.placement_strategy}); the cluster now has: {have}. A lost node "
                "was not replaced, or other work holds the resources: add a node, raise train.resource_wait_s to "
                "wait longer, or lower train.num_workers or train.cpus_per_worker"
            )
    if isinstance(err, ray.train.WorkerGroupError):
        for failure in err.worker_failures.values():
            found = _STALL.search(str(failure).replace("\n", " "))
            if found:
                return DataStallError(found.group(0))
    return None


#: The failures about the cluster rather than the model: the CLI prints them as errors, without a stack trace.
CLUSTER_ERRORS: tuple[type[Exception], ...] = (ClusterTooSmallError, ResourceWaitError, DataStallError)
