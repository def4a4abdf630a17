"""Multi-task gradient methods behind one call that replaces ``loss.backward()`` (in the spirit of torchjd's
``mtl_backward``), chosen in the experiment YAML's ``gradients:`` section.

    model = build_model(spec, model_cfg, device, drgrad=head_config(cfg))   # the split tower when method: drgrad
    method = build_gradient_method(cfg, model, task_names)
    optimizer = dense_optimizer(...) + method.extra_parameters()
    ...
    optimizer.zero_grad()
    diagnostics = method.backward(losses)      # losses: {task: scalar loss}, unweighted
    optimizer.step()

A runnable example (plain PyTorch; under DistributedModelParallel pass the DMP-wrapped model):

>>> import torch
>>> from torch import nn
>>> from models.drgrad import SplitTowerHead
>>> from models.gradients import GradientConfig, build_gradient_method
>>> _ = torch.manual_seed(0)
>>> class Net(nn.Module):
...     def __init__(self) -> None:
...         super().__init__()
...         self.gate1, self.gate2 = nn.Linear(8, 4), nn.Linear(8, 4)  # stand-ins for MMoE gate mixtures
...         self.head = SplitTowerHead(4, [4], ["click", "buy"])
...     def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
...         return self.head(self.gate1(x), self.gate2(x))
>>> net = Net()
>>> cfg = GradientConfig.model_validate({"method": "drgrad", "drgrad": {"updater": "ema"}, "diagnostics_every": 1})
>>> method = build_gradient_method(cfg, net, ["click", "buy"])
>>> x, y = torch.randn(16, 8), torch.randint(0, 2, (16,)).float()
>>> out = net(x)
>>> losses = {t: nn.functional.binary_cross_entropy_with_logits(out[t], y) for t in out}
>>> diag = method.backward(losses)     # ordinary backward, then routing of the towers' gradients
>>> sorted(k for k in diag if k.startswith("drgrad/"))[:3]
['drgrad/conflict', 'drgrad/lam1', 'drgrad/lam2']
>>> all(p.grad is not None for p in net.parameters())
True

Methods and the parameters each one touches. TorchRec's fused embedding optimizer applies the embedding update
inside backward and never materialises embedding gradients, so **no method here rewrites embedding gradients**: every
table is updated with the gradient of the method's total loss (``sum_k w_k L_k``; uncertainty weighting's weighted
sum). That holds for small tables the planner makes data-parallel too (Census: all 32): their gradients exist and DDP
reduces them, but they are excluded from PCGrad's shared set and from routing on purpose, so that the method does
not depend on the planner's choice of sharding.

* ``equal``: fixed weights (the spec's ``loss_weight``, 1 by default), ``sum_k w_k L_k``; ordinary gradients everywhere.
* ``uncertainty`` (Kendall et al. 2018): ``sum_k 0.5 exp(-s_k) w_k L_k + 0.5 s_k`` with learnable log-variances
  ``s_k`` owned by the method: add :meth:`GradientMethod.extra_parameters` to the dense optimizer. Changes the
  gradients of every parameter by the task weights; ``s`` gradients are averaged over ranks.
* ``pcgrad`` (Yu et al. 2020): per-task gradients on the *shared dense* parameters (``torch.autograd.grad``), averaged
  over ranks, projected (random order, seeded), summed, written to ``.grad``. Task-specific parameters (towers) get
  their ordinary gradient. Costs K - 1 extra partial backward passes over the shared dense layers (the K-th task's
  gradient is the reduced total minus the others) and keeps the graph alive until they are done.
* ``drgrad``: ordinary backward, then the router rewrites the ``.grad`` of the towers of a :class:`SplitTowerHead`
  (T1' and T1'' in paper mode; T1 and T2 in code mode) in ``router_scope``, and the updater advances the head's
  ``sigma`` (hence mu) from the routed T1' / T1'' gradients. Everything else keeps its ordinary gradient. With
  ``per_sample`` (our extension) the shared representation's gradient is additionally combined per sample inside the
  same backward (see :class:`models.drgrad.RouteFork`), which changes the gradients of everything below v_s.

Distributed training. DMP wraps the dense part in DDP, which all-reduces (averages) gradients during ``backward()``;
every method runs its own logic *after* the ordinary backward on the reduced ``.grad``, or reduces what it computes
itself (PCGrad's per-task gradients, uncertainty's ``s``), so every rank applies the same update.

Efficiency. Router and updater work on one flat vector per tower (one ``torch.cat``), with per-tensor dot products and
norms from one plain sum per parameter tensor, and write back with one ``torch._foreach_add_``. The sums are
deterministic on CUDA too (no scatter-add with atomics), so every replica routes the same reduced gradients to the
same bits and the towers and the updater's sigma stay identical across ranks. Diagnostics (floats, hence a device
sync) are computed only every ``diagnostics_every`` calls; other calls return ``{}``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.drgrad import DRGradConfig, SplitTowerHead
from models.gradient_methods import (
    DRGradRouter,
    EqualWeights,
    GradientMethod,
    PCGrad,
    PCGradConfig,
    UncertaintyConfig,
    UncertaintyWeighting,
    dense_parameters,
    find_split_head,
)
from models.gradient_rules import Segments, code_route, paper_route, paper_terms, pcgrad_project, update_sigma

__all__ = [
    "DRGradConfig",
    "DRGradRouter",
    "EqualWeights",
    "GradientConfig",
    "GradientMethod",
    "PCGrad",
    "PCGradConfig",
    "Segments",
    "UncertaintyConfig",
    "UncertaintyWeighting",
    "build_gradient_method",
    "build_split_head",
    "code_route",
    "find_split_head",
    "head_config",
    "paper_route",
    "paper_terms",
    "pcgrad_project",
    "update_sigma",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GradientConfig(_Strict):
    """The experiment YAML's ``gradients:`` section."""

    method: Literal["equal", "uncertainty", "pcgrad", "drgrad"] = "equal"
    drgrad: DRGradConfig = DRGradConfig()
    pcgrad: PCGradConfig = PCGradConfig()
    uncertainty: UncertaintyConfig = UncertaintyConfig()
    diagnostics_every: int = Field(default=50, ge=1, description="compute diagnostics every N backward calls")


