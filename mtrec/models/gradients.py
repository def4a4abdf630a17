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
>>> from mtrec.models.drgrad import SplitTowerHead
>>> from mtrec.models.gradients import GradientConfig, build_gradient_method
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
  same backward (see :class:`mtrec.models.drgrad.RouteFork`), which changes the gradients of everything below v_s.

Distributed training. DMP wraps the dense part in DDP, which all-reduces (averages) gradients during ``backward()``;
every method runs its own logic *after* the ordinary backward on the reduced ``.grad``, or reduces what it computes
itself (PCGrad's per-task gradients, uncertainty's ``s``), so every rank applies the same update.

Efficiency. Router and updater work on one flat vector per tower (one ``torch.cat``), with per-tensor dot products and
norms from one ``index_add_``, and write back with one ``torch._foreach_add_``: the number of kernel launches does not
grow with the number of parameter tensors. Diagnostics (floats, hence a device sync) are computed only every
``diagnostics_every`` calls; other calls return ``{}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mtrec.models.drgrad import DRGradConfig, SplitTowerHead

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

_EPS = 1e-20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PCGradConfig(_Strict):
    seed: int = Field(default=0, description="seed of the random task order (same on every rank)")


class UncertaintyConfig(_Strict):
    init_log_var: float = Field(default=0.0, description="initial s_k = log sigma_k^2")


class GradientConfig(_Strict):
    """The experiment YAML's ``gradients:`` section."""

    method: Literal["equal", "uncertainty", "pcgrad", "drgrad"] = "equal"
    drgrad: DRGradConfig = DRGradConfig()
    pcgrad: PCGradConfig = PCGradConfig()
    uncertainty: UncertaintyConfig = UncertaintyConfig()
    diagnostics_every: int = Field(default=50, ge=1, description="compute diagnostics every N backward calls")


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks in place (no-op without a process group)."""
    world = _dist_world()
    if world > 1:
        dist.all_reduce(t)
        t.div_(world)
    return t


def _grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``.grad`` of each parameter, materialising zeros where backward left None (a parameter off the loss's path)."""
    out = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def _accumulate(into: dict[str, torch.Tensor], new: dict[str, torch.Tensor], scale: float) -> None:
    for name, v in new.items():
        into[name] = into[name] + scale * v if name in into else scale * v


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


@dataclass(frozen=True)
class Segments:
    """A flat vector cut into segments (one per parameter tensor): ``ids[i]`` is element i's segment, ``n`` the count.
    ``active[s]`` (0/1) says whether segment s is routed (``router_scope``)."""

    ids: torch.Tensor
    n: int
    active: torch.Tensor

    @classmethod
    def of(
        cls, sizes: Sequence[int], active: Sequence[bool] | None = None, device: torch.device | None = None
    ) -> Segments:
        ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        act = torch.tensor([1.0 if a else 0.0 for a in (active or [True] * len(sizes))], device=device)
        return cls(ids=ids, n=len(sizes), active=act)

    def sums(self, products: torch.Tensor) -> torch.Tensor:
        """[R, N] -> [R, n]: per-segment sums of each row, in one kernel."""
        out = torch.zeros(products.shape[0], self.n, dtype=products.dtype, device=products.device)
        return out.index_add_(1, self.ids, products)

    def expand(self, per_segment: torch.Tensor) -> torch.Tensor:
        """[..., n] -> [..., N]: each segment's value repeated over its elements."""
        return per_segment.index_select(-1, self.ids)


