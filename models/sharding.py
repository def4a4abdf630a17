"""Sharding a spec-built model with TorchRec's planner and DistributedModelParallel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from models.memory import WorkerMemory, worker_memory

_EMB_OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "sgd": EmbOptimType.EXACT_SGD,
}


def embedding_sharders(optimizer: str, learning_rate: float) -> list[ModuleSharder[nn.Module]]:
    """Sharders whose kernels apply the embedding optimizer inside backward (fused TBE): the embedding gradients are
    never materialised, so only dense parameters see an ordinary optimizer."""
    fused: dict[str, Any] = {"optimizer": _EMB_OPTIMIZERS[optimizer], "learning_rate": learning_rate}
    if optimizer in ("rowwise_adagrad", "adagrad"):
        fused["eps"] = 1e-8
    return [
        EmbeddingBagCollectionSharder(fused_params=fused),  # type: ignore[list-item]
        EmbeddingCollectionSharder(fused_params=fused),  # type: ignore[list-item]
    ]


class ShardingPlanError(RuntimeError):
    """The planner could not place the tables; the message names the table and the memory it needs."""


_OPTIMIZER_STATE_FACTOR = {
    "rowwise_adagrad": 0.0,
    "adagrad": 1.0,
    "adam": 2.0,
    "sgd": 0.0,
}  # per-element state beyond the weights


def table_bytes(num_rows: int, dim: int, optimizer: str) -> int:
    """Weights plus optimizer state of one fp32 table (row-wise Adagrad keeps one float per row)."""
    rowwise = num_rows * 4 if optimizer == "rowwise_adagrad" else 0
    return int(num_rows * dim * 4 * (1.0 + _OPTIMIZER_STATE_FACTOR[optimizer]) + rowwise)


def planner_topology(device: torch.device, world_size: int, local_world_size: int, memory: WorkerMemory) -> Topology:
    """The planner's view of the workers: ``memory`` (real or configured capacities) instead of TorchRec's defaults."""
    return Topology(
        world_size=world_size,
        compute_device=device.type,
        local_world_size=local_world_size,
        ddr_cap=memory.ddr,
        **({"hbm_cap": memory.hbm} if memory.hbm is not None else {}),
    )


def shard_model(
    model: nn.Module,
    device: torch.device,
    sharders: list[ModuleSharder[nn.Module]],
    local_world_size: int | None = None,
    table_sharding: dict[str, list[str]] | None = None,
    memory_per_worker_gb: float | None = None,
    table_sizes: dict[str, tuple[int, int]] | None = None,
    optimizer: str = "rowwise_adagrad",
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan collectively (every rank gets the same plan) and wrap in DMP, which materialises meta parameters.

    ``table_sharding`` restricts tables to sharding types; the planner's capacities are the worker's real memory
    (:func:`models.memory.worker_memory`), or ``memory_per_worker_gb`` where set; ``table_sizes`` (table -> (rows,
    dim)) lets a failed plan name the table that does not fit. A table the planner leaves out of the plan is an
    error, never a silent drop.
    """
    world_size = dist.get_world_size()
    cap = int(memory_per_worker_gb * 1024**3) if memory_per_worker_gb else None
    memory = worker_memory(device, local_world_size or world_size, cap)
    topology = planner_topology(device, world_size, local_world_size or world_size, memory)
    constraints = {
        name: ParameterConstraints(sharding_types=list(types)) for name, types in (table_sharding or {}).items()
    }
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    try:
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    except PlannerError as err:
        raise ShardingPlanError(
            _explain_plan_failure(
                table_sizes or {},
                table_sharding or {},
                memory.hbm or memory.ddr,
                "train.sharding.memory_per_worker_gb" if cap else "this worker's memory",
                world_size,
                optimizer,
                err,
            )
        ) from err
    except RuntimeError as err:
        if "No available sharding type" not in str(err):
            raise
        # The enumerator found no (sharding type, kernel) pair for a pinned table on this topology.
        raise ShardingPlanError(
            f"{str(err).splitlines()[0]} (train.sharding.tables pins {table_sharding}; on {world_size} worker(s) "
            "some sharding types do not apply, e.g. row_wise needs more than one worker)"
        ) from err
    planned = set(describe_plan(plan))
    missing = sorted(set(table_sizes or {}) - planned)
    if missing:
        raise ShardingPlanError(f"the sharding plan leaves out tables {missing}; refusing to train without them")
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    return dmp, plan


