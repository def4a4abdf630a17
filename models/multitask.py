"""The multi-task model: embeddings -> bottom (plain, or DTRN's per-task bottoms) -> top (shared bottom, MMoE, CGC,
PLE; ``models/tops.py``) -> per-task towers -> heads. Bottom and top are chosen in ``ModelConfig``.

Each task owns its tower, its label, its loss and its weight (from the feature spec). Heads:
- binary: sigmoid of the tower's logit;
- ESMM child (``esmm_parent``): the tower predicts p(child | parent); the loss is on p(parent) * p(child) against
  parent AND child over every row (the entire space);
- regression: the tower's output is the prediction in label space (after ``label_transform``), MSE loss;
- ``given: P``: the loss only counts rows where P's label is 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.batch import Batch
from features.spec import FeatureSpec, TaskKind
from models.config import ModelConfig
from models.drgrad import DRGradConfig, SplitTowerHead
from models.dtrn import DTRNBottom
from models.embeddings import SparseArch, SparseOutput
from models.gradients import build_split_head
from models.mlp import MLP, masked_mean
from models.tops import SharedBottom, build_top

__all__ = [
    "MultiTaskLoss",
    "MultiTaskModel",
    "SharedBottom",
    "build_model",
    "format_parameter_report",
    "joint_name",
    "output_bias_priors",
    "parameter_report",
    "predictions",
    "set_output_bias",
]


def joint_name(parent: str, child: str) -> str:
    """Name of an ESMM product prediction (pCTCVR for ctr and cvr)."""
    return f"{parent}_{child}"


class PlainBottom(nn.Module):
    """Every task reads the same vector: [field embeddings, mean-pooled sequences, dense features] (one tensor object,
    repeated, so that tops run their shared layers once)."""

    def __init__(self, spec: FeatureSpec, field_dims: dict[str, int], sequence_dim: int) -> None:
        super().__init__()
        self.fields = [f.name for f in spec.sparse]
        self.sequences = [f.name for f in spec.sequences]
        self.num_tasks = len(spec.tasks)
        self.out_dim = sum(field_dims.values()) + len(self.sequences) * sequence_dim + len(spec.dense)

    def forward(self, out: SparseOutput, dense: torch.Tensor) -> list[torch.Tensor]:
        parts = [out.fields[f] for f in self.fields]
        parts += [masked_mean(*out.sequences[s]) for s in self.sequences]
        parts.append(dense)
        return [torch.cat(parts, dim=1)] * self.num_tasks


class MultiTaskModel(nn.Module):
    """Spec-driven multi-task model: SparseArch -> bottom (plain | dtrn) -> top -> per-task towers.
    ``forward(batch)`` returns one logit (or regression value) [B] per task.

    With ``drgrad`` (the ``gradients.drgrad`` section, when ``gradients.method: drgrad``) the per-task towers are
    replaced by DRGrad's :class:`~models.drgrad.SplitTowerHead`: the primary task's T1' reads its own gate's
    representation, T1'' and the auxiliary towers read the shared one (``forward_task_inputs``), optionally through
    the PPNet-style personalized gate over the embeddings of ``drgrad.personalized_gate``.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        cfg: ModelConfig,
        device: torch.device | None = None,
        drgrad: DRGradConfig | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        self.drgrad = drgrad
        self.task_names = [t.name for t in spec.tasks]
        self.sparse = SparseArch(spec, device)
        self.bottom: PlainBottom | DTRNBottom
        if cfg.bottom == "dtrn":
            self.bottom = DTRNBottom(
                spec, self.sparse.field_dims, self.sparse.sequence_dim, cfg.dtrn, cfg.dropout, device
            )
        else:
            self.bottom = PlainBottom(spec, self.sparse.field_dims, self.sparse.sequence_dim)
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
                pp_dim=self._personalized_dim(drgrad),
            )

    def _personalized_dim(self, drgrad: DRGradConfig) -> int:
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
        dims = self.sparse.field_dims
        unknown = [f for f in drgrad.personalized_gate if f not in dims]
        if unknown:
            raise ValueError(
                f"gradients.drgrad.personalized_gate: {unknown} are not sparse features of the spec "
                f"(known: {sorted(dims)})"
            )
        return sum(dims[f] for f in drgrad.personalized_gate)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        sparse = self.sparse(batch.sparse)
        hidden = self.top(self.bottom(sparse, batch.dense))
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


def build_model(
    spec: FeatureSpec, cfg: ModelConfig, device: torch.device | None = None, drgrad: DRGradConfig | None = None
) -> MultiTaskModel:
    """Build the model; pass ``torch.device('meta')`` to let DistributedModelParallel materialise it. ``drgrad``:
    DRGrad's split-tower head instead of the towers (``head_config(cfg.gradients)`` of the experiment)."""
    return MultiTaskModel(spec, cfg, device, drgrad)


