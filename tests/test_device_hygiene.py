"""Device hygiene of the training step, checked on the CPU with the ``meta`` device.

Every bottom x top x gradient method is built with its dense part and its inputs on ``meta`` and runs forward, the
losses, backward and the method; then the train step's bookkeeping. Tensors on ``meta`` have no data, so:

* a tensor created on another device and mixed with the model's (a CPU tensor that on a GPU worker would be an
  implicit host-to-device copy, or a device mismatch) is caught by a dispatch mode that sees every aten op;
* a host read (``float()``, ``.item()``, ``.tolist()``: a device sync on CUDA) raises on ``meta``.

And the DRGrad router uses no reduction that CUDA runs with atomics (non-deterministic rounding, so replicas routing
the same gradients would drift apart).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from features.batch import Batch
from features.spec import FeatureSpec
from models.embeddings import SparseOutput
from models.gradient_rules import Segments, code_route, paper_route
from models.gradients import GradientConfig, build_gradient_method, head_config
from models.multitask import MultiTaskLoss, build_model
from pipeline.step_stats import LossWindow
from pipeline.train_worker import TrainingParts, train_step
from tests.test_models import COMBOS, model_cfg, small_spec

META = torch.device("meta")
BATCH = 16

METHODS: dict[str, dict[str, Any]] = {
    "equal": {"method": "equal"},
    "uncertainty": {"method": "uncertainty"},
    "pcgrad": {"method": "pcgrad"},
    "drgrad_paper": {
        "method": "drgrad",
        "drgrad": {"updater": "ema", "personalized_gate": ["user_id", "item_id"]},
    },
    "drgrad_code": {"method": "drgrad", "drgrad": {"mode": "code", "updater": "mean"}},
    "drgrad_per_sample": {"method": "drgrad", "drgrad": {"per_sample": True, "aux_input": "shared", "updater": "sum"}},
}

#: aten ops that CUDA implements with atomic adds (results differ run to run in the last bits).
NONDETERMINISTIC_ON_CUDA = {
    "index_add",
    "index_add_",
    "scatter_add",
    "scatter_add_",
    "scatter_reduce",
    "scatter_reduce_",
    "index_put_",
    "_index_put_impl_",
    "put_",
    "index_reduce",
    "index_reduce_",
    "bincount",
    "histc",
}


#: Ops whose output size depends on the data, so CUDA reads a count back to the host (a sync), per bottom. DTRN packs
#: the real sequence positions (``nonzero``) so its Transformer runs on them only: one sync per sequence per step, a
#: known cost of that design; the plain bottom has none.
DATA_DEPENDENT_SYNCS: dict[str, set[str]] = {"plain": set(), "dtrn": {"nonzero"}}
SYNCING_OPS = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "item", "_local_scalar_dense"}


class DeviceAudit(TorchDispatchMode):
    """Records every aten op that mixes ``meta`` tensors with tensors of another device (CPU 0-dim scalars aside,
    which CUDA kernels take as plain numbers), every op's name, and the ops that read a ``meta`` (on a GPU worker: a
    device) tensor's data back to the host. Host reads of CPU tensors (Adam's step counter, PCGrad's random order)
    cost no device sync and are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []
        self.ops: list[str] = []
        self.syncs: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        self.ops.append(name)
        inputs = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        if name in SYNCING_OPS and any(t.is_meta for t in inputs):
            self.syncs.add(name)
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, torch.Tensor)]
        on_meta = any(t.is_meta for t in tensors)
        foreign = [f"{t.device}{list(t.shape)}" for t in tensors if not t.is_meta and t.dim() > 0]
        if on_meta and foreign:
            self.mixed.append(f"{name}: {foreign}")
        return out


@contextmanager
def audited() -> Iterator[DeviceAudit]:
    audit = DeviceAudit()
    with audit:
        yield audit
    assert not audit.mixed, "tensors off the model's device in the step:\n" + "\n".join(audit.mixed[:20])


class StandInSparse(nn.Module):
    """Stands in for the embedding lookups (TorchRec's kernels are not the subject here): the looked-up embeddings
    of every field and sequence, on ``device``, shaped like the real ones."""

    def __init__(self, spec: FeatureSpec, field_dims: dict[str, int], sequence_dim: int, device: torch.device) -> None:
        super().__init__()
        self.spec, self.field_dims, self.sequence_dim, self.device = spec, field_dims, sequence_dim, device

    def forward(self, features: object) -> SparseOutput:
        fields = {name: torch.randn(BATCH, dim, device=self.device) for name, dim in self.field_dims.items()}
        sequences = {
            s.name: (
                torch.randn(BATCH, s.max_length, self.sequence_dim, device=self.device),
                torch.arange(s.max_length, device=self.device).expand(BATCH, -1) < 3,
            )
            for s in self.spec.sequences
        }
        return SparseOutput(fields=fields, sequences=sequences)


