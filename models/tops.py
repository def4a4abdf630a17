"""Tops: how the tasks share dense layers between the bottom and the per-task towers.

Every top maps one input per task to one representation per task, ``forward(task_inputs) -> list[Tensor]``, and
exposes ``out_dim``. Under a plain bottom all task inputs are the *same* tensor object; under DTRN each task brings
its own ``h_k``. Tops detect the shared case by identity and then run shared layers once, so a plain bottom pays
nothing for the generality.

* ``SharedBottom``: ``y_k = tower_k(f(x_k))``, one MLP ``f`` for every task.
* ``MMoE``: ``f_k(x) = sum_i softmax(W_k x_k)_i expert_i(.)``.
* ``PLE`` (``CGC`` is one level): task-owned experts plus shared experts; task k's gate mixes its own and the shared
  experts; each further level reads the previous level's task outputs, and a shared gate over all experts feeds the
  next level's shared experts (absent at the last level).

What shared experts read when the task inputs differ (DTRN + MMoE / PLE) is our reading of the DTRN paper, a switch
(``dtrn.expert_input``): ``per_task`` runs a shared expert on each ``h_k`` (gate k mixes experts evaluated on h_k),
``mean`` runs it once on the mean of the ``h_k``. The PLE shared gate of the first level reads the mean of the ``h_k``.

Only standard layers (``nn.Linear``) hold parameters, so every top builds on the meta device and DMP's
``reset_parameters`` materialises it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from models.config import ModelConfig
from models.mlp import MLP

ExpertInput = Literal["per_task", "mean"]


class Top(nn.Module):
    """Interface of a top: one input per task in, one representation per task out, each [B, out_dim]."""

    out_dim: int

    def forward(self, task_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError


def _all_same(xs: list[torch.Tensor]) -> bool:
    return all(x is xs[0] for x in xs)


def _shared_input(xs: list[torch.Tensor]) -> torch.Tensor:
    """The one input that shared layers read: the input itself when every task has it, else the tasks' mean."""
    return xs[0] if _all_same(xs) else torch.stack(xs).mean(dim=0)


class _ExpertCache:
    """Runs a group of experts on an input once per forward pass: stacks their outputs [B, n_experts, D]."""

    def __init__(self, experts: nn.ModuleList) -> None:
        self.experts = experts
        self._done: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for inp, out in self._done:
            if inp is x:
                return out
        out = torch.stack([e(x) for e in self.experts], dim=1)
        self._done.append((x, out))
        return out


