"""DTRN's TIM against a plain reference: every (task, sequence) pair encoded on its own, on the padded layout, with
textbook masked attention and pooling. The model's packed, task-batched path must give the same interest vectors and
the same gradients, with empty histories, one-token histories, full ones, padding past ``max_length`` and holes in
the mask, under every pooling."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from features.spec import FeatureSpec, parse_feature_spec
from models.config import DTRNConfig
from models.dtrn import TIM, DTRNBottom
from models.net import field_dims, sequence_dim
from models.sparse_output import SparseOutput

REPO = Path(__file__).resolve().parents[1]
BATCH = 40


def _cln(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) * gamma + beta


def _attend(tim: TIM, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    attention = tim.layers[i].attention
    b, length, d = x.shape
    h = attention.num_heads
    q, k, v = attention.qkv(x).view(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    # A row without real positions attends everywhere: its outputs are never pooled.
    keys = mask | ~mask.any(dim=1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~keys[:, None, None, :], float("-inf")), dim=-1)
    return attention.proj((weights @ v).transpose(1, 2).reshape(b, length, d))


def _pool(tim: TIM, pooling: str, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None) -> torch.Tensor:
    real = mask.to(x.dtype).unsqueeze(-1)
    if pooling == "sum":
        return (x * real).sum(dim=1)
    if pooling == "mean":
        return (x * real).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)
    assert tim.pool is not None and query is not None
    q = tim.pool.query_norm(tim.project(query)).unsqueeze(1).expand_as(x)
    scores = tim.pool.rest(tim.pool.first(torch.cat([x, q, x - q, x * q], dim=-1))).squeeze(-1)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)  # empty row: 0
    return (weights.unsqueeze(-1) * x).sum(dim=1)


def reference_interests(
    tim: TIM, sequences: list[tuple[torch.Tensor, torch.Tensor]], types: list[int], queries: list[torch.Tensor | None]
) -> torch.Tensor:
    """u [K, M, B, d], one task and one sequence at a time."""
    gamma, beta = tim.hyper()
    pooled = []
    for s, ((seq, mask), t, query) in enumerate(zip(sequences, types, queries, strict=True)):
        x0 = tim.project(seq)
        if tim.position is not None:
            x0 = x0 + tim.position(seq.shape[1])
        per_task = []
        for k in range(tim.num_tasks):
            x = x0
            for i, layer in enumerate(tim.layers):
                x = _cln(x + _attend(tim, i, x, mask), gamma[k, t, 2 * i], beta[k, t, 2 * i])
                x = _cln(x + layer.ffn(x), gamma[k, t, 2 * i + 1], beta[k, t, 2 * i + 1])
            per_task.append(_pool(tim, tim.poolings[s], x, mask, query))
        pooled.append(torch.stack(per_task))
    return torch.stack(pooled, dim=1)


def _masks(lengths: torch.Tensor, width: int, holes: bool, g: torch.Generator) -> torch.Tensor:
    mask = torch.arange(width)[None, :] < lengths[:, None]
    if holes:  # real positions scattered, not left-aligned (the encoder must not assume either)
        perm = torch.stack([torch.randperm(width, generator=g) for _ in range(len(lengths))])
        mask = mask.gather(1, perm)
    return mask


def make_inputs(
    bottom: DTRNBottom, seq_dim: int, holes: bool, dtype: torch.dtype, seed: int = 0
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor | None]]:
    """Sequences (padded values are noise) and candidate embeddings, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    sequences, queries = [], []
    for m in range(len(bottom.sequences)):
        max_length = 20 if m == 0 else 10
        width = max_length + 3 * (m == 1)  # padding past max_length (zeros from the position table)
        lengths = torch.randint(0, max_length + 1, (BATCH,), generator=g)
        lengths[:4] = torch.tensor([0, 1, max_length, 2])  # empty, a single token, full, two tokens
        mask = _masks(lengths, max_length, holes, g)
        mask = torch.cat([mask, torch.zeros(BATCH, width - max_length, dtype=torch.bool)], dim=1)
        seq = (torch.randn(BATCH, width, seq_dim, generator=g, dtype=dtype) * 0.5).requires_grad_()
        sequences.append((seq, mask))
        cand = bottom.candidates[m]
        queries.append(
            torch.randn(BATCH, seq_dim, generator=g, dtype=dtype).requires_grad_() if cand is not None else None
        )
    return sequences, queries


def bottom_spec(poolings: list[str | None] | None = None) -> FeatureSpec:
    raw = yaml.safe_load((REPO / "configs/features/behaviour_logs.yaml").read_text())
    for t in raw["tables"]:
        t["num_buckets"] = min(t["num_buckets"], 50)
    for s, p in zip(raw["sequences"], poolings or [None] * len(raw["sequences"]), strict=True):
        if p is not None:
            s["pooling"] = p
    return parse_feature_spec(raw)


