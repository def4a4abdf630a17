"""Sharding a spec-built model with TorchRec's planner and DistributedModelParallel."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

_EMB_OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "sgd": EmbOptimType.EXACT_SGD,
}


def embedding_sharders(optimizer: str, learning_rate: float) -> list[ModuleSharder[nn.Module]]:
    """Sharders whose kernels apply the embedding optimizer inside backward (fused TBE): the embedding gradients are
    never materialised, so only dense parameters see an ordinary optimizer."""
    fused: dict[str, Any] = {"optimizer": _EMB_OPTIMIZERS[optimizer], "learning_rate": learning_rate}
    if optimizer == "rowwise_adagrad":
        fused["eps"] = 1e-8
    return [
        EmbeddingBagCollectionSharder(fused_params=fused),  # type: ignore[list-item]
        EmbeddingCollectionSharder(fused_params=fused),  # type: ignore[list-item]
    ]


def shard_model(
    model: nn.Module,
    device: torch.device,
    sharders: list[ModuleSharder[nn.Module]],
    local_world_size: int | None = None,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan collectively (every rank gets the same plan) and wrap in DMP, which materialises meta parameters."""
    world_size = dist.get_world_size()
    topology = Topology(
        world_size=world_size,
        compute_device=device.type,
        local_world_size=local_world_size or world_size,
    )
    planner = EmbeddingShardingPlanner(topology=topology)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    return dmp, plan


def dense_optimizer(model: nn.Module, lr: float) -> KeyedOptimizerWrapper:
    """Adam over every parameter that the fused embedding kernels do not update (dense layers, data-parallel tables)."""
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    return KeyedOptimizerWrapper(params, lambda p: torch.optim.Adam(p, lr=lr))


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0; other ranks take part in the gathers and get an empty dict.

    Sharded tables come out of DMP's state_dict as ShardedTensor (or DTensor); every rank must call this.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = key.removeprefix("_dmp_wrapped_module.").removeprefix("module.")
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            tensor = full
        elif isinstance(value, DTensor):
            tensor = value.full_tensor().cpu()
        else:
            tensor = value.detach().cpu()
        if rank == 0 and tensor is not None:
            out[name] = tensor.contiguous()
    return out


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