def output_bias_priors(spec: FeatureSpec, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Per task, the output bias under which the untrained model predicts the base rate (binary: logit of the
    positive rate on the task's sample space, ESMM child: of p(child | parent)) or the mean label (regression).

    Why: an output layer that starts at 0 is far from a regression label such as log1p(dwell seconds) (mean about
    2 on the generated logs); Adam moves a bias by about the learning rate per step, so for the first thousands of
    steps the shared layers carry the offset instead, and the MSE gradients swamp the other tasks. On the generated
    logs (1 epoch, shared bottom) that took ctr AUC from 0.80 to 0.74 and cvr AUC from 0.82 to 0.19 (inverted).
    ``labels``: task name -> label array after ``label_transform`` (``BatchTransform.labels_numpy``).
    """
    priors: dict[str, float] = {}
    for task in spec.tasks:
        y = np.asarray(labels[task.name], dtype=np.float64)
        cond = task.given or task.esmm_parent
        if cond is not None:
            y = y[np.asarray(labels[cond]) > 0.5]
        if y.size == 0:
            continue
        if task.kind == TaskKind.binary:
            rate = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
            priors[task.name] = float(np.log(rate / (1 - rate)))
        else:
            priors[task.name] = float(y.mean())
    return priors


def _output_bias_names(task: str) -> tuple[str, ...]:
    """Parameter names (suffixes) of a task's output bias: its tower's, or under the DRGrad head T1' and T1'' (both
    set: mixed with weights summing to 1 they give the prior) or its auxiliary tower."""
    return (f"towers.{task}.1.bias", "head.own.1.bias", "head.shared.1.bias", f"head.aux.{task}.1.bias")


def set_output_bias(model: nn.Module, priors: dict[str, float]) -> None:
    """Set each task tower's output bias (see ``output_bias_priors``). Works on the plain model and on a DMP-wrapped
    one (parameters found by name suffix); under DMP call it on every rank with the same priors."""
    found = set()
    heads = [m for m in model.modules() if isinstance(m, SplitTowerHead)]
    primary = heads[0].primary if heads else None
    with torch.no_grad():
        for name, param in model.named_parameters():
            for task, value in priors.items():
                names = _output_bias_names(task)
                if task != primary:
                    names = (names[0], names[3])
                if any(name == n or name.endswith("." + n) for n in names):
                    param.fill_(value)
                    found.add(task)
    missing = set(priors) - found
    if missing:
        raise KeyError(f"no tower output bias for tasks {sorted(missing)}")


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_report(model: MultiTaskModel, spec: FeatureSpec, cfg: ModelConfig) -> dict[str, int | float]:
    """Parameter counts by part; keys are valid MLflow metric names. Works on a meta-device model (nothing is
    allocated), so ``parameter_report(build_model(spec, cfg, torch.device('meta')), spec, cfg)`` is free.

    Always: total, embeddings (TorchRec tables), dense (everything else), bottom, top, towers. For ``bottom: dtrn``
    also the TIM: the shared encoder (attention + FFN; its LayerNorms have no parameters of their own), the
    hypernetwork (with the task and type embeddings), and what K x M separate encoders of the same size (each with its
    own LayerNorms) would need, for K tasks and M behaviour types; plus the pooling, TRM and input-side layers.
    """
    if cfg != model.cfg:
        raise ValueError("parameter_report: cfg is not the config the model was built with")
    total = _numel(model)
    embeddings = _numel(model.sparse)
    report: dict[str, int | float] = {
        "total": total,
        "embeddings": embeddings,
        "dense": total - embeddings,
        "bottom": _numel(model.bottom),
        "top": _numel(model.top),
        "towers": _numel(model.towers) + _numel(model.head),
    }
    if isinstance(model.bottom, DTRNBottom):
        tim = model.bottom.tim
        k, m = tim.num_tasks, len(tim.types)
        encoder = _numel(tim.layers)
        one_encoder = encoder + 2 * tim.num_norms * tim.d_model  # an ordinary encoder owns its gammas and betas
        hyper = _numel(tim.hyper)
        separate = k * m * one_encoder
        report.update(
            {
                "dtrn.tasks_K": k,
                "dtrn.behaviour_types_M": m,
                "dtrn.shared_encoder": encoder,
                "dtrn.hypernetwork": hyper,
                "dtrn.encoder_and_hypernetwork": encoder + hyper,
                "dtrn.one_encoder_with_layernorms": one_encoder,
                "dtrn.separate_encoders_KxM": separate,
                "dtrn.hypernetwork_over_one_encoder": hyper / one_encoder,
                "dtrn.dtrn_over_separate": (encoder + hyper) / separate,
                "dtrn.input_projection_and_positions": _numel(tim.input_proj) + _numel(tim.position),
                "dtrn.pooling": _numel(tim.pool),
                "dtrn.trm": _numel(model.bottom.trm),
            }
        )
    return report


def format_parameter_report(report: dict[str, int | float]) -> str:
    """One ``name  value`` line per entry, for logs."""
    width = max(len(k) for k in report)
    return "\n".join(
        f"{k:<{width}}  {v:>12,}" if isinstance(v, int) else f"{k:<{width}}  {v:>12.3f}" for k, v in report.items()
    )