def _explain_plan_failure(
    sizes: dict[str, tuple[int, int]],
    pinned: dict[str, list[str]],
    cap: int | None,
    cap_source: str,
    world_size: int,
    optimizer: str,
    err: Exception,
) -> str:
    gib = 1024**3
    need = {name: table_bytes(rows, dim, optimizer) for name, (rows, dim) in sizes.items()}
    lines = [f"the TorchRec planner could not place the embedding tables on {world_size} worker(s)"]
    if cap is not None:
        lines[0] += f" with {cap / gib:.2f} GiB each ({cap_source})"
    unsplittable = {"table_wise", "data_parallel"}
    for name, nbytes in sorted(need.items(), key=lambda kv: -kv[1]):
        types = set(pinned.get(name, []))
        whole_on_one = bool(types) and types <= unsplittable
        if cap is not None and (nbytes > cap * world_size or (whole_on_one and nbytes > cap)):
            how = f"pinned to {sorted(types)}, so one worker must hold it" if whole_on_one else "across all workers"
            lines.append(f"table '{name}' needs {nbytes / gib:.2f} GiB (weights + optimizer state), {how}")
    if len(lines) == 1:
        total = sum(need.values())
        lines.append(
            f"tables need {total / gib:.2f} GiB in all: "
            + ", ".join(f"'{n}' {b / gib:.3f} GiB" for n, b in sorted(need.items(), key=lambda kv: -kv[1])[:5])
        )
    lines.append("use row_wise/column_wise sharding, more workers, fewer buckets, or more memory per worker")
    lines.append(f"planner said: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return "\n".join(lines)


def dense_optimizer(
    model: nn.Module,
    lr: float,
    extra: list[nn.Parameter] | None = None,
    table_optimizer: str | None = None,
    table_lr: float | None = None,
) -> KeyedOptimizer:
    """Adam over every parameter that the fused embedding kernels do not update (dense layers), plus ``extra``
    parameters owned outside the model (a gradient method's, e.g. uncertainty log-variances).

    Tables the planner made data-parallel are not fused either: with ``table_optimizer`` they get the embedding
    optimizer at ``table_lr`` (the same rule as the fused tables, whichever sharding the planner picked), otherwise
    Adam with the dense layers."""
    from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice

    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    params.update({f"gradient_method.{i}": p for i, p in enumerate(extra or [])})
    tables = {k: p for k, p in params.items() if isinstance(p, TableBatchedEmbeddingSlice)}
    if table_optimizer is None or not tables:
        return KeyedOptimizerWrapper(params, lambda p: torch.optim.Adam(p, lr=lr))
    rest = {k: p for k, p in params.items() if k not in tables}
    make = _table_optimizers(table_optimizer, table_lr if table_lr is not None else lr)
    return CombinedOptimizer(
        [
            ("dense", KeyedOptimizerWrapper(rest, lambda p: torch.optim.Adam(p, lr=lr))),
            ("tables", KeyedOptimizerWrapper(tables, make)),
        ]
    )


def _table_optimizers(kind: str, lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    """The unfused counterparts of the fused kernels' optimizers (same eps as :func:`embedding_sharders`)."""
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    factories: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
        "rowwise_adagrad": lambda p: RowWiseAdagrad(p, lr=lr, eps=1e-8),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=lr, eps=1e-8),
        "adam": lambda p: torch.optim.Adam(p, lr=lr),
        "sgd": lambda p: torch.optim.SGD(p, lr=lr),
    }
    return factories[kind]


def unwrapped_name(key: str) -> str:
    """A DMP state-dict key as the unsharded model names it (DMP's and DDP's wrapper prefixes removed): the names of
    the exported weights, whichever worker count wrote the checkpoint."""
    return key.removeprefix("_dmp_wrapped_module.").removeprefix("module.")


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0; other ranks take part in the gathers and get an empty dict.
    Gathers land on the collective's device and are then copied to the CPU.

    Sharded tables come out of DMP's state_dict as ShardedTensor (or DTensor); every rank must call this.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = unwrapped_name(key)
        if isinstance(value, ShardedTensor):
            # The gather runs on the collective's device (NCCL rejects CPU buffers): allocate there, copy out after.
            device = _collective_device(value)
            full = torch.empty(value.size(), dtype=value.dtype, device=device) if rank == 0 else None
            value.gather(dst=0, out=full)
            tensor = full.cpu() if full is not None else None
        elif isinstance(value, DTensor):
            tensor = value.full_tensor().cpu()
        else:
            tensor = value.detach().cpu()
        if rank == 0 and tensor is not None:
            out[name] = tensor.contiguous()
    return out


def _collective_device(value: Any) -> torch.device:
    """Where ``ShardedTensor.gather`` puts its data: torch's own choice (CUDA under NCCL, CPU under gloo), so that
    rank 0's receive buffers live on the same device as every rank's send buffer."""
    return torch.device(value._get_preferred_device())


def describe_plan(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """Plan as plain data (table -> sharding type, kernel, ranks) for logs and run artifacts."""
    summary: dict[str, dict[str, Any]] = {}
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[attr-defined]
            ranks = sorted({r for r in (ps.ranks or [])})
            summary[table] = {
                "module": module_path,
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": ranks,
            }
    return summary