# ---- the DRGrad rules on flat vectors (pure functions, unit-tested against hand computations) ---------------------
def paper_terms(
    g1a: torch.Tensor, g1b: torch.Tensor, g2: torch.Tensor, seg: Segments, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The three terms of Eq. 1-2, separately: ``(1 - [xi1 < 0] xi1) lam1 g1''``, ``[xi2 >= 0] lam2 g2`` (their sum
    is gR1') and gR1''; plus the per-segment xi1, xi2, lam1, lam2. See :func:`paper_route`."""
    s = seg.sums(torch.stack([g1a * g2, g1a * g1b, g1a * g1a, g2 * g2, g1b * g1b]))
    n1a, n2, n1b = s[2].sqrt(), s[3].sqrt(), s[4].sqrt()
    xi1 = s[0] / (n1a * n2).clamp_min(_EPS)
    xi2 = s[1] / (n1a * n1b).clamp_min(_EPS)
    lam1 = (n1a / n2.clamp_min(_EPS)).clamp(0.0, 1.0) ** gamma
    lam2 = (n1a / n1b.clamp_min(_EPS)).clamp(0.0, 1.0) ** gamma
    c_b = (1.0 - xi1.clamp(max=0.0)) * lam1 * seg.active  # coefficient of g1'' in gR1'
    c_2 = (xi2 >= 0).to(g2.dtype) * lam2 * seg.active  # coefficient of g2 in gR1'
    prod = xi1 * xi2
    c_bb = -(prod < 0).to(g1b.dtype) * prod * seg.active  # coefficient of g1'' in gR1''
    coef = seg.expand(torch.stack([c_b, c_2, c_bb]))
    stats = {"xi1": xi1, "xi2": xi2, "lam1": lam1, "lam2": lam2}
    return coef[0] * g1b, coef[1] * g2, coef[2] * g1b, stats


def paper_route(
    g1a: torch.Tensor, g1b: torch.Tensor, g2: torch.Tensor, seg: Segments, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 1-2 of the paper, per segment (parameter tensor), from the ORIGINAL gradients g1' (``g1a``), g1''
    (``g1b``) and g2. Returns the routed terms (gR1', gR1'') as flat vectors (zero outside active segments) and the
    per-segment xi1, xi2, lam1, lam2::

        xi1 = cos(g1', g2)    lam1 = clip(|g1'| / |g2|,  0, 1) ** gamma
        xi2 = cos(g1', g1'')  lam2 = clip(|g1'| / |g1''|, 0, 1) ** gamma
        gR1'  = (1 - [xi1 < 0] xi1) lam1 g1''  +  [xi2 >= 0] lam2 g2
        gR1'' = - [xi1 xi2 < 0] xi1 xi2 g1''

    T1' is then stepped with g1' + gR1', T1'' with g1'' + gR1''.
    """
    term_b, term_2, r1b, stats = paper_terms(g1a, g1b, g2, seg, gamma)
    return term_b + term_2, r1b, stats


def code_route(
    k1: torch.Tensor, k2: torch.Tensor, seg: Segments
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The authors' Census code, per segment: symmetric routing between the primary's (``k1``) and an auxiliary
    tower's (``k2``) gradient::

        c   = cos(k1, k2)
        w12 = clip(sum(k1 / |k1|) / sum(k2 / |k2|), 0.1, 5),   w21 = clip(sum(k2 / |k2|) / sum(k1 / |k1|), 0.1, 5)
        k1 <- k1 + w12 (1 - [c <= 0] c) k2,                    k2 <- k2 + w21 (1 - [c <= 0] c) k1

    Returns the added terms for k1 and k2 (zero outside active segments) and per-segment c, w12, w21.
    """
    s = seg.sums(torch.stack([k1 * k2, k1 * k1, k2 * k2, k1, k2]))
    n1, n2 = s[1].sqrt(), s[2].sqrt()
    c = s[0] / (n1 * n2).clamp_min(_EPS)
    sum1, sum2 = s[3] / n1.clamp_min(_EPS), s[4] / n2.clamp_min(_EPS)  # sum of the unit vector's entries
    # tf.div_no_nan: a zero denominator gives 0, which the clip lifts to 0.1.
    w12 = torch.where(sum2 != 0, sum1 / torch.where(sum2 != 0, sum2, 1.0), 0.0).clamp(0.1, 5.0)
    w21 = torch.where(sum1 != 0, sum2 / torch.where(sum1 != 0, sum1, 1.0), 0.0).clamp(0.1, 5.0)
    amp = 1.0 - (c <= 0).to(c.dtype) * c
    coef = seg.expand(torch.stack([w12 * amp * seg.active, w21 * amp * seg.active]))
    return coef[0] * k2, coef[1] * k1, {"cos": c, "w12": w12, "w21": w21}


def update_sigma(
    sigma: torch.Tensor,
    steps: torch.Tensor,
    norm_own: torch.Tensor,
    norm_shared: torch.Tensor,
    updater: Literal["sum", "mean", "ema", "none"],
    ema_decay: float,
) -> None:
    """Advance the updater's state in place. ``sum`` (paper): ``sigma += |g|`` (grows without bound, softmax saturates);
    ``mean``: running mean of |g| (step count in ``steps``); ``ema``: ``sigma = d sigma + (1 - d) |g|``; ``none``."""
    if updater == "none":
        return
    norms = torch.stack([norm_own, norm_shared]).to(sigma.dtype)
    steps.add_(1.0)
    if updater == "sum":
        sigma.add_(norms)
    elif updater == "mean":
        sigma.add_((norms - sigma) / steps)
    else:
        sigma.mul_(ema_decay).add_(norms, alpha=1.0 - ema_decay)


def pcgrad_project(grads: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PCGrad on a [K, P] stack of per-task gradients: for each task i and each other task j in random order, if
    ``g_i . g_j < 0`` then ``g_i -= (g_i . g_j / |g_j|^2) g_j`` (g_i already projected, g_j original). Returns the sum
    [P] and the [K, K] cosine matrix of the original gradients. Branch-free (``clamp``), so no device sync."""
    k = grads.shape[0]
    gram = grads @ grads.T
    norms = gram.diagonal().sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(_EPS)
    sq = gram.diagonal().clamp_min(_EPS)
    out = torch.zeros_like(grads[0])
    for i in range(k):
        g = grads[i]
        order = [int(j) for j in torch.randperm(k, generator=generator) if int(j) != i]
        for j in order:
            g = g - (g @ grads[j]).clamp(max=0.0) / sq[j] * grads[j]
        out = out + g
    return out, cos


# ---- methods ---------------------------------------------------------------------------------------------------------
class GradientMethod:
    """Base: fixed task weights, diagnostics cadence. Subclasses override :meth:`_backward`."""

    name = "equal"

    def __init__(self, task_names: list[str], weights: dict[str, float] | None, diagnostics_every: int) -> None:
        self.task_names = list(task_names)
        self.weights = {t: float((weights or {}).get(t, 1.0)) for t in self.task_names}
        self.diagnostics_every = diagnostics_every
        self.calls = 0

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters the method owns; add them to the dense optimizer (only uncertainty weighting has any)."""
        return []

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted total ``sum_k w_k L_k`` that is back-propagated."""
        return torch.stack([self.weights[t] * losses[t] for t in self.task_names]).sum()

    def backward(
        self,
        losses: dict[str, torch.Tensor],
        shared_params: list[torch.Tensor] | None = None,
        shared_repr: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Back-propagate ``losses`` (unweighted, per task) and leave the method's gradients in ``.grad``.

        ``shared_params``: the shared dense parameters (PCGrad; other methods ignore it). ``shared_repr`` is accepted
        for API symmetry with torchjd; the per-sample router reads v_s inside :class:`SplitTowerHead` instead. Returns
        diagnostics (floats) every ``diagnostics_every`` calls, else ``{}``.
        """
        missing = set(self.task_names) - set(losses)
        if missing:
            raise KeyError(f"losses missing for tasks {sorted(missing)}")
        self.calls += 1
        due = self.calls % self.diagnostics_every == 0 or self.calls == 1
        diag = self._backward(losses, shared_params, due)
        if not due:
            return {}
        values = torch.stack([v.detach().float().reshape(()) for v in diag.values()]).tolist() if diag else []
        return dict(zip(diag.keys(), values, strict=True))

    def _backward(
        self, losses: dict[str, torch.Tensor], shared_params: list[torch.Tensor] | None, due: bool
    ) -> dict[str, torch.Tensor]:
        self.total(losses).backward()
        return {}


class EqualWeights(GradientMethod):
    """``sum_k w_k L_k`` with fixed weights; exactly ``total.backward()``."""

    name = "equal"


class UncertaintyWeighting(GradientMethod):
    """Kendall et al. 2018: ``sum_k 0.5 exp(-s_k) w_k L_k + 0.5 s_k`` with learnable ``s_k = log sigma_k^2``.

    The 1/2 factors are the regression form of the paper (as in LibMTL); at ``s = 0`` every task weighs 0.5.
    ``s`` lives outside the model (and outside DDP), so its gradient is averaged over ranks here.
    """

    name = "uncertainty"

    def __init__(
        self,
        task_names: list[str],
        weights: dict[str, float] | None,
        diagnostics_every: int,
        cfg: UncertaintyConfig,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(task_names, weights, diagnostics_every)
        self.log_vars = nn.Parameter(torch.full((len(task_names),), float(cfg.init_log_var), device=device))

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([self.weights[t] * losses[t] for t in self.task_names])
        return (0.5 * torch.exp(-self.log_vars) * stacked + 0.5 * self.log_vars).sum()

    def _backward(
        self, losses: dict[str, torch.Tensor], shared_params: list[torch.Tensor] | None, due: bool
    ) -> dict[str, torch.Tensor]:
        self.total(losses).backward()
        if self.log_vars.grad is not None:
            _all_reduce_mean_(self.log_vars.grad)
        if not due:
            return {}
        w = 0.5 * torch.exp(-self.log_vars.detach())
        return {f"uncertainty/weight_{t}": w[i] for i, t in enumerate(self.task_names)}


def _embedding_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters of TorchRec embedding modules, sharded or not (data-parallel tables are DDP parameters, but their
    TBE kernels support neither ``torch.autograd.grad`` nor, fused, a materialised gradient)."""
    from torchrec.distributed.types import ShardedModule
    from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, EmbeddingCollectionInterface

    kinds = (ShardedModule, EmbeddingBagCollectionInterface, EmbeddingCollectionInterface)
    return {id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters()}


def _dense_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Trainable parameters outside TorchRec's embedding modules: what the gradient methods may look at."""
    skip = _embedding_parameter_ids(model)
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]


class PCGrad(GradientMethod):
    """PCGrad on the shared dense parameters; see the module docstring.

    Shared parameters: ``shared_params`` if given, else found once (first call) as the dense parameters that at least
    two task losses reach (``torch.autograd.grad(..., allow_unused=True)``), which excludes towers automatically.
    """

    name = "pcgrad"

    def __init__(
        self,
        model: nn.Module,
        task_names: list[str],
        weights: dict[str, float] | None,
        diagnostics_every: int,
        cfg: PCGradConfig,
    ) -> None:
        super().__init__(task_names, weights, diagnostics_every)
        self.model = model
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._shared: list[torch.Tensor] | None = None

    def _find_shared(self, losses: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        candidates = _dense_parameters(self.model)
        reached = [0] * len(candidates)
        for t in self.task_names:
            grads = torch.autograd.grad(losses[t], candidates, retain_graph=True, allow_unused=True)
            for i, g in enumerate(grads):
                reached[i] += g is not None
        shared = [p for p, r in zip(candidates, reached, strict=True) if r >= 2]
        if not shared:
            raise ValueError("PCGrad: no dense parameter is reached by two or more task losses")
        return shared

    def _backward(
        self, losses: dict[str, torch.Tensor], shared_params: list[torch.Tensor] | None, due: bool
    ) -> dict[str, torch.Tensor]:
        # The ordinary backward FIRST: DDP's reducer all-reduces during it (an autograd.grad pass before it would run
        # DDP's end-of-backward callback too early), and towers and embeddings get their gradients from it. The graph
        # is kept for the per-task passes below.
        self.total(losses).backward(retain_graph=True)
        if shared_params is None:
            if self._shared is None:
                self._shared = self._find_shared(losses)
            shared_params = self._shared
        grads = _grads(shared_params)
        reduced_total = _flat(grads)  # sum_k w_k g_k, averaged over ranks by DDP
        rows = []
        for t in self.task_names[:-1]:
            g = torch.autograd.grad(self.weights[t] * losses[t], shared_params, retain_graph=True, allow_unused=True)
            rows.append(
                _flat([gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, shared_params, strict=True)])
            )
        per_task = torch.stack(rows) if rows else reduced_total.new_zeros(0, reduced_total.numel())
        _all_reduce_mean_(per_task)
        # The last task's global gradient without another pass: the averages add up to DDP's averaged total.
        per_task = torch.cat([per_task, (reduced_total - per_task.sum(0)).unsqueeze(0)])
        projected, cos = pcgrad_project(per_task, self.generator)
        torch._foreach_copy_(grads, _unflatten(projected, shared_params))
        if not due:
            return {}
        k = len(self.task_names)
        off = cos[~torch.eye(k, dtype=torch.bool, device=cos.device)]
        return {"pcgrad/cos_mean": off.mean(), "pcgrad/conflict": (off < 0).float().mean()}


class DRGradRouter(GradientMethod):
    """DRGrad: ordinary backward on the weighted total, then routing and the updater on the head's towers.

    Touches only the ``.grad`` of the routed tower tensors (``router_scope``) of T1' and T1'' (paper mode), or of T1
    and each T2 (code mode), plus the head's ``sigma`` buffer. With ``per_sample`` the head's :class:`RouteFork` also
    changes what flows below v_s during the same backward.
    """

    name = "drgrad"

    def __init__(
        self,
        head: SplitTowerHead,
        task_names: list[str],
        weights: dict[str, float] | None,
        diagnostics_every: int,
        cfg: DRGradConfig,
    ) -> None:
        super().__init__(task_names, weights, diagnostics_every)
        self.head, self.cfg = head, cfg
        self._state: tuple[list[list[torch.Tensor]], Segments] | None = None

    def _prepare(self) -> tuple[list[list[torch.Tensor]], Segments]:
        """Per tower (T1', [T1''], T2...): all its parameters, aligned; segments marking the routed ones. Cached: the
        parameter objects are fixed once the model is wrapped."""
        if self._state is None:
            towers: list[list[torch.Tensor]] = [list(t.parameters()) for t in self.head.towers()]
            routed = {id(p) for p, _, _ in self.head.route_pairs(self.cfg.router_scope)}
            own = towers[0]
            seg = Segments.of([p.numel() for p in own], [id(p) in routed for p in own], own[0].device)
            self._state = (towers, seg)
        return self._state

    def _backward(
        self, losses: dict[str, torch.Tensor], shared_params: list[torch.Tensor] | None, due: bool
    ) -> dict[str, torch.Tensor]:
        self.total(losses).backward()  # DDP all-reduces here: everything below reads reduced gradients
        with torch.no_grad():
            return self._route(due)

    def _route(self, due: bool) -> dict[str, torch.Tensor]:
        cfg, head = self.cfg, self.head
        towers, seg = self._prepare()
        split = head.shared is not None
        if not cfg.router and (cfg.updater == "none" or not split):
            return self._diagnostics({}, seg, split) if due else {}  # nothing to rewrite (Split-MMoE, per-sample only)
        grads = [_grads(t) for t in towers]
        flats = [_flat(g) for g in grads]  # original gradients: every xi / lam is computed before any write
        g_own = flats[0]
        g_shared = flats[1] if split else None
        g_aux = flats[2:] if split else flats[1:]
        stats: dict[str, torch.Tensor] = {}
        d_own = torch.zeros_like(g_own)
        d_shared = torch.zeros_like(g_own) if split else None
        d_aux: list[torch.Tensor | None] = [None] * len(g_aux)
        if cfg.router and cfg.mode == "paper":
            if g_shared is None:
                raise ValueError("drgrad.mode: paper needs a split head (drgrad.split: true)")
            assert d_shared is not None
            groups = [torch.stack(g_aux).sum(0)] if cfg.multi_aux == "sum" or len(g_aux) == 1 else g_aux
            k = len(groups)
            for g2 in groups:
                # per_task (our reading): the g1''-terms are averaged over the tasks, the g2-terms summed, so that
                # one auxiliary task gives exactly Eq. 1-2 and the g2-terms add up as with multi_aux: sum.
                term_b, term_2, r1b, st = paper_terms(g_own, g_shared, g2, seg, cfg.gamma)
                d_own.add_(term_b, alpha=1.0 / k).add_(term_2)
                d_shared.add_(r1b, alpha=1.0 / k)
                _accumulate(stats, st, 1.0 / k)
        elif cfg.router and cfg.mode == "code":
            # Symmetric, pairwise with each auxiliary tower (the authors' code has one).
            for i, g2 in enumerate(g_aux):
                a, b, st = code_route(g_own, g2, seg)
                d_own.add_(a)
                d_aux[i] = b
                _accumulate(stats, st, 1.0 / len(g_aux))
        # Write back: one fused add per tower.
        torch._foreach_add_(grads[0], _unflatten(d_own, grads[0]))
        if split and d_shared is not None:
            torch._foreach_add_(grads[1], _unflatten(d_shared, grads[1]))
        offset = 2 if split else 1
        for i, d in enumerate(d_aux):
            if d is not None:
                torch._foreach_add_(grads[offset + i], _unflatten(d, grads[offset + i]))
        if split:
            assert g_shared is not None and d_shared is not None
            # |g1' + gR1'| and |g1'' + gR1''| over the whole tower (the routed T1' / T1'' gradients).
            update_sigma(
                head.sigma,
                head.steps,
                torch.linalg.vector_norm(g_own + d_own),
                torch.linalg.vector_norm(g_shared + d_shared),
                cfg.updater,
                cfg.ema_decay,
            )
        if not due:
            return {}
        return self._diagnostics(stats, seg, split)

    def _diagnostics(self, stats: dict[str, torch.Tensor], seg: Segments, split: bool) -> dict[str, torch.Tensor]:
        active = seg.active.bool()
        out: dict[str, torch.Tensor] = {}
        for name, v in stats.items():
            out[f"drgrad/{name}"] = v[active].mean()
        if "xi1" in stats:
            out["drgrad/conflict"] = (stats["xi1"][active] < 0).float().mean()
        elif "cos" in stats:
            out["drgrad/conflict"] = (stats["cos"][active] <= 0).float().mean()
        if split:
            mu = self.head.mu
            out["drgrad/mu_own"], out["drgrad/mu_shared"] = mu[0], mu[1]
        if self.head.sample_stats:
            # Per-sample statistics are local to each rank's samples: average them so every rank logs the same value.
            names = sorted(self.head.sample_stats)
            local = _all_reduce_mean_(torch.stack([self.head.sample_stats[n].float() for n in names]))
            for i, name in enumerate(names):
                out[f"drgrad/sample_{name}"] = local[i]
        return out


def find_split_head(model: nn.Module) -> SplitTowerHead:
    """The model's one :class:`SplitTowerHead` (searched through DMP / DDP wrappers)."""
    heads = [m for m in model.modules() if isinstance(m, SplitTowerHead)]
    if len(heads) != 1:
        raise ValueError(f"gradients.method: drgrad needs exactly one SplitTowerHead in the model, found {len(heads)}")
    return heads[0]


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
        params = _dense_parameters(model)
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
