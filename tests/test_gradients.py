"""Gradient methods (models.gradients) and the DRGrad head (models.drgrad) against hand computations."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from models.drgrad import PersonalizedGate, SplitTowerHead, per_sample_route
from models.gradients import (
    DRGradRouter,
    GradientConfig,
    PCGrad,
    Segments,
    UncertaintyWeighting,
    build_gradient_method,
    build_split_head,
    code_route,
    paper_route,
    pcgrad_project,
    update_sigma,
)

R2 = math.sqrt(2.0)
T = torch.tensor


def _close(a: torch.Tensor, b: list[float] | torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b if isinstance(b, torch.Tensor) else T(b), atol=atol, rtol=0)


def _seg(*sizes: int, active: list[bool] | None = None) -> Segments:
    return Segments.of(list(sizes), active)


# ---- the paper's router, Eq. 1-2 -------------------------------------------------------------------------------------
def test_router_aligned_case() -> None:
    # g1' = [1,0], g1'' = [0,2], g2 = [2,0]: xi1 = 1, lam1 = 1/2; xi2 = 0 (counts as >= 0), lam2 = 1/2.
    # gR1' = (1 - 0) * 1/2 * [0,2] + 1/2 * [2,0] = [1,1];  gR1'' = 0 (xi1 * xi2 = 0 is not < 0).
    r1a, r1b, st = paper_route(T([1.0, 0.0]), T([0.0, 2.0]), T([2.0, 0.0]), _seg(2), gamma=1.0)
    _close(r1a, [1.0, 1.0])
    _close(r1b, [0.0, 0.0])
    _close(st["xi1"], [1.0])
    _close(st["xi2"], [0.0])
    _close(st["lam1"], [0.5])
    _close(st["lam2"], [0.5])


def test_router_conflict_amplifies_and_product_term() -> None:
    # g1' = [1,1], g1'' = [1,0], g2 = [-1,0].
    # xi1 = cos([1,1],[-1,0]) = -1/sqrt2 < 0; lam1 = clip(sqrt2 / 1) = 1 (clipped).
    # xi2 = cos([1,1],[1,0]) = 1/sqrt2 >= 0; lam2 = clip(sqrt2 / 1) = 1.
    # gR1'  = (1 + 1/sqrt2) * 1 * [1,0] + 1 * [-1,0] = [1/sqrt2, 0]   (amplified by 1 - xi1, nothing projected away)
    # gR1'' = -[xi1 xi2 < 0] xi1 xi2 g1'' = -(-1/2) [1,0] = [1/2, 0]
    r1a, r1b, st = paper_route(T([1.0, 1.0]), T([1.0, 0.0]), T([-1.0, 0.0]), _seg(2), gamma=1.0)
    _close(r1a, [1 / R2, 0.0])
    _close(r1b, [0.5, 0.0])
    _close(st["xi1"], [-1 / R2])
    _close(st["lam1"], [1.0])


def test_router_xi2_negative_drops_g2_and_product_term() -> None:
    # g1' = [1,0], g1'' = [-1,1], g2 = [1,1]: xi1 = 1/sqrt2, lam1 = clip(1/sqrt2) = 1/sqrt2; xi2 = -1/sqrt2 < 0.
    # gR1'  = 1 * (1/sqrt2) * [-1,1] + 0  ;  gR1'' = -(1/sqrt2 * -1/sqrt2) [-1,1] = 1/2 [-1,1]
    r1a, r1b, _ = paper_route(T([1.0, 0.0]), T([-1.0, 1.0]), T([1.0, 1.0]), _seg(2), gamma=1.0)
    _close(r1a, [-1 / R2, 1 / R2])
    _close(r1b, [-0.5, 0.5])


def test_router_gamma_and_lam_clipping() -> None:
    # g1' = [1,0], g2 = [0,4] (xi1 = 0), g1'' = [-2,0] (xi2 = -1). gamma = 2: lam1 = (1/4)^2 = 1/16.
    # gR1' = (1 - 0) * 1/16 * [-2,0] + [xi2 >= 0](=0) ... = [-1/8, 0];  gR1'' = 0 (xi1 xi2 = 0).
    r1a, r1b, st = paper_route(T([1.0, 0.0]), T([-2.0, 0.0]), T([0.0, 4.0]), _seg(2), gamma=2.0)
    _close(r1a, [-0.125, 0.0])
    _close(r1b, [0.0, 0.0])
    _close(st["lam1"], [1 / 16])
    _close(st["lam2"], [0.25])  # (1/2)^2, unused because xi2 < 0
    # gamma = 0.5 on a large ratio: clip first (|g1'| / |g2| = 4 -> 1), then the power.
    _, _, st = paper_route(T([4.0, 0.0]), T([1.0, 0.0]), T([1.0, 0.0]), _seg(2), gamma=0.5)
    _close(st["lam1"], [1.0])


def test_router_is_per_segment_and_respects_scope() -> None:
    # Two parameter tensors side by side: the aligned case and the conflict case, each with its own xi / lam.
    g1a = T([1.0, 0.0, 1.0, 1.0])
    g1b = T([0.0, 2.0, 1.0, 0.0])
    g2 = T([2.0, 0.0, -1.0, 0.0])
    r1a, r1b, _ = paper_route(g1a, g1b, g2, _seg(2, 2), gamma=1.0)
    _close(r1a, [1.0, 1.0, 1 / R2, 0.0])
    _close(r1b, [0.0, 0.0, 0.5, 0.0])
    # Only the first tensor in scope (router_scope: first_layer): the second is left alone.
    r1a, r1b, _ = paper_route(g1a, g1b, g2, _seg(2, 2, active=[True, False]), gamma=1.0)
    _close(r1a, [1.0, 1.0, 0.0, 0.0])
    _close(r1b, [0.0, 0.0, 0.0, 0.0])


# ---- the authors' code mode ------------------------------------------------------------------------------------------
def test_code_route_aligned() -> None:
    # k1 = [1,1], k2 = [2,0]: c = 1/sqrt2 > 0 -> no amplification.
    # sum(k1/|k1|) = sqrt2, sum(k2/|k2|) = 1: w12 = sqrt2, w21 = 1/sqrt2.
    d1, d2, st = code_route(T([1.0, 1.0]), T([2.0, 0.0]), _seg(2))
    _close(d1, [2 * R2, 0.0])
    _close(d2, [1 / R2, 1 / R2])
    _close(st["w12"], [R2])


def test_code_route_conflict_and_clipping() -> None:
    # k1 = [1,0], k2 = [-1,1]: c = -1/sqrt2 <= 0 -> factor 1 + 1/sqrt2.
    # sum(k2/|k2|) = 0 -> w12 = div_no_nan(1, 0) = 0 -> clipped to 0.1; w21 = 0 / 1 -> 0.1.
    amp = 1 + 1 / R2
    d1, d2, st = code_route(T([1.0, 0.0]), T([-1.0, 1.0]), _seg(2))
    _close(d1, [-0.1 * amp, 0.1 * amp])
    _close(d2, [0.1 * amp, 0.0])
    # Ratio above 5 is clipped to 5: k1 = [1, 0], k2 = [1, -0.9] -> sum2 = 0.1 / |k2| ~ 0.074 -> ratio ~ 13.5.
    _, _, st = code_route(T([1.0, 0.0]), T([1.0, -0.9]), _seg(2))
    _close(st["w12"], [5.0])


# ---- updater ---------------------------------------------------------------------------------------------------------
def test_sum_updater_collapses_monotonically() -> None:
    sigma, steps = torch.zeros(2), torch.zeros(1)
    mus = []
    for _ in range(30):
        update_sigma(sigma, steps, T(2.0), T(1.0), "sum", 0.0)
        mus.append(float(torch.softmax(sigma, 0)[0]))
    assert all(b >= a for a, b in itertools.pairwise(mus))
    assert all(b > a for a, b in itertools.pairwise(mus[:10]))  # strictly, until float32 saturates
    assert mus[-1] == 1.0  # saturated: mu = (1, 0) in float32, T1'' no longer learns
    _close(sigma, [60.0, 30.0])


@pytest.mark.parametrize("updater", ["ema", "mean"])
def test_ema_and_mean_updaters_stay_bounded(updater: str) -> None:
    gen = torch.Generator().manual_seed(0)
    sigma, steps = torch.zeros(2), torch.zeros(1)
    for _ in range(2000):
        n = torch.rand(2, generator=gen) * T([2.0, 1.0])  # the own tower's norm tends to be larger
        update_sigma(sigma, steps, n[0], n[1], updater, 0.99)  # type: ignore[arg-type]
        assert float(sigma.max()) <= 2.0  # a weighted average of norms in [0, 2]
    mu = torch.softmax(sigma, 0)
    assert 0.5 < float(mu[0]) < 0.8  # sigma -> (1, 0.5): mu_own -> sigmoid(0.5) = 0.62, far from saturation
    if updater == "mean":
        _close(sigma, T([1.0, 0.5]), atol=0.05)


def test_updater_none_keeps_half() -> None:
    sigma, steps = torch.zeros(2), torch.zeros(1)
    update_sigma(sigma, steps, T(5.0), T(1.0), "none", 0.9)
    _close(torch.softmax(sigma, 0), [0.5, 0.5])


# ---- PCGrad ----------------------------------------------------------------------------------------------------------
def test_pcgrad_two_tasks_by_hand() -> None:
    # g1 = [1,0], g2 = [-1,1]: g1.g2 = -1 < 0.
    # g1' = g1 - (-1/2) g2 = [1/2, 1/2];  g2' = g2 - (-1/1) g1 = [0, 1];  sum = [1/2, 3/2].
    out, cos = pcgrad_project(T([[1.0, 0.0], [-1.0, 1.0]]), torch.Generator().manual_seed(0))
    _close(out, [0.5, 1.5])
    _close(cos[0, 1], T(-1 / R2))
    # No conflict: plain sum.
    out, _ = pcgrad_project(T([[1.0, 0.0], [1.0, 1.0]]), torch.Generator().manual_seed(0))
    _close(out, [2.0, 1.0])


def test_pcgrad_order_is_seeded() -> None:
    grads = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    a, _ = pcgrad_project(grads, torch.Generator().manual_seed(7))
    b, _ = pcgrad_project(grads, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)


# ---- methods on real modules -----------------------------------------------------------------------------------------
class _SharedBottom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bottom = nn.Linear(6, 5)
        self.towers = nn.ModuleDict({"a": nn.Linear(5, 1), "b": nn.Linear(5, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.bottom(x))
        return {t: m(h).squeeze(-1) for t, m in self.towers.items()}


def _losses(model: nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = model(x)
    return {t: F.binary_cross_entropy_with_logits(out[t], y[t]) for t in y}


def _data(seed: int = 0, n: int = 32, d: int = 6) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, {"a": (torch.rand(n, generator=g) < 0.5).float(), "b": (torch.rand(n, generator=g) < 0.5).float()}


def test_equal_weights_is_plain_backward() -> None:
    torch.manual_seed(0)
    model = _SharedBottom()
    ref = copy.deepcopy(model)
    x, y = _data()
    method = build_gradient_method(GradientConfig(), model, ["a", "b"], weights={"a": 1.0, "b": 0.5})
    method.backward(_losses(model, x, y))
    losses = _losses(ref, x, y)
    (losses["a"] + 0.5 * losses["b"]).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_uncertainty_weighting_formula() -> None:
    torch.manual_seed(0)
    model = _SharedBottom()
    cfg = GradientConfig.model_validate({"method": "uncertainty", "uncertainty": {"init_log_var": 0.3}})
    method = build_gradient_method(cfg, model, ["a", "b"])
    assert isinstance(method, UncertaintyWeighting)
    assert method.extra_parameters() == [method.log_vars]
    with torch.no_grad():
        method.log_vars.copy_(T([0.3, -0.7]))
    losses = {"a": T(0.8), "b": T(0.2)}
    expected = 0.5 * math.exp(-0.3) * 0.8 + 0.5 * 0.3 + 0.5 * math.exp(0.7) * 0.2 + 0.5 * -0.7
    assert float(method.total(losses)) == pytest.approx(expected, rel=1e-6)
    x, y = _data()
    losses = _losses(model, x, y)
    la, lb = float(losses["a"]), float(losses["b"])
    diag = method.backward(losses)
    assert method.log_vars.grad is not None
    # d/ds_k (0.5 e^{-s_k} L_k + 0.5 s_k) = 0.5 - 0.5 e^{-s_k} L_k
    _close(method.log_vars.grad, [0.5 - 0.5 * math.exp(-0.3) * la, 0.5 - 0.5 * math.exp(0.7) * lb], atol=1e-5)
    assert diag["uncertainty/weight_a"] == pytest.approx(0.5 * math.exp(-0.3), rel=1e-5)


def test_pcgrad_method_writes_projected_shared_grad() -> None:
    torch.manual_seed(0)
    model = _SharedBottom()
    ref = copy.deepcopy(model)
    x, y = _data(1)
    method = build_gradient_method(GradientConfig(method="pcgrad", diagnostics_every=1), model, ["a", "b"])
    assert isinstance(method, PCGrad)
    diag = method.backward(_losses(model, x, y))
    assert method._shared is not None
    assert {id(p) for p in method._shared} == {id(model.bottom.weight), id(model.bottom.bias)}  # towers excluded

    # By hand: per-task gradients of the shared layer, the 2-task projection, the sum.
    losses = _losses(ref, x, y)
    shared = [ref.bottom.weight, ref.bottom.bias]
    ga = torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses["a"], shared, retain_graph=True)])
    gb = torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses["b"], shared, retain_graph=True)])
    dot = float(ga @ gb)
    pa = ga - min(dot, 0.0) / float(gb @ gb) * gb
    pb = gb - min(dot, 0.0) / float(ga @ ga) * ga
    expected = pa + pb
    got = torch.cat([model.bottom.weight.grad.reshape(-1), model.bottom.bias.grad.reshape(-1)])  # type: ignore[union-attr]
    torch.testing.assert_close(got, expected)
    assert diag["pcgrad/cos_mean"] == pytest.approx(dot / float(ga.norm() * gb.norm()), abs=1e-5)
    # Towers keep their ordinary gradient.
    (losses["a"] + losses["b"]).backward()
    for t in ("a", "b"):
        for p, q in zip(model.towers[t].parameters(), ref.towers[t].parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)


# ---- DRGrad on a split head ------------------------------------------------------------------------------------------
class _DRNet(nn.Module):
    """Two gates over one input, then the split head: v1 = gate1(x), v_s = gate2(x)."""

    def __init__(self, cfg: GradientConfig, hidden: list[int] | None = None) -> None:
        super().__init__()
        self.gate1, self.gate2 = nn.Linear(6, 4), nn.Linear(6, 4)
        self.head = build_split_head(cfg.drgrad, 4, [3] if hidden is None else hidden, ["a", "b"])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(torch.tanh(self.gate1(x)), torch.tanh(self.gate2(x)))


def _flat_grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])  # type: ignore[union-attr]


@pytest.mark.parametrize("scope", ["first_layer", "all_layers"])
def test_drgrad_backward_leaves_routed_grads(scope: str) -> None:
    torch.manual_seed(0)
    cfg = GradientConfig.model_validate(
        {"method": "drgrad", "diagnostics_every": 1, "drgrad": {"router_scope": scope, "updater": "sum"}}
    )
    model = _DRNet(cfg)
    ref = copy.deepcopy(model)
    method = build_gradient_method(cfg, model, ["a", "b"])
    assert isinstance(method, DRGradRouter)
    x, y = _data(2)
    diag = method.backward(_losses(model, x, y))

    losses = _losses(ref, x, y)
    (losses["a"] + losses["b"]).backward()
    head = ref.head
    assert head.shared is not None
    own, shared, aux = _flat_grads(head.own), _flat_grads(head.shared), _flat_grads(head.aux["b"])
    sizes = [p.numel() for p in head.own.parameters()]
    active = [True] + [scope == "all_layers"] * (len(sizes) - 1)
    r1a, r1b, st = paper_route(own, shared, aux, Segments.of(sizes, active), 1.0)
    assert model.head.shared is not None
    torch.testing.assert_close(_flat_grads(model.head.own), own + r1a)
    torch.testing.assert_close(_flat_grads(model.head.shared), shared + r1b)
    torch.testing.assert_close(_flat_grads(model.head.aux["b"]), aux)  # T2 unchanged
    for gate in ("gate1", "gate2"):  # everything else: its ordinary gradient
        torch.testing.assert_close(_flat_grads(getattr(model, gate)), _flat_grads(getattr(ref, gate)))
    # Updater: sigma = (|g1' + gR1'|, |g1'' + gR1''|) after one step of the sum updater; mu = softmax(sigma).
    _close(model.head.sigma, torch.stack([(own + r1a).norm(), (shared + r1b).norm()]), atol=1e-6)
    assert diag["drgrad/xi1"] == pytest.approx(float(st["xi1"][torch.tensor(active)].mean()), abs=1e-6)
    assert diag["drgrad/mu_own"] == pytest.approx(float(torch.softmax(model.head.sigma, 0)[0]), abs=1e-6)
    if scope == "first_layer":  # only the first Linear's weight changed
        first = model.head.own[0][0].weight.numel()
        torch.testing.assert_close(_flat_grads(model.head.own)[first:], own[first:])


def test_drgrad_mu_is_used_in_next_forward() -> None:
    torch.manual_seed(0)
    cfg = GradientConfig.model_validate({"method": "drgrad", "drgrad": {"updater": "ema", "ema_decay": 0.5}})
    model = _DRNet(cfg)
    x, y = _data(3)
    _close(model.head.mu, [0.5, 0.5])
    method = build_gradient_method(cfg, model, ["a", "b"])
    method.backward(_losses(model, x, y))
    mu = model.head.mu
    assert float(mu[0]) != 0.5
    with torch.no_grad():
        h = model.head
        assert h.shared is not None
        v1, vs = torch.tanh(model.gate1(x)), torch.tanh(model.gate2(x))
        expected = mu[0] * h.own(v1).squeeze(-1) + mu[1] * h.shared(vs).squeeze(-1)
        torch.testing.assert_close(model(x)["a"], expected)


def test_drgrad_code_mode_symmetric() -> None:
    torch.manual_seed(0)
    cfg = GradientConfig.model_validate({"method": "drgrad", "drgrad": {"mode": "code", "split": False}})
    model = _DRNet(cfg)
    assert model.head.shared is None
    ref = copy.deepcopy(model)
    method = build_gradient_method(cfg, model, ["a", "b"])
    x, y = _data(4)
    method.backward(_losses(model, x, y))
    losses = _losses(ref, x, y)
    (losses["a"] + losses["b"]).backward()
    k1, k2 = ref.head.own[0][0].weight.grad, ref.head.aux["b"][0][0].weight.grad
    assert k1 is not None and k2 is not None
    d1, d2, _ = code_route(k1.reshape(-1), k2.reshape(-1), Segments.of([k1.numel()]))
    torch.testing.assert_close(model.head.own[0][0].weight.grad, k1 + d1.view_as(k1))
    torch.testing.assert_close(model.head.aux["b"][0][0].weight.grad, k2 + d2.view_as(k2))
    # Only the first kernel is routed.
    torch.testing.assert_close(model.head.own[0][0].bias.grad, ref.head.own[0][0].bias.grad)


def test_drgrad_multi_aux_per_task_reduces_to_sum_for_one_task() -> None:
    results = []
    for multi in ("sum", "per_task"):
        torch.manual_seed(0)
        cfg = GradientConfig.model_validate({"method": "drgrad", "drgrad": {"multi_aux": multi}})
        model = _DRNet(cfg)
        build_gradient_method(cfg, model, ["a", "b"]).backward(_losses(model, *_data(5)))
        results.append(_flat_grads(model))
    torch.testing.assert_close(results[0], results[1])


def test_drgrad_multi_aux_per_task_by_hand() -> None:
    # Three towers' worth of flat gradients; per_task averages the g1''-terms and sums the g2-terms.
    torch.manual_seed(0)
    head = SplitTowerHead(4, [3], ["a", "b", "c"])
    cfg = GradientConfig.model_validate({"method": "drgrad", "drgrad": {"multi_aux": "per_task"}})
    x = torch.randn(8, 4)
    out = head(x, x)
    losses = {t: out[t].pow(2).mean() + (t == "a") * out[t].mean() for t in out}
    ref = copy.deepcopy(head)
    build_gradient_method(cfg, head, ["a", "b", "c"]).backward(losses)
    out = ref(x, x)
    sum(out[t].pow(2).mean() + (t == "a") * out[t].mean() for t in out).backward()  # type: ignore[union-attr]
    assert ref.shared is not None and head.shared is not None
    g_own, g_sh = _flat_grads(ref.own), _flat_grads(ref.shared)
    seg = Segments.of([p.numel() for p in ref.own.parameters()], [True, False, False, False])
    from models.gradients import paper_terms

    tb, t2, r1b, _ = paper_terms(g_own, g_sh, _flat_grads(ref.aux["b"]), seg, 1.0)
    tb_c, t2_c, r1b_c, _ = paper_terms(g_own, g_sh, _flat_grads(ref.aux["c"]), seg, 1.0)
    torch.testing.assert_close(_flat_grads(head.own), g_own + (tb + tb_c) / 2 + t2 + t2_c)
    torch.testing.assert_close(_flat_grads(head.shared), g_sh + (r1b + r1b_c) / 2)


def test_split_mmoe_no_router_is_plain_backward() -> None:
    torch.manual_seed(0)
    cfg = GradientConfig.model_validate({"method": "drgrad", "drgrad": {"router": False, "updater": "none"}})
    model = _DRNet(cfg)
    ref = copy.deepcopy(model)
    x, y = _data(6)
    build_gradient_method(cfg, model, ["a", "b"]).backward(_losses(model, x, y))
    losses = _losses(ref, x, y)
    (losses["a"] + losses["b"]).backward()
    torch.testing.assert_close(_flat_grads(model), _flat_grads(ref))
    _close(model.head.mu, [0.5, 0.5])


def test_tied_init_and_retie_guard() -> None:
    torch.manual_seed(0)
    cfg = GradientConfig.model_validate({"method": "drgrad", "drgrad": {"tied_init": True}})
    model = _DRNet(cfg)
    head = model.head
    assert head.shared is not None
    for tower in (head.shared, head.aux["b"]):
        for p, q in zip(tower.parameters(), head.own.parameters(), strict=True):
            torch.testing.assert_close(p, q)
    # After training moved the towers apart, building the method (or a restored checkpoint) must not re-tie them.
    with torch.no_grad():
        head.shared[1].bias.add_(1.0)
    assert not head.maybe_tie_()
    build_gradient_method(cfg, model, ["a", "b"])
    assert not torch.equal(head.shared[1].bias, head.own[1].bias)
    # A meta-built head (DMP zero-fills its buffers) is tied by build_gradient_method.
    meta = build_split_head(cfg.drgrad, 4, [3], ["a", "b"], device=torch.device("meta"))
    meta.to_empty(device="cpu")
    for m in meta.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    meta.tied.zero_()
    meta.sigma.zero_()
    assert meta.maybe_tie_()
    assert meta.shared is not None
    torch.testing.assert_close(meta.shared[0][0].weight, meta.own[0][0].weight)


def test_build_checks_head_matches_config() -> None:
    cfg = GradientConfig.model_validate({"method": "drgrad"})
    model = _DRNet(cfg)
    other = GradientConfig.model_validate({"method": "drgrad", "drgrad": {"tied_init": True}})
    with pytest.raises(ValueError, match="tied_init"):
        build_gradient_method(other, model, ["a", "b"])
    with pytest.raises(ValueError, match="SplitTowerHead"):
        build_gradient_method(cfg, _SharedBottom(), ["a", "b"])
    with pytest.raises(ValidationError):
        GradientConfig.model_validate({"method": "drgrad", "drgrad": {"updater": "median"}})
    with pytest.raises(ValidationError):
        GradientConfig.model_validate({"method": "drgrad", "drgrad": {"gamma": "1"}})  # strict
    with pytest.raises(ValidationError):
        GradientConfig.model_validate({"methd": "equal"})


# ---- per-sample representation router (our extension) ----------------------------------------------------------------
def test_per_sample_rules_by_hand() -> None:
    a, b = T([[1.0, 0.0], [1.0, 0.0]]), T([[-1.0, 1.0], [2.0, 0.0]])
    # Row 0 conflicts: PCGrad gives [1/2, 3/2] (as above); row 1 is aligned: plain sum [3, 0].
    _close(per_sample_route([a, b], "pcgrad"), T([[0.5, 1.5], [3.0, 0.0]]))
    # drgrad rule: row 0: xi = -1/sqrt2, lam = clip(1/sqrt2) -> (1 + 1/sqrt2) [1,0] + 1/sqrt2 [-1,1] = [1, 1/sqrt2].
    # row 1: xi = 1, lam = clip(1/2) = 1/2 -> [1,0] + 1/2 [2,0] = [2, 0].
    _close(per_sample_route([a, b], "drgrad"), T([[1.0, 1 / R2], [2.0, 0.0]]))
    # project_aux: row 0: b . a = -1 -> b loses -1 * a -> [0, 1]; plus a -> [1, 1]. Row 1 aligned: [3, 0].
    _close(per_sample_route([a, b], "project_aux"), T([[1.0, 1.0], [3.0, 0.0]]))
    # Two auxiliary gradients, each projected on its own against the primary (not against each other).
    c = T([[0.0, -1.0], [-4.0, 0.0]])
    _close(per_sample_route([a, b, c], "project_aux"), T([[1.0, 0.0], [3.0, 0.0]]))


def test_per_sample_router_inside_backward() -> None:
    torch.manual_seed(0)
    cfg = GradientConfig.model_validate(
        {"method": "drgrad", "diagnostics_every": 1, "drgrad": {"per_sample": True, "router": False, "updater": "none"}}
    )
    model = _DRNet(cfg)
    ref = copy.deepcopy(model)
    ref.head.per_sample = False
    x, y = _data(7)
    diag = build_gradient_method(cfg, model, ["a", "b"]).backward(_losses(model, x, y))

    # By hand: per-sample gradients of each consumer's loss w.r.t. v_s, combined by the PCGrad rule, then chained
    # into gate2 (v_s = tanh(gate2(x))); towers and gate1 keep their ordinary gradients.
    pre = ref.gate2(x)
    vs = torch.tanh(pre)
    v1 = torch.tanh(ref.gate1(x))
    head = ref.head
    assert head.shared is not None
    mu = head.mu
    la = F.binary_cross_entropy_with_logits(
        mu[0] * head.own(v1).squeeze(-1) + mu[1] * head.shared(vs).squeeze(-1), y["a"]
    )
    lb = F.binary_cross_entropy_with_logits(head.aux["b"](vs).squeeze(-1), y["b"])
    ga, gb = torch.autograd.grad(la, vs, retain_graph=True)[0], torch.autograd.grad(lb, vs, retain_graph=True)[0]
    routed = per_sample_route([ga, gb], "pcgrad")
    (gw,) = torch.autograd.grad(vs, ref.gate2.weight, grad_outputs=routed, retain_graph=True)
    torch.testing.assert_close(model.gate2.weight.grad, gw)
    (la + lb).backward()
    torch.testing.assert_close(_flat_grads(model.gate1), _flat_grads(ref.gate1))
    torch.testing.assert_close(_flat_grads(model.head), _flat_grads(ref.head))
    cos = (ga * gb).sum(-1) / (ga.norm(dim=-1) * gb.norm(dim=-1))
    assert diag["drgrad/sample_conflict"] == pytest.approx(float((cos < 0).float().mean()), abs=1e-6)


def test_personalized_gate_starts_as_identity() -> None:
    gate = PersonalizedGate(pp_dim=5, out_dim=4)
    v, pp = torch.randn(3, 4), torch.randn(3, 5)
    torch.testing.assert_close(gate(v, pp), v)
    with torch.no_grad():
        gate.weight.normal_()
    out = gate(v, pp)
    ratio = out / v
    assert bool(((ratio > 0) & (ratio < 2)).all())


def test_module_docstring_example_runs() -> None:
    import doctest

    import models.gradients as gradients

    result = doctest.testmod(gradients, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
