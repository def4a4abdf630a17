"""The arithmetic of the gradient methods on flat vectors: the DRGrad router's terms and rules, the sigma updater,
PCGrad's projection, and the small helpers they share (rank averaging, flattening, per-tensor segments). Pure
functions, unit-tested against hand computations; :mod:`models.gradient_methods` applies them to a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

_EPS = 1e-20


# ---- helpers ---------------------------------------------------------------------------------------------------------
def dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks in place (no-op without a process group)."""
    world = dist_world()
    if world > 1:
        dist.all_reduce(t)
        t.div_(world)
    return t


def param_grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``.grad`` of each parameter, materialising zeros where backward left None (a parameter off the loss's path)."""
    out = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def accumulate(into: dict[str, torch.Tensor], new: dict[str, torch.Tensor], scale: float) -> None:
    for name, v in new.items():
        into[name] = into[name] + scale * v if name in into else scale * v


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


@dataclass(frozen=True)
class Segments:
    """A flat vector cut into segments (one per parameter tensor): ``ids[i]`` is element i's segment, ``n`` the count.
    ``active[s]`` (0/1) says whether segment s is routed (``router_scope``)."""

    ids: torch.Tensor
    n: int
    active: torch.Tensor
    sizes: tuple[int, ...]

    @classmethod
    def of(
        cls, sizes: Sequence[int], active: Sequence[bool] | None = None, device: torch.device | None = None
    ) -> Segments:
        counts = torch.tensor(sizes, device=device)
        # output_size given: otherwise CUDA reads the total back to the host (a sync).
        ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts, output_size=sum(sizes))
        act = torch.tensor([1.0 if a else 0.0 for a in (active or [True] * len(sizes))], device=device)
        return cls(ids=ids, n=len(sizes), active=act, sizes=tuple(int(s) for s in sizes))

    def sums(self, products: torch.Tensor) -> torch.Tensor:
        """[R, N] -> [R, n]: per-segment sums of each row. Deterministic on every device (a plain reduction per
        segment): a scatter-add (``index_add_``) accumulates with atomics on CUDA, so its rounding differs from run
        to run and replicas routing the same gradients would drift apart."""
        return torch.stack([part.sum(dim=1) for part in products.split(self.sizes, dim=1)], dim=1)

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