def meta_parts(bottom: str, top: str, method: str, device: torch.device = META) -> tuple[TrainingParts, Batch]:
    spec = small_spec()
    gradients = GradientConfig.model_validate({**METHODS[method], "diagnostics_every": 1_000_000})
    model = build_model(spec, model_cfg(bottom, top), device=device, drgrad=head_config(gradients))
    sparse = StandInSparse(spec, model.sparse.field_dims, model.sparse.sequence_dim, device)
    model.sparse = sparse  # type: ignore[assignment]
    task_names = [t.name for t in spec.tasks]
    grad_method = build_gradient_method(gradients, model, task_names)
    # Diagnostics (a host read by design) come on the first call and every diagnostics_every calls: start past the
    # first, so the steps checked here are the ordinary ones.
    grad_method.calls = 1
    params = [p for p in model.parameters()] + grad_method.extra_parameters()
    optimizer = torch.optim.Adam(params, lr=1e-3, foreach=True)
    parts = TrainingParts(model, optimizer, optimizer, MultiTaskLoss(spec), {}, grad_method)
    batch = Batch(
        sparse=None,  # type: ignore[arg-type]  the stand-in lookups ignore it
        dense=torch.randn(BATCH, len(spec.dense), device=device),
        labels={t: torch.randint(0, 2, (BATCH,), device=device).float() for t in task_names},
    )
    return parts, batch


# DTRN's Transformer makes each case ~10x slower than the plain bottom's.
CASES = [pytest.param(b, t, marks=[pytest.mark.slow] if b == "dtrn" else []) for b, t in COMBOS]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(("bottom", "top"), CASES)
def test_step_keeps_everything_on_the_model_device(bottom: str, top: str, method: str) -> None:
    from torch.fx.experimental import _config as fx_config

    parts, batch = meta_parts(bottom, top, method)
    parts.model.train()
    window = LossWindow()
    # meta has no nonzero (its size is the data's); let it assume all positions are real, and count the op below.
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True), audited() as audit:
        for _ in range(2):  # the second step runs with optimizer state and the method's caches in place
            total, losses, diagnostics = train_step(parts, batch)
            window.add(total, losses)
    assert audit.syncs == DATA_DEPENDENT_SYNCS[bottom]
    assert total.is_meta and all(v.is_meta for v in losses.values())
    assert diagnostics == {}
    assert window.steps == 2 and all(v.is_meta for v in window.sums.values())


@pytest.mark.parametrize("method", ["equal", "drgrad_paper"])
def test_bf16_autocast_runs_the_dense_part_in_bf16_and_the_losses_in_fp32(method: str) -> None:
    """Autocast has no ``meta`` backend: this one runs on the CPU with real (small) tensors."""
    torch.manual_seed(0)
    parts, batch = meta_parts("dtrn", "ple", method, device=torch.device("cpu"))
    parts.autocast = torch.bfloat16
    linear_dtypes: list[torch.dtype] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: linear_dtypes.append(out.dtype))
        for m in parts.model.modules()
        if isinstance(m, nn.Linear)
    ]
    total, losses, _ = train_step(parts, batch)
    for h in hooks:
        h.remove()
    assert linear_dtypes and set(linear_dtypes) == {torch.bfloat16}
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in losses.values())
    assert torch.isfinite(total)
    assert all(p.dtype == torch.float32 for p in parts.model.parameters())


def test_loss_window_reads_the_device_only_when_asked() -> None:
    window = LossWindow()
    for step in range(3):
        window.add(torch.tensor(float(step)), {"click": torch.tensor(2.0 * step)})
    assert window.mean_over_ranks(world=1) == {"click": 2.0, "total": 1.0}
    assert window.steps == 0 and window.mean_over_ranks(world=1) == {}
    meta = LossWindow()
    meta.add(torch.empty((), device=META), {"click": torch.empty((), device=META)})
    with pytest.raises((RuntimeError, NotImplementedError)):
        meta.mean_over_ranks(world=1)  # the one host read: a device sync on CUDA, impossible on meta


def _router_inputs(sizes: list[int]) -> tuple[list[torch.Tensor], Segments]:
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    return [torch.randn(n, generator=g) for _ in range(3)], Segments.of(sizes, [True, False, True, True])


def test_router_uses_no_cuda_atomic_reductions() -> None:
    (a, b, c), seg = _router_inputs([6, 4, 5, 3])
    audit = DeviceAudit()
    with audit:
        paper_route(a, b, c, seg, gamma=1.0)
        code_route(a, c, seg)
    used = NONDETERMINISTIC_ON_CUDA & set(audit.ops)
    assert not used, f"the router reduces with {sorted(used)}, which is not deterministic on CUDA"


def test_segment_sums_are_exact_per_segment() -> None:
    (a, b, _), seg = _router_inputs([6, 4, 5, 3])
    rows = torch.stack([a, b])
    expected = torch.stack([torch.stack([p.sum() for p in r.split(list(seg.sizes))]) for r in rows])
    assert torch.equal(seg.sums(rows), expected)