def _mix(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum_i softmax(gate)_i * expert_i: [B, E] x [B, E, D] -> [B, D]."""
    return torch.einsum("be,bed->bd", torch.softmax(gate_logits, dim=-1), experts)


class SharedBottom(Top):
    """``y_k = tower_k(f(x_k))``: one bottom MLP for every task (``hidden=[]`` passes the inputs through)."""

    def __init__(
        self, in_dim: int, hidden: list[int], num_tasks: int, dropout: float, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.bottom = MLP(
            in_dim, hidden, dropout, device
        )  # name kept: models saved by earlier versions use 'top.bottom.*'
        self.num_tasks = num_tasks
        self.out_dim = self.bottom.out_dim

    def forward(self, task_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if _all_same(task_inputs):
            shared = self.bottom(task_inputs[0])
            return [shared] * self.num_tasks
        return [self.bottom(x) for x in task_inputs]


class MMoE(Top):
    """Multi-gate mixture of experts: ``num_experts`` shared expert MLPs, one softmax gate per task."""

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        num_experts: int,
        expert_mlp: list[int],
        dropout: float = 0.0,
        device: torch.device | None = None,
        expert_input: ExpertInput = "per_task",
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList([MLP(in_dim, expert_mlp, dropout, device) for _ in range(num_experts)])
        self.gates = nn.ModuleList([nn.Linear(in_dim, num_experts, device=device) for _ in range(num_tasks)])
        self.expert_input = expert_input
        self.out_dim = expert_mlp[-1]

    def forward(self, task_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.expert_input == "per_task" and not _all_same(task_inputs):
            # Each expert runs once on the tasks' inputs stacked along the batch (same rows, one call per expert).
            k, b = len(task_inputs), task_inputs[0].shape[0]
            stacked = torch.cat(task_inputs)
            outs = torch.stack([e(stacked) for e in self.experts], dim=1).view(k, b, len(self.experts), -1)
            return [_mix(gate(x), outs[i]) for i, (gate, x) in enumerate(zip(self.gates, task_inputs, strict=True))]
        run = _ExpertCache(self.experts)
        common = _shared_input(task_inputs) if self.expert_input == "mean" else None
        return [
            _mix(gate(x), run(x if common is None else common)) for gate, x in zip(self.gates, task_inputs, strict=True)
        ]


class PLELevel(nn.Module):
    """One extraction level (CGC): per-task experts, shared experts, per-task gates and, unless it is the last level,
    a shared gate over every expert that feeds the next level's shared experts."""

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        task_experts: int,
        shared_experts: int,
        expert_mlp: list[int],
        last: bool,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(
            [
                nn.ModuleList([MLP(in_dim, expert_mlp, dropout, device) for _ in range(task_experts)])
                for _ in range(num_tasks)
            ]
        )
        self.shared_experts = nn.ModuleList([MLP(in_dim, expert_mlp, dropout, device) for _ in range(shared_experts)])
        self.task_gates = nn.ModuleList(
            [nn.Linear(in_dim, task_experts + shared_experts, device=device) for _ in range(num_tasks)]
        )
        self.shared_gate = None if last else nn.Linear(in_dim, num_tasks * task_experts + shared_experts, device=device)
        self.out_dim = expert_mlp[-1]

    def forward(
        self, task_in: list[torch.Tensor], shared_in: torch.Tensor, shared_per_task: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``shared_per_task``: task k's gate mixes shared experts run on task k's input (else on ``shared_in``)."""
        shared = _ExpertCache(self.shared_experts)
        own = [
            torch.stack([e(x) for e in experts.children()], dim=1)
            for experts, x in zip(self.task_experts, task_in, strict=True)
        ]
        outs = [
            _mix(gate(x), torch.cat([own[k], shared(x if shared_per_task else shared_in)], dim=1))
            for k, (gate, x) in enumerate(zip(self.task_gates, task_in, strict=True))
        ]
        if self.shared_gate is None:
            return outs, None
        return outs, _mix(self.shared_gate(shared_in), torch.cat([*own, shared(shared_in)], dim=1))


class PLE(Top):
    """Progressive layered extraction: ``num_levels`` stacked ``PLELevel``s (one level is CGC)."""

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        num_levels: int,
        task_experts: int,
        shared_experts: int,
        expert_mlp: list[int],
        dropout: float = 0.0,
        device: torch.device | None = None,
        expert_input: ExpertInput = "per_task",
    ) -> None:
        super().__init__()
        levels = []
        dim = in_dim
        for i in range(num_levels):
            level = PLELevel(
                dim, num_tasks, task_experts, shared_experts, expert_mlp, i == num_levels - 1, dropout, device
            )
            levels.append(level)
            dim = level.out_dim
        self.levels = nn.ModuleList(levels)
        self.expert_input = expert_input
        self.out_dim = dim

    def forward(self, task_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        task_in, shared_in = task_inputs, _shared_input(task_inputs)
        for i, level in enumerate(self.levels):
            # Only the first level sees distinct per-task inputs that are not PLE's own: later levels follow the
            # standard PLE wiring (shared experts read the previous shared gate's output).
            per_task = i == 0 and self.expert_input == "per_task" and not _all_same(task_in)
            task_in, shared_out = level(task_in, shared_in, per_task)
            if shared_out is not None:
                shared_in = shared_out
        return task_in


def build_top(cfg: ModelConfig, in_dim: int, num_tasks: int, device: torch.device | None = None) -> Top:
    """The top named by ``cfg.top``, with its sub-section's sizes."""
    expert_input: ExpertInput = cfg.dtrn.expert_input
    if cfg.top == "shared_bottom":
        return SharedBottom(in_dim, cfg.bottom_mlp, num_tasks, cfg.dropout, device)
    if cfg.top == "mmoe":
        m = cfg.mmoe
        return MMoE(in_dim, num_tasks, m.num_experts, m.expert_mlp, cfg.dropout, device, expert_input)
    p = cfg.ple
    levels = 1 if cfg.top == "cgc" else p.num_levels
    return PLE(
        in_dim, num_tasks, levels, p.task_experts, p.shared_experts, p.expert_mlp, cfg.dropout, device, expert_input
    )
