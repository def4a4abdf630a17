"""DRGrad's model side (Liu, Miao, Xia, AAAI 2025): the split primary tower, the PPNet-style personalized gate, and our
per-sample representation router. The backward side (router, updater) is in :mod:`models.gradients`.

Split tower. The primary task gets two towers of identical shape: ``T1'`` reads its own gate's
input ``v1``, ``T1''`` reads ``v_s``, the input it shares with the auxiliary towers ``T2``; every auxiliary tower has
the same shape as well, so their parameter gradients can be compared element-wise::

    logit_1 = mu1' * T1'(v1) + mu1'' * T1''(v_s)        (mix: logits, our reading; mix: probs mixes sigmoids)
    logit_k = T2_k(v_s)  (or T2_k(aux_inputs[k]))     for each auxiliary task k

``(mu1', mu1'') = softmax(sigma', sigma'')`` where ``sigma`` is a non-trainable buffer that the updater in
``gradients.py`` advances after each backward, so the new mu is used in the next forward. Storing sigma (zeros at
start, i.e. mu = 0.5 / 0.5) instead of mu keeps the head correct when DistributedModelParallel materialises a
meta-device model: DMP zero-fills meta buffers and only calls ``reset_parameters`` on modules with parameters of their
own, which this head has not.

``split=False`` builds plain per-task towers (T1 on ``v1``, T2 on ``v_s``): the MMoE baseline, and the model the
authors' code (``drgrad.mode: code``) routes between.

Per-sample router (**our extension, not in the paper**). With ``per_sample`` set, ``v_s`` goes through
:class:`RouteFork`, an autograd function that hands each consumer of ``v_s`` (T1'' and the auxiliary towers that read
it) its own copy, receives each consumer's gradient d loss_k / d v_s separately in backward (one row per sample), and
returns a combination chosen per sample. It needs no parameter gradients (so it works beside TorchRec's fused
embedding optimizer), no extra backward pass, and every rank routes its own samples before DDP's all-reduce.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.mlp import MLP

__all__ = [
    "DRGradConfig",
    "PersonalizedGate",
    "RouteFork",
    "RoutePairs",
    "SplitTowerHead",
    "per_sample_route",
]

PerSampleRule = Literal["pcgrad", "drgrad", "project_aux"]


class DRGradConfig(BaseModel):
    """The ``gradients.drgrad`` section. Defaults are the paper's Eq. 1-2 with the printed (``sum``) updater."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["paper", "code"] = Field(
        default="paper",
        description="paper: Eq. 1-2 router T1' <- T1''/T2 plus updater; code: the authors' symmetric routing between "
        "the primary and auxiliary towers with the clipped weight (their Census code)",
    )
    primary_task: str | None = Field(default=None, description="task that gets the split tower; unset: the first task")
    split: bool = Field(default=True, description="split the primary tower into T1' and T1'' (paper); false: one T1")
    router: bool = Field(default=True, description="false: no routing (Split-MMoE with updater='none')")
    gamma: float = Field(default=1.0, gt=0, description="lam = clip(|g1'|/|g|, 0, 1) ** gamma (paper leaves it open)")
    router_scope: Literal["first_layer", "all_layers"] = Field(
        default="first_layer",
        description="which parameter tensors are routed: the first Linear's weight (as the authors' code) or every "
        "tensor of the towers; xi and lam are computed per tensor",
    )
    multi_aux: Literal["sum", "per_task"] = Field(
        default="sum",
        description="(our reading) several auxiliary tasks: route against the sum of their gradients, or per task "
        "(g1''-terms averaged over tasks, g2-terms summed)",
    )
    updater: Literal["sum", "mean", "ema", "none"] = Field(
        default="sum",
        description="sigma += |g| (paper, saturates); running mean; EMA (our reading); none keeps mu at 0.5 / 0.5",
    )
    ema_decay: float = Field(default=0.99, ge=0, lt=1)
    mix: Literal["logits", "probs"] = Field(default="logits", description="(our reading) mix the towers' logits")
    tied_init: bool = Field(default=False, description="T1', T1'' and T2 start from identical weights")
    per_sample: bool = Field(
        default=False, description="OUR extension: per-sample router on d loss / d v_s (see RouteFork)"
    )
    per_sample_rule: PerSampleRule = Field(default="pcgrad", description="per-sample rule, see per_sample_route")
    personalized_gate: list[str] = Field(
        default=[],
        description="sparse feature names whose embeddings form v_pp for the PPNet-style gate on v_s (the paper: "
        "user, item and seller ids); empty: no gate (data without personalized ids, e.g. Census)",
    )
    aux_input: Literal["own", "shared"] = Field(
        default="own",
        description="(our reading) with several auxiliary tasks: each T2_k reads its own gate's representation and "
        "T1'' reads their mean (own), or every T2_k and T1'' read that mean (shared; needed by per_sample). "
        "With one auxiliary task both are the paper's v_s",
    )


