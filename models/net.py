"""The model below the embedding lookups, in plain ``torch.nn``: bottom (plain, or DTRN's per-task bottoms) -> top
(shared bottom, MMoE, CGC, PLE; ``models/tops.py``) -> per-task towers or DRGrad's split head -> heads.

Training wraps it around TorchRec's embedding collections (``models/multitask.py``); serving around ``torch.nn``
tables (``models/serving.py``). Both hold the same parameter names, so one safetensors file loads into either.
"""

from __future__ import annotations

import torch
from torch import nn

from features.spec import FeatureSpec, TaskKind
from models.config import ModelConfig
from models.drgrad import DRGradConfig, SplitTowerHead
from models.dtrn import DTRNBottom, candidate_field
from models.gradients import build_split_head
from models.mlp import MLP, masked_mean
from models.sparse_output import SparseOutput
from models.tops import build_top

__all__ = ["MultiTaskNet", "PlainBottom", "field_dims", "joint_name", "predictions", "sequence_dim"]


def joint_name(parent: str, child: str) -> str:
    """Name of an ESMM product prediction (pCTCVR for ctr and cvr)."""
    return f"{parent}_{child}"


def field_dims(spec: FeatureSpec) -> dict[str, int]:
    """Embedding width of each single-valued id feature."""
    return {f.name: spec.table(f.table).dim for f in spec.sparse}


def sequence_dim(spec: FeatureSpec) -> int:
    """Embedding width shared by the behaviour sequences (0 without sequences)."""
    return spec.sequence_tables[0].dim if spec.sequence_tables else 0


