"""The gradient methods as objects with one ``backward(losses)`` call: equal weights, uncertainty weighting, PCGrad and
the DRGrad router. Configured and built by :mod:`models.gradients`."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.drgrad import DRGradConfig, SplitTowerHead
from models.gradient_rules import (
    Segments,
    accumulate,
    all_reduce_mean_,
    code_route,
    flatten,
    paper_terms,
    param_grads,
    pcgrad_project,
    unflatten,
    update_sigma,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PCGradConfig(_Strict):
    seed: int = Field(default=0, description="seed of the random task order (same on every rank)")


class UncertaintyConfig(_Strict):
    init_log_var: float = Field(default=0.0, description="initial s_k = log sigma_k^2")


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
            all_reduce_mean_(self.log_vars.grad)
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


def dense_parameters(model: nn.Module) -> list[torch.Tensor]:
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
        candidates = dense_parameters(self.model)
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
        grads = param_grads(shared_params)
        reduced_total = flatten(grads)  # sum_k w_k g_k, averaged over ranks by DDP
        rows = []
        for t in self.task_names[:-1]:
            g = torch.autograd.grad(self.weights[t] * losses[t], shared_params, retain_graph=True, allow_unused=True)
            rows.append(
                flatten([gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, shared_params, strict=True)])
            )
        per_task = torch.stack(rows) if rows else reduced_total.new_zeros(0, reduced_total.numel())
        all_reduce_mean_(per_task)
        # The last task's global gradient without another pass: the averages add up to DDP's averaged total.
        per_task = torch.cat([per_task, (reduced_total - per_task.sum(0)).unsqueeze(0)])
        projected, cos = pcgrad_project(per_task, self.generator)
        torch._foreach_copy_(grads, unflatten(projected, shared_params))
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
        grads = [param_grads(t) for t in towers]
        flats = [flatten(g) for g in grads]  # original gradients: every xi / lam is computed before any write
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
                accumulate(stats, st, 1.0 / k)
        elif cfg.router and cfg.mode == "code":
            # Symmetric, pairwise with each auxiliary tower (the authors' code has one).
            for i, g2 in enumerate(g_aux):
                a, b, st = code_route(g_own, g2, seg)
                d_own.add_(a)
                d_aux[i] = b
                accumulate(stats, st, 1.0 / len(g_aux))
        # Write back: one fused add per tower.
        torch._foreach_add_(grads[0], unflatten(d_own, grads[0]))
        if split and d_shared is not None:
            torch._foreach_add_(grads[1], unflatten(d_shared, grads[1]))
        offset = 2 if split else 1
        for i, d in enumerate(d_aux):
            if d is not None:
                torch._foreach_add_(grads[offset + i], unflatten(d, grads[offset + i]))
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
            local = all_reduce_mean_(torch.stack([self.head.sample_stats[n].float() for n in names]))
            for i, name in enumerate(names):
                out[f"drgrad/sample_{name}"] = local[i]
        return out


def find_split_head(model: nn.Module) -> SplitTowerHead:
    """The model's one :class:`SplitTowerHead` (searched through DMP / DDP wrappers)."""
    heads = [m for m in model.modules() if isinstance(m, SplitTowerHead)]
    if len(heads) != 1:
        raise ValueError(f"gradients.method: drgrad needs exactly one SplitTowerHead in the model, found {len(heads)}")
    return heads[0]