def build_gradient_method(
    cfg: GradientConfig,
    model: nn.Module,
    task_names: list[str],
    weights: dict[str, float] | None = None,
) -> GradientMethod:
    """The method named by ``cfg.method`` for ``model`` (pass the DMP-wrapped model under DMP: parameters are
    materialised by the wrapper). ``weights``: fixed per-task loss weights (the spec's ``loss_weight``), default 1.

    For ``drgrad`` the model must contain one :class:`SplitTowerHead` built with the same ``primary_task``, ``split``,
    ``tied_init`` and ``per_sample`` settings; with ``tied_init`` its towers are tied here if they were not yet (a
    meta-device model is re-initialised tower by tower by DMP).
    """
    every = cfg.diagnostics_every
    if cfg.method == "equal":
        return EqualWeights(task_names, weights, every)
    if cfg.method == "uncertainty":
        params = dense_parameters(model)
        device = params[0].device if params else None
        return UncertaintyWeighting(task_names, weights, every, cfg.uncertainty, device)
    if cfg.method == "pcgrad":
        return PCGrad(model, task_names, weights, every, cfg.pcgrad)
    head = find_split_head(model)
    d = cfg.drgrad
    primary = d.primary_task or task_names[0]
    checks = {
        "primary_task": (head.primary, primary),
        "split": (head.shared is not None, d.split),
        "tied_init": (head.tied_init, d.tied_init),
        "per_sample": (head.per_sample, d.per_sample),
        "task_names": (sorted(head.task_names), sorted(task_names)),
    }
    bad = {k: v for k, v in checks.items() if v[0] != v[1]}
    if bad:
        raise ValueError(f"SplitTowerHead does not match gradients.drgrad: {bad} (head, config)")
    if d.mode == "paper" and d.router and not d.split:
        raise ValueError("drgrad.mode: paper routes T1' against T1'': it needs drgrad.split: true")
    if d.per_sample and (head.per_sample_rule != d.per_sample_rule or not math.isclose(head.gamma, d.gamma)):
        raise ValueError("SplitTowerHead per_sample_rule / gamma differ from gradients.drgrad")
    head.maybe_tie_()
    return DRGradRouter(head, task_names, weights, every, d)


def build_split_head(
    cfg: DRGradConfig,
    in_dim: int,
    hidden: list[int],
    task_names: list[str],
    dropout: float = 0.0,
    device: torch.device | None = None,
    pp_dim: int = 0,
) -> SplitTowerHead:
    """A :class:`SplitTowerHead` configured from ``gradients.drgrad`` (for the model builder). ``pp_dim``: width of
    the personalized id embeddings for the PPNet gate (0: none)."""
    return SplitTowerHead(
        in_dim,
        hidden,
        task_names,
        cfg.primary_task,
        split=cfg.split,
        tied_init=cfg.tied_init,
        mix=cfg.mix,
        per_sample=cfg.per_sample,
        per_sample_rule=cfg.per_sample_rule,
        gamma=cfg.gamma,
        dropout=dropout,
        pp_dim=pp_dim,
        device=device,
    )


def head_config(cfg: GradientConfig) -> DRGradConfig | None:
    """The DRGrad head settings when ``cfg`` asks for the split-tower model (``method: drgrad``), else None: every
    other method trains the ordinary per-task towers."""
    return cfg.drgrad if cfg.method == "drgrad" else None