# ---- per-sample representation router (our extension) ---------------------------------------------------------------
def per_sample_route(grads: list[torch.Tensor], rule: PerSampleRule, gamma: float = 1.0) -> torch.Tensor:
    """Combine the gradients ``grads[k]`` [B, D] of each consumer's loss w.r.t. the shared representation, per sample.

    ``grads[0]`` is the primary's (T1''), ``grads[1:]`` the auxiliary towers'. Rules (ours, not the paper's):

    * ``pcgrad``: PCGrad per sample: each g_k is projected off every other g_j it conflicts with (g_k . g_j < 0),
      ``g_k -= (g_k . g_j / |g_j|^2) g_j`` in fixed order; the result is the sum.
    * ``drgrad``: primary first, in DRGrad's spirit: with ``a`` the primary's and ``b`` the summed auxiliary gradient,
      ``xi = cos(a, b)``, ``lam = clip(|a| / |b|, 0, 1) ** gamma``, result ``(1 - [xi < 0] xi) a + lam b``: on
      conflict the primary's gradient is amplified by up to 2x, and the auxiliary one never outweighs it.
    * ``project_aux``: the primary's gradient is kept as it is; each auxiliary gradient that points against it loses
      its component along it, ``g_k -= [g_k . a < 0] (g_k . a / |a|^2) a``; the result is the sum. Asymmetric
      PCGrad: the auxiliary tasks may still shape v_s, but never against the primary on that sample (the per-sample
      counterpart of gating auxiliary gradients by their cosine with the main task's).

    Both are invariant to the losses' common scale (mean-reduced losses give rows scaled by 1/B).
    """
    eps = 1e-20
    if rule == "pcgrad":
        out = torch.zeros_like(grads[0])
        for k, gk in enumerate(grads):
            g = gk
            for j, gj in enumerate(grads):
                if j == k:
                    continue
                dot = (g * gj).sum(-1, keepdim=True)
                coef = dot.clamp(max=0.0) / (gj * gj).sum(-1, keepdim=True).clamp_min(eps)
                g = g - coef * gj
            out = out + g
        return out
    a = grads[0]
    if rule == "project_aux":
        sq = (a * a).sum(-1, keepdim=True).clamp_min(eps)
        out = a.clone()
        for gk in grads[1:]:
            out = out + gk - ((gk * a).sum(-1, keepdim=True).clamp(max=0.0) / sq) * a
        return out
    b = torch.stack(grads[1:]).sum(0) if len(grads) > 2 else grads[1]
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    xi = (a * b).sum(-1, keepdim=True) / (na * nb).clamp_min(eps)
    lam = (na / nb.clamp_min(eps)).clamp(0.0, 1.0) ** gamma
    return (1.0 - xi.clamp(max=0.0)) * a + lam * b


