"""The multi-task model: embeddings -> field assembly -> top (shared bottom, ...) -> per-task towers -> heads.

Each task owns its tower, its label, its loss and its weight (from the feature spec). Heads:
- binary: sigmoid of the tower's logit;
- ESMM child (``esmm_parent``): the tower predicts p(child | parent); the loss is on p(parent) * p(child) against
  parent AND child over every row (the entire space);
- regression: the tower's output is the prediction in label space (after ``label_transform``), MSE loss;
- ``given: P``: the loss only counts rows where P's label is 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtrec.features.batch import Batch
from mtrec.features.spec import FeatureSpec, TaskKind
from mtrec.models.config import ModelConfig
from mtrec.models.embeddings import SparseArch
from mtrec.models.mlp import MLP, masked_mean


class SharedBottom(nn.Module):
    """``y_k = tower_k(f(x))``: one bottom MLP for every task."""

    def __init__(self, in_dim: int, hidden: list[int], num_tasks: int, dropout: float, device: torch.device | None):
        super().__init__()
        self.bottom = MLP(in_dim, hidden, dropout, device)
        self.num_tasks = num_tasks
        self.out_dim = self.bottom.out_dim

    def forward(self, task_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if all(x is task_inputs[0] for x in task_inputs):
            shared = self.bottom(task_inputs[0])
            return [shared] * self.num_tasks
        return [self.bottom(x) for x in task_inputs]


def joint_name(parent: str, child: str) -> str:
    """Name of an ESMM product prediction (pCTCVR for ctr and cvr)."""
    return f"{parent}_{child}"


class MultiTaskModel(nn.Module):
    """Spec-driven multi-task model. ``forward(batch)`` returns one logit (or regression value) [B] per task."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.task_names = [t.name for t in spec.tasks]
        self.sparse = SparseArch(spec, device)
        self.input_dim = (
            sum(self.sparse.field_dims.values()) + len(spec.sequences) * self.sparse.sequence_dim + len(spec.dense)
        )
        self.top = SharedBottom(self.input_dim, cfg.bottom_mlp, len(self.task_names), cfg.dropout, device)
        self.towers = nn.ModuleDict(
            {
                name: nn.Sequential(
                    MLP(self.top.out_dim, cfg.tower_mlp, cfg.dropout, device),
                    nn.Linear(cfg.tower_mlp[-1] if cfg.tower_mlp else self.top.out_dim, 1, device=device),
                )
                for name in self.task_names
            }
        )

    def assemble(self, batch: Batch) -> torch.Tensor:
        """Concatenate field embeddings, mean-pooled sequences and dense features into [B, input_dim]."""
        out = self.sparse(batch.sparse)
        parts = [out.fields[f.name] for f in self.spec.sparse]
        parts += [masked_mean(*out.sequences[f.name]) for f in self.spec.sequences]
        parts.append(batch.dense)
        return torch.cat(parts, dim=1)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.assemble(batch)
        hidden = self.top([x] * len(self.task_names))
        return {name: self.towers[name](h).squeeze(-1) for name, h in zip(self.task_names, hidden, strict=True)}


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


class MultiTaskLoss(nn.Module):
    """Per-task losses from the spec; ``forward`` returns (weighted total, {task: loss})."""

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        self.spec = spec
        self.weights = {t.name: t.loss_weight for t in spec.tasks}

    def task_losses(self, outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for task in self.spec.tasks:
            out, y = outputs[task.name], labels[task.name]
            if task.esmm_parent:
                parent_logit, parent_y = outputs[task.esmm_parent], labels[task.esmm_parent]
                log_p = F.logsigmoid(parent_logit) + F.logsigmoid(out)  # log(pCTR * pCVR), stable
                log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1.0 - 1e-7))
                joint_y = parent_y * y
                per_row = -(joint_y * log_p + (1.0 - joint_y) * log_not_p)
                losses[task.name] = per_row.mean()
                continue
            if task.kind == TaskKind.binary:
                per_row = F.binary_cross_entropy_with_logits(out, y, reduction="none")
            else:
                per_row = F.mse_loss(out, y, reduction="none")
            if task.given:
                mask = (labels[task.given] > 0.5).to(per_row.dtype)
                losses[task.name] = (per_row * mask).sum() / mask.sum().clamp_min(1.0)
            else:
                losses[task.name] = per_row.mean()
        return losses

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = self.task_losses(outputs, labels)
        total = torch.stack([self.weights[name] * loss for name, loss in losses.items()]).sum()
        return total, losses


def build_model(spec: FeatureSpec, cfg: ModelConfig, device: torch.device | None = None) -> MultiTaskModel:
    """Build the model; pass ``torch.device('meta')`` to let DistributedModelParallel materialise it."""
    return MultiTaskModel(spec, cfg, device)
