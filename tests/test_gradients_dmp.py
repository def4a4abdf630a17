"""Gradient methods under TorchRec's DistributedModelParallel with 2 gloo processes, each fed DIFFERENT data.

DMP shards the EmbeddingBagCollection (fused embedding optimizer) and wraps the dense part in DDP, which all-reduces
gradients during backward. Each method must leave identical gradients (and DRGrad identical mu) on both ranks, so that
replicas stay identical: the router runs on reduced ``.grad``, PCGrad reduces its per-task gradients itself,
uncertainty weighting reduces its log-variance gradients.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.gradients import GradientConfig, build_gradient_method, build_split_head
from models.sharding import dense_optimizer, embedding_sharders

pytestmark = pytest.mark.slow

WORLD = 2
TASKS = ["click", "buy"]
CONFIGS: dict[str, dict[str, Any]] = {
    "drgrad_paper": {
        "method": "drgrad",
        "diagnostics_every": 1,
        "drgrad": {"router_scope": "all_layers", "updater": "sum", "tied_init": True, "per_sample": True},
    },
    "drgrad_code": {"method": "drgrad", "diagnostics_every": 1, "drgrad": {"mode": "code", "split": False}},
    "pcgrad": {"method": "pcgrad", "diagnostics_every": 1},
    "uncertainty": {"method": "uncertainty", "diagnostics_every": 1},
}


class _Model(nn.Module):
    """Two sharded tables -> concat with dense -> two gates (stand-ins for MMoE gate mixtures) -> DRGrad head."""

    def __init__(self, cfg: GradientConfig, device: torch.device) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=64, feature_names=["user"]),
                EmbeddingBagConfig(name="t_item", embedding_dim=8, num_embeddings=64, feature_names=["item"]),
            ],
            device=device,
        )
        self.bottom = nn.Linear(16 + 3, 12, device=device)
        self.gate1 = nn.Linear(12, 6, device=device)
        self.gate2 = nn.Linear(12, 6, device=device)
        self.head = build_split_head(cfg.drgrad, 6, [4], TASKS, device=device)

    def forward(self, kjt: KeyedJaggedTensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.ebc(kjt)
        h = torch.relu(self.bottom(torch.cat([emb["user"], emb["item"], dense], dim=1)))
        return self.head(torch.tanh(self.gate1(h)), torch.tanh(self.gate2(h)))


def _batch(rank: int, step: int, n: int = 32) -> tuple[KeyedJaggedTensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * rank + step)  # different data on every rank
    ids = torch.randint(0, 64, (2 * n,), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item"], values=ids, lengths=torch.ones(2 * n, dtype=torch.int32)
    )
    dense = torch.randn(n, 3, generator=g)
    labels = {t: (torch.rand(n, generator=g) < 0.4).float() for t in TASKS}
    return kjt, dense, labels


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _shard(model: nn.Module, device: torch.device) -> DistributedModelParallel:
    """As ``models.sharding.shard_model``, but with one table forced table-wise (fused optimizer, gradients
    never materialised) and one data-parallel (a DDP parameter), so both kinds are covered."""
    sharders = embedding_sharders("sgd", 0.05)
    constraints = {
        "t_user": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]),
        "t_item": ParameterConstraints(sharding_types=[ShardingType.DATA_PARALLEL.value]),
    }
    topology = Topology(world_size=WORLD, compute_device=device.type, local_world_size=WORLD)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)


def _worker(rank: int, port: int, out_dir: str) -> None:

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        torch.manual_seed(rank)  # different seeds too: DDP's initial broadcast must make the replicas equal
        device = torch.device("cpu")
        report: dict[str, Any] = {}
        for name, raw in CONFIGS.items():
            cfg = GradientConfig.model_validate(raw)
            model = _Model(cfg, torch.device("meta"))
            dmp = _shard(model, device)
            method = build_gradient_method(cfg, dmp, TASKS)
            optimizer = dense_optimizer(dmp, 0.01)
            extra = method.extra_parameters()
            extra_opt = torch.optim.Adam(extra, lr=0.01) if extra else None
            head = next(m for m in dmp.modules() if m.__class__.__name__ == "SplitTowerHead")
            keys = list(optimizer.params)
            checks: dict[str, Any] = {
                "steps": [],
                # t_user is fused (stepped inside backward), t_item data-parallel (a dense, DDP-reduced parameter).
                "fused_table_outside_optimizer": not any("t_user" in k for k in keys),
                "dp_table_in_optimizer": any("t_item" in k for k in keys),
            }
            if cfg.drgrad.tied_init and cfg.method == "drgrad":
                w_own = head.own[0][0].weight.detach()
                w_shared = head.shared[0][0].weight.detach()
                checks["tied"] = bool(torch.equal(w_own, w_shared))
            for step in range(3):
                kjt, dense, labels = _batch(rank, step)
                out = dmp(kjt, dense)
                losses = {t: F.binary_cross_entropy_with_logits(out[t], labels[t]) for t in TASKS}
                optimizer.zero_grad()
                if extra_opt:
                    extra_opt.zero_grad()
                diag = method.backward(losses)
                dense_params = [p for _, p in optimizer.params.items()]
                grads = torch.cat([p.grad.reshape(-1) for p in dense_params if p.grad is not None])
                state = [grads, head.mu.detach()] + [p.grad.reshape(-1) for p in extra if p.grad is not None]
                flat = torch.cat(state)
                gathered = _gather(flat)
                loss_local = torch.stack([losses[t].detach() for t in TASKS])
                losses_all = _gather(loss_local)
                checks["steps"].append(
                    {
                        "grads_equal": bool(torch.equal(gathered[0], gathered[1])),
                        "grads_nonzero": bool(grads.abs().sum() > 0),
                        "losses_differ": not torch.allclose(losses_all[0], losses_all[1]),
                        "mu": head.mu.tolist(),
                        "diag": diag,
                    }
                )
                optimizer.step()
                if extra_opt:
                    extra_opt.step()
            params = torch.cat([p.detach().reshape(-1) for _, p in optimizer.params.items()])
            checks["params_equal_after"] = bool(torch.equal(*_gather(params)))
            report[name] = checks
            dist.barrier()
        torch.save(report, Path(out_dir) / f"rank{rank}.pt")
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_routing_is_identical_on_every_rank(tmp_path: Path) -> None:
    try:
        mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    except Exception:
        errors = "\n".join(p.read_text() for p in tmp_path.glob("*.err"))
        raise AssertionError(f"worker failed:\n{errors}") from None
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name in CONFIGS:
        r0, r1 = reports[0][name], reports[1][name]
        for i, (s0, s1) in enumerate(zip(r0["steps"], r1["steps"], strict=True)):
            assert s0["losses_differ"], f"{name} step {i}: ranks saw the same data, the test proves nothing"
            assert s0["grads_nonzero"]
            assert s0["grads_equal"] and s1["grads_equal"], f"{name} step {i}: gradients differ between ranks"
            assert s0["mu"] == s1["mu"]
            assert s0["diag"] == s1["diag"], f"{name} step {i}: diagnostics differ: {s0['diag']} vs {s1['diag']}"
        assert r0["params_equal_after"] and r1["params_equal_after"], f"{name}: replicas drifted apart"
        assert r0["fused_table_outside_optimizer"] and r0["dp_table_in_optimizer"], "sharding plan not as intended"
    paper = reports[0]["drgrad_paper"]
    assert paper["tied"]
    assert paper["steps"][-1]["mu"] != [0.5, 0.5]  # the updater ran
    assert "drgrad/xi1" in paper["steps"][0]["diag"] and "drgrad/sample_conflict" in paper["steps"][0]["diag"]
    assert "drgrad/w12" in reports[0]["drgrad_code"]["steps"][0]["diag"]
    assert "pcgrad/cos_mean" in reports[0]["pcgrad"]["steps"][0]["diag"]