class RouteFork(torch.autograd.Function):
    """``n`` copies of ``x`` forward; backward combines the copies' gradients per sample with :func:`per_sample_route`.

    ``stats`` (a dict, or None) receives detached tensors, with no device sync: ``conflict`` (share of samples where
    the primary's and the summed auxiliary gradients point apart) and ``cos`` (their mean cosine).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, n: int, rule: PerSampleRule, gamma: float, stats: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, ...]:
        ctx.rule, ctx.gamma, ctx.stats = rule, gamma, stats
        # Distinct outputs (not views): each copy gets its own gradient slot in backward.
        return tuple(x.clone() for _ in range(n))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None, None, None]:
        ref = next(g for g in grads if g is not None)
        full = [g if g is not None else torch.zeros_like(ref) for g in grads]
        if ctx.stats is not None and len(full) > 1:
            a = full[0]
            b = torch.stack(full[1:]).sum(0)
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-20)
            ctx.stats["cos"] = cos.mean().detach()
            ctx.stats["conflict"] = (cos < 0).float().mean().detach()
        return per_sample_route(full, ctx.rule, ctx.gamma), None, None, None, None


# ---- towers ----------------------------------------------------------------------------------------------------------
def _tower(in_dim: int, hidden: list[int], dropout: float, device: torch.device | None) -> nn.Sequential:
    return nn.Sequential(
        MLP(in_dim, hidden, dropout, device), nn.Linear(hidden[-1] if hidden else in_dim, 1, device=device)
    )


def _linears(tower: nn.Module) -> list[nn.Linear]:
    return [m for m in tower.modules() if isinstance(m, nn.Linear)]


RoutePairs = list[tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]]
"""Per routed parameter tensor: (T1' param, T1'' param or None without split, [each auxiliary tower's param])."""


class SplitTowerHead(nn.Module):
    """The towers of a DRGrad model; see the module docstring. ``forward(v1, v_s)`` -> {task: logit [B]}.

    Parameters: ``own`` (T1', or T1 without split), ``shared`` (T1'', None without split), ``aux[task]`` (T2_k); all
    ``Linear`` stacks of one shape. Buffers: ``sigma`` [2] (mu = softmax(sigma)), ``tied`` [1] (1 once the towers were
    tied, so that re-tying never overwrites trained or restored weights).
    """

    sigma: torch.Tensor
    tied: torch.Tensor
    steps: torch.Tensor

    def __init__(
        self,
        in_dim: int,
        hidden: list[int],
        task_names: list[str],
        primary_task: str | None = None,
        *,
        split: bool = True,
        tied_init: bool = False,
        mix: Literal["logits", "probs"] = "logits",
        per_sample: bool = False,
        per_sample_rule: PerSampleRule = "pcgrad",
        gamma: float = 1.0,
        dropout: float = 0.0,
        pp_dim: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if len(task_names) < 2:
            raise ValueError("a DRGrad head needs a primary and at least one auxiliary task")
        self.primary = primary_task or task_names[0]
        if self.primary not in task_names:
            raise ValueError(f"primary task '{self.primary}' is not one of {task_names}")
        self.task_names = list(task_names)
        self.aux_names = [t for t in task_names if t != self.primary]
        self.split, self.tied_init, self.mix = split, tied_init, mix
        self.per_sample, self.per_sample_rule, self.gamma = per_sample, per_sample_rule, gamma
        self.own = _tower(in_dim, hidden, dropout, device)
        self.shared = _tower(in_dim, hidden, dropout, device) if split else None
        self.aux = nn.ModuleDict({t: _tower(in_dim, hidden, dropout, device) for t in self.aux_names})
        #: PPNet-style gate on v_s over the personalized id embeddings (``pp_dim`` > 0), else None.
        self.ppnet = PersonalizedGate(pp_dim, in_dim, device=device) if pp_dim > 0 else None
        self.register_buffer("sigma", torch.zeros(2, device=device))
        self.register_buffer("steps", torch.zeros(1, device=device))
        self.register_buffer("tied", torch.zeros(1, device=device))
        #: Per-sample router statistics of the last backward (detached tensors), read by the gradient method.
        self.sample_stats: dict[str, torch.Tensor] = {}
        if tied_init and (device is None or device.type != "meta"):
            self.tie_towers_()

    # ---- initialisation ---------------------------------------------------------------------------------------------
    def towers(self) -> list[nn.Module]:
        """T1', T1'' (if split), then each T2 in task order."""
        return [self.own, *([self.shared] if self.shared is not None else []), *self.aux.values()]

    @torch.no_grad()
    def tie_towers_(self) -> None:
        """Copy T1' into T1'' and every T2 (tied initialisation) and mark the head as tied."""
        src: list[torch.Tensor] = list(self.own.parameters())
        for tower in self.towers()[1:]:
            torch._foreach_copy_(list(tower.parameters()), src)
        self.tied.fill_(1.0)

    @torch.no_grad()
    def maybe_tie_(self) -> bool:
        """Tie if ``tied_init`` and not yet tied. For models built on the meta device: DMP re-initialises each Linear
        on its own, so call this once after wrapping (``build_gradient_method`` does). Returns whether it tied."""
        if self.tied_init and float(self.tied.item()) == 0.0:
            self.tie_towers_()
            return True
        return False

    def reset_parameters(self) -> None:
        """Zero sigma (mu = 0.5 / 0.5) and the step count, re-tie if ``tied_init``; towers reset themselves."""
        with torch.no_grad():
            self.sigma.zero_()
            self.steps.zero_()
            self.tied.zero_()
        if self.tied_init:
            self.tie_towers_()

    # ---- forward ----------------------------------------------------------------------------------------------------
    @property
    def mu(self) -> torch.Tensor:
        """(mu1', mu1'') = softmax(sigma', sigma'')."""
        return torch.softmax(self.sigma, dim=0)

    def forward(
        self,
        v1: torch.Tensor,
        v_s: torch.Tensor,
        aux_inputs: dict[str, torch.Tensor] | None = None,
        v_pp: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits [B] per task. ``v1``: the primary's own input; ``v_s``: the input shared by T1'' and the auxiliary
        towers; ``aux_inputs[task]``, when given, replaces ``v_s`` for that auxiliary tower. ``v_pp``: the
        personalized id embeddings, required when the head has a personalized gate (applied to ``v_s`` and to every
        ``aux_inputs`` entry)."""
        aux_inputs = aux_inputs or {}
        if self.ppnet is not None:
            if v_pp is None:
                raise ValueError("this DRGrad head has a personalized gate: pass v_pp (the id embeddings)")
            # The gate depends on v_pp only: compute it once, and gate each distinct input once (under a shared-bottom
            # top v_s and every auxiliary input are the same tensor).
            gate = self.ppnet.gate(v_pp)
            gated: dict[int, torch.Tensor] = {}

            def apply(x: torch.Tensor) -> torch.Tensor:
                if id(x) not in gated:
                    gated[id(x)] = x * gate
                return gated[id(x)]

            v_s = apply(v_s)
            aux_inputs = {t: apply(x) for t, x in aux_inputs.items()}
        readers = [t for t in self.aux_names if t not in aux_inputs]  # auxiliary towers that read v_s
        n_copies = int(self.shared is not None) + len(readers)
        if self.per_sample and self.training and torch.is_grad_enabled():
            if self.shared is None or not readers:
                raise ValueError("per-sample routing needs T1'' (split) and an auxiliary tower reading v_s")
            self.sample_stats = {}
            copies = list(RouteFork.apply(v_s, n_copies, self.per_sample_rule, self.gamma, self.sample_stats))
        else:
            copies = [v_s] * n_copies
        out: dict[str, torch.Tensor] = {}
        if self.shared is None:
            out[self.primary] = self.own(v1).squeeze(-1)
        else:
            mu = self.mu
            own, shared = self.own(v1).squeeze(-1), self.shared(copies.pop(0)).squeeze(-1)
            if self.mix == "logits":
                out[self.primary] = mu[0] * own + mu[1] * shared
            else:
                p = mu[0] * torch.sigmoid(own) + mu[1] * torch.sigmoid(shared)
                out[self.primary] = torch.logit(p, eps=1e-7)
        for t in self.aux_names:
            x = aux_inputs[t] if t in aux_inputs else copies.pop(0)
            out[t] = self.aux[t](x).squeeze(-1)
        return {t: out[t] for t in self.task_names}

    def forward_task_inputs(
        self,
        hidden: list[torch.Tensor],
        v_pp: torch.Tensor | None = None,
        aux_input: Literal["own", "shared"] = "own",
    ) -> dict[str, torch.Tensor]:
        """Adapter for a top that gives one representation per task (MMoE/PLE gates, in ``task_names`` order).

        ``v1`` = the primary's representation. One auxiliary task: ``v_s`` = its representation, read by T1'' and T2.
        Several: ``v_s`` = their mean, read by T1'' (our reading); each T2_k reads its own representation
        (``aux_input: own``) or ``v_s`` too (``shared``). Under a shared-bottom top every representation is the same
        tensor, so v1 = v_s.
        """
        by_task = dict(zip(self.task_names, hidden, strict=True))
        aux = [by_task[t] for t in self.aux_names]
        if len(aux) == 1:
            return self(by_task[self.primary], aux[0], v_pp=v_pp)
        v_s = aux[0] if all(a is aux[0] for a in aux) else torch.stack(aux).mean(0)
        own = {t: by_task[t] for t in self.aux_names} if aux_input == "own" else None
        return self(by_task[self.primary], v_s, own, v_pp=v_pp)

    # ---- what the router sees ---------------------------------------------------------------------------------------
    def route_pairs(self, scope: Literal["first_layer", "all_layers"]) -> RoutePairs:
        """Parameter tensors to route, aligned across towers: the first Linear's weight (``first_layer``, as in the
        authors' code) or every parameter tensor of the towers (``all_layers``)."""
        towers = self.towers()
        if scope == "first_layer":
            per_tower: list[list[torch.Tensor]] = [[_linears(t)[0].weight] for t in towers]
        else:
            per_tower = [list(t.parameters()) for t in towers]
        own = per_tower[0]
        shared = per_tower[1] if self.shared is not None else None
        aux = per_tower[2:] if self.shared is not None else per_tower[1:]
        for params in per_tower[1:]:
            if [p.shape for p in params] != [p.shape for p in own]:
                raise ValueError("towers must have identical shapes to be routed")
        return [(own[i], shared[i] if shared else None, [a[i] for a in aux]) for i in range(len(own))]

    def tower_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """All parameters of T1' and of T1'' (None without split): what the updater measures."""
        return list(self.own.parameters()), (list(self.shared.parameters()) if self.shared is not None else None)


class PersonalizedGate(nn.Module):
    """PPNet-style personalized gate: ``v_s <- 2 * v_s * sigmoid(v_pp @ W_pp)``, values in (0, 2) centred at 1.

    ``v_pp`` is the concatenation of personalized id embeddings (user, item, seller). ``W_pp`` starts at zero, so the
    gate starts as the identity (every value exactly 1) and only learns to deviate. ``detach_ids`` stops the gate's
    gradient from flowing into the id embeddings (PPNet keeps the gate from reshaping the shared embeddings); off by
    default. Census has no personalized ids: there the gate is simply not built.
    """

    def __init__(self, pp_dim: int, out_dim: int, detach_ids: bool = False, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, pp_dim, device=device))
        self.detach_ids = detach_ids
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()

    def gate(self, v_pp: torch.Tensor) -> torch.Tensor:
        """``2 * sigmoid(v_pp @ W_pp)`` [B, out_dim]: the multiplier, in (0, 2)."""
        ids = v_pp.detach() if self.detach_ids else v_pp
        return 2.0 * torch.sigmoid(F.linear(ids, self.weight))

    def forward(self, v_s: torch.Tensor, v_pp: torch.Tensor) -> torch.Tensor:
        return v_s * self.gate(v_pp)