def build_bottom(poolings: list[str | None], **dtrn: object) -> tuple[DTRNBottom, int]:
    spec = bottom_spec(poolings)
    cfg = DTRNConfig.model_validate(
        {"num_layers": 2, "num_heads": 2, "ffn_dim": 16, "hyper_hidden": 8, "attention_mlp": [8, 4], **dtrn}
    )
    torch.manual_seed(0)
    # A larger hypernetwork init than the default, so that a wrong (task, type) pairing cannot hide in the tolerance.
    bottom = DTRNBottom(spec, field_dims(spec), sequence_dim(spec), cfg.model_copy(update={"hyper_init_std": 0.5}))
    return bottom, sequence_dim(spec)


CASES = {
    "target_attention": ([None, None, None], {}),
    "mixed_poolings": ([None, "sum", "mean"], {}),
    "mean_one_layer": (["mean", "mean", "sum"], {"num_layers": 1, "pooling": "mean"}),
    "projected_no_positions": ([None, "mean", None], {"d_model": 12, "num_heads": 3, "positional": False}),
}


# float64 checks the algorithm tightly; float32 checks the kernels the model trains with (sums over a batch of
# gradients drift by a few ulps more, hence the looser gradient tolerance there).
TOLERANCES = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-4)}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["float64", "float32"])
@pytest.mark.parametrize("holes", [False, True], ids=["left_aligned", "holes"])
@pytest.mark.parametrize("case", list(CASES))
def test_tim_matches_per_task_reference(case: str, holes: bool, dtype: torch.dtype) -> None:
    poolings, dtrn = CASES[case]
    bottom, seq_dim = build_bottom(poolings, **dtrn)
    bottom.to(dtype)
    tim = bottom.tim
    out_tol, grad_tol = TOLERANCES[dtype]
    sequences, queries = make_inputs(bottom, seq_dim, holes, dtype)
    leaves = [s for s, _ in sequences] + [q for q in queries if q is not None]
    params: list[torch.Tensor] = list(tim.parameters())
    weight = torch.randn(
        tim.num_tasks, len(sequences), BATCH, tim.d_model, generator=torch.Generator().manual_seed(1), dtype=dtype
    )

    def run(fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        u = fn(sequences, bottom.types, queries)
        grads = torch.autograd.grad((u * weight).sum(), leaves + params, allow_unused=True)
        return u.detach(), [
            g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves + params, strict=True)
        ]

    u_ref, g_ref = run(lambda *a: reference_interests(tim, *a))
    u_new, g_new = run(tim)
    assert u_new.shape == (tim.num_tasks, len(sequences), BATCH, tim.d_model)
    torch.testing.assert_close(u_new, u_ref, rtol=out_tol, atol=out_tol)
    names = [f"input {i}" for i in range(len(leaves))] + [n for n, _ in tim.named_parameters()]
    for name, a, b in zip(names, g_new, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=grad_tol, atol=grad_tol, msg=lambda m, n=name: f"gradient of {n}: {m}")
    # Empty histories pool to exactly 0 under every task, one-token ones do not.
    for m in range(len(sequences)):
        assert torch.all(u_new[:, m, 0] == 0)
        assert torch.all(u_new[:, m, 1].abs().sum(-1) > 0)
    # The tasks differ (the hypernetwork's LayerNorms reach the pooled vectors).
    assert (u_new[0] - u_new[1]).abs().amax() > 1e-3


@pytest.mark.parametrize("dense_field", [True, False], ids=["dense_reweighted", "dense_passed"])
def test_bottom_matches_per_task_trm(dense_field: bool) -> None:
    """The bottom's h_k, computed for all tasks at once, against TRM applied task by task to ``task_fields``."""
    bottom, seq_dim = build_bottom([None, "sum", "mean"], trm_dense_field=dense_field)
    bottom.to(torch.float64)
    sequences, queries = make_inputs(bottom, seq_dim, holes=False, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    dims = field_dims(bottom_spec())
    fields = {f: torch.randn(BATCH, dims[f], generator=g, dtype=torch.float64).requires_grad_() for f in bottom.fields}
    fields["item_id"] = queries[0]  # the candidate the attention-pooled sequence reads
    assert fields["item_id"] is not None
    out = SparseOutput(fields=fields, sequences=dict(zip(bottom.sequences, sequences, strict=True)))
    dense = torch.randn(BATCH, bottom_spec().dense_width, generator=g, dtype=torch.float64).requires_grad_()
    leaves: list[torch.Tensor] = [*fields.values(), dense, *(s for s, _ in sequences), *bottom.parameters()]

    def grads(hs: list[torch.Tensor]) -> list[torch.Tensor]:
        loss = sum((h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum() for h in hs)
        got = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(x) if gr is None else gr for gr, x in zip(got, leaves, strict=True)]

    u = bottom.interests(out)
    reference = []
    for k in range(bottom.num_tasks):
        h = bottom.trm(k, bottom.task_fields(out, dense, u, k))
        reference.append(h if dense_field else torch.cat([h, dense], dim=1))
    batched = bottom(out, dense)
    assert [h.shape for h in batched] == [(BATCH, bottom.out_dim)] * bottom.num_tasks
    for a, b in zip(batched, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads(batched), grads(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