class AttentionPool(nn.Module):
    """DIN-style pooling of one sequence against the candidate: each real position gets ``MLP([h, q, h - q, h * q])``,
    softmax over the row's real positions, weighted sum. Padding gets weight exactly 0; an empty row pools to 0."""

    def __init__(self, dim: int, hidden: list[int], device: torch.device | None = None) -> None:
        super().__init__()
        # Raw TorchRec rows start tiny (uniform +-1/sqrt(rows)): normalising the query keeps the scorer's inputs on
        # one scale whatever the table size.
        self.query_norm = nn.LayerNorm(dim, device=device)
        self.scorer = nn.Sequential(
            MLP(4 * dim, hidden, 0.0, device), nn.Linear(hidden[-1] if hidden else 4 * dim, 1, device=device)
        )

    def forward(self, values: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """values [B, L, D], mask [B, L] (True = real), query [B, D] -> [B, D]."""
        q = self.query_norm(query).unsqueeze(1).expand_as(values)
        scores = self.scorer(torch.cat([values, q, values - q, values * q], dim=-1)).squeeze(-1)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * mask.to(scores.dtype)  # an all-padding row: uniform * 0 = 0
        return (weights.unsqueeze(-1) * values).sum(dim=1)


class PlainBottom(nn.Module):
    """Every task reads the same vector: [field embeddings, pooled sequences, dense features] (one tensor object,
    repeated, so that tops run their shared layers once). Each sequence is pooled by its spec's ``pooling`` (else
    ``model.sequence_pooling``): mean, sum, or target attention against the candidate on the sequence's table."""

    def __init__(
        self,
        spec: FeatureSpec,
        field_dims: dict[str, int],
        sequence_dim: int,
        cfg: ModelConfig | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.fields = [f.name for f in spec.sparse]
        self.sequences = [f.name for f in spec.sequences]
        self.pooling = {f.name: f.pooling or cfg.sequence_pooling for f in spec.sequences}
        self.candidates: dict[str, str] = {}
        self.attention = nn.ModuleDict()
        for f in spec.sequences:
            if self.pooling[f.name] != "target_attention":
                continue
            candidate = candidate_field(spec, f.table)
            if candidate is None:
                raise ValueError(
                    f"sequence '{f.name}': pooling target_attention needs a single-valued feature on table "
                    f"'{f.table}' (the candidate); use pooling: mean or sum"
                )
            self.candidates[f.name] = candidate
            self.attention[f.name] = AttentionPool(sequence_dim, cfg.attention_mlp, device)
        self.num_tasks = len(spec.tasks)
        self.out_dim = sum(field_dims.values()) + len(self.sequences) * sequence_dim + spec.dense_width

    def pool(self, name: str, out: SparseOutput) -> torch.Tensor:
        values, mask = out.sequences[name]
        if self.pooling[name] == "target_attention":
            return self.attention[name](values, mask, out.fields[self.candidates[name]])
        if self.pooling[name] == "sum":
            return (values * mask.to(values.dtype).unsqueeze(-1)).sum(dim=1)
        return masked_mean(values, mask)

    def forward(self, out: SparseOutput, dense: torch.Tensor) -> list[torch.Tensor]:
        parts = [out.fields[f] for f in self.fields]
        parts += [self.pool(s, out) for s in self.sequences]
        parts.append(dense)
        return [torch.cat(parts, dim=1)] * self.num_tasks


class MultiTaskNet(nn.Module):
    """``sparse`` (the embedding lookups, built by the caller) -> bottom (plain | dtrn) -> top -> per-task towers.
    ``forward_features(looked_up, dense)`` returns one logit (or regression value) [B] per task.

    With ``drgrad`` (the ``gradients.drgrad`` section, when ``gradients.method: drgrad``) the per-task towers are
    replaced by DRGrad's :class:`~models.drgrad.SplitTowerHead`: the primary task's T1' reads its own gate's
    representation, T1'' and the auxiliary towers read the shared one (``forward_task_inputs``), optionally through
    the PPNet-style personalized gate over the embeddings of ``drgrad.personalized_gate``.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        cfg: ModelConfig,
        sparse: nn.Module,
        device: torch.device | None = None,
        drgrad: DRGradConfig | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        self.drgrad = drgrad
        self.task_names = [t.name for t in spec.tasks]
        self.sparse = sparse
        dims, seq_dim = field_dims(spec), sequence_dim(spec)
        self.bottom: PlainBottom | DTRNBottom
        if cfg.bottom == "dtrn":
            self.bottom = DTRNBottom(spec, dims, seq_dim, cfg.dtrn, cfg.dropout, device)
        else:
            self.bottom = PlainBottom(spec, dims, seq_dim, cfg, device)
        self.input_dim = self.bottom.out_dim
        self.top = build_top(cfg, self.input_dim, len(self.task_names), device)
        #: Ordinary per-task towers; empty when the DRGrad head replaces them.
        self.towers = nn.ModuleDict()
        self.head: SplitTowerHead | None = None
        if drgrad is None:
            for name in self.task_names:
                self.towers[name] = nn.Sequential(
                    MLP(self.top.out_dim, cfg.tower_mlp, cfg.dropout, device),
                    nn.Linear(cfg.tower_mlp[-1] if cfg.tower_mlp else self.top.out_dim, 1, device=device),
                )
        else:
            self.head = build_split_head(
                drgrad,
                self.top.out_dim,
                cfg.tower_mlp,
                self.task_names,
                cfg.dropout,
                device,
                pp_dim=self._personalized_dim(drgrad, dims),
            )

    def _personalized_dim(self, drgrad: DRGradConfig, dims: dict[str, int]) -> int:
        """Width of v_pp, the concatenated embeddings of ``drgrad.personalized_gate``; checks the names and that
        per-sample routing has a shared representation to route."""
        if drgrad.primary_task is not None and drgrad.primary_task not in self.task_names:
            raise ValueError(
                f"gradients.drgrad.primary_task: '{drgrad.primary_task}' is not a task of the feature spec "
                f"{self.task_names}"
            )
        if drgrad.per_sample and len(self.task_names) > 2 and drgrad.aux_input != "shared":
            raise ValueError(
                "gradients.drgrad.per_sample with several auxiliary tasks needs gradients.drgrad.aux_input: shared "
                "(per-sample routing combines the gradients of the towers that read v_s)"
            )
        unknown = [f for f in drgrad.personalized_gate if f not in dims]
        if unknown:
            raise ValueError(
                f"gradients.drgrad.personalized_gate: {unknown} are not sparse features of the spec "
                f"(known: {sorted(dims)})"
            )
        return sum(dims[f] for f in drgrad.personalized_gate)

    def forward_features(self, sparse: SparseOutput, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (regression values) per task from looked-up embeddings and the dense features [B, n_dense]."""
        hidden = self.top(self.bottom(sparse, dense))
        if self.head is None:
            return {name: self.towers[name](h).squeeze(-1) for name, h in zip(self.task_names, hidden, strict=True)}
        assert self.drgrad is not None
        fields = self.drgrad.personalized_gate
        v_pp = torch.cat([sparse.fields[f] for f in fields], dim=1) if fields else None
        return self.head.forward_task_inputs(hidden, v_pp=v_pp, aux_input=self.drgrad.aux_input)


def predictions(spec: FeatureSpec, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores per task: probabilities for binary tasks (ESMM children conditional on the parent, plus the product
    under ``joint_name``), values in label space for regression."""
    preds: dict[str, torch.Tensor] = {}
    for task in spec.tasks:
        out = outputs[task.name]
        preds[task.name] = torch.sigmoid(out) if task.kind == TaskKind.binary else out
    for task in spec.tasks:
        if task.esmm_parent:
            preds[joint_name(task.esmm_parent, task.name)] = preds[task.esmm_parent] * preds[task.name]
    return preds
