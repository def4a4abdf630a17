"""A small single-process trainer for experiments and benchmarks: the unsharded model, no Ray, no DMP.

    model = train_local(spec, ModelConfig(top="mmoe"), stats, train_table, epochs=1, batch_size=512,
                        dense_lr=1e-3, embedding_lr=0.05, seed=0)

Same model, same losses and the same optimizer split as the Ray pipeline (Adam on dense parameters, Adagrad on the
embedding tables; the pipeline's fused kernels use row-wise Adagrad, this uses element-wise Adagrad), but one process
and in-memory Arrow data, so a run is fast to start and exactly reproducible: under a fixed seed the initial weights
and the batch order are fixed.

Gradient methods: pass ``gradients`` (the experiment YAML's ``gradients:`` section) and the model and the backward
are the pipeline's: DRGrad's split-tower head when ``method: drgrad``, and ``method.backward(losses)`` in place of
``loss.backward()`` (its own parameters, e.g. uncertainty weighting's log-variances, join the dense optimizer). Or
plug in any callable ``backward(losses, model)`` that receives the per-task losses (``MultiTaskLoss.task_losses``)
and leaves gradients in ``.grad`` (default: the spec's weighted sum, ``.backward()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from features.batch import Batch
from features.spec import FeatureSpec
from features.stats import DenseStats
from features.transform import BatchTransform
from models.config import ModelConfig
from models.gradients import GradientConfig, build_gradient_method, head_config
from models.multitask import (
    MultiTaskLoss,
    MultiTaskModel,
    build_model,
    output_bias_priors,
    set_output_bias,
)

BackwardFn = Callable[[dict[str, torch.Tensor], MultiTaskModel], None]
StepCallback = Callable[[int, dict[str, float]], None]
EpochCallback = Callable[[int, MultiTaskModel], None]


def weighted_sum_backward(losses: dict[str, torch.Tensor], model: MultiTaskModel) -> None:
    """The default ``backward``: ``sum_k loss_weight_k * loss_k``, one ordinary backward pass."""
    weights = {t.name: t.loss_weight for t in model.spec.tasks}
    torch.stack([weights[name] * loss for name, loss in losses.items()]).sum().backward()


def split_parameters(model: MultiTaskModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(embedding-table parameters, dense parameters): the two optimizer groups."""
    embedding_ids = {id(p) for p in model.sparse.parameters()}
    embedding = [p for p in model.parameters() if id(p) in embedding_ids]
    dense = [p for p in model.parameters() if id(p) not in embedding_ids]
    return embedding, dense


def make_optimizers(
    model: MultiTaskModel,
    dense_lr: float,
    embedding_lr: float,
    embedding_optimizer: Literal["adagrad", "adam"] = "adagrad",
    extra: list[torch.nn.Parameter] | None = None,
) -> list[torch.optim.Optimizer]:
    """Adam on dense parameters (plus ``extra``, e.g. a gradient method's own), Adagrad (or Adam) on the tables."""
    embedding, dense = split_parameters(model)
    dense = dense + list(extra or [])
    # fused: one kernel per tensor; the element-wise loop over the full tables would otherwise dominate the step.
    emb_opt: torch.optim.Optimizer = (
        torch.optim.Adagrad(embedding, lr=embedding_lr, eps=1e-8, fused=True)
        if embedding_optimizer == "adagrad"
        else torch.optim.Adam(embedding, lr=embedding_lr, fused=True)
    )
    return [torch.optim.Adam(dense, lr=dense_lr, fused=True), emb_opt]


def train_step(
    model: MultiTaskModel,
    loss_fn: MultiTaskLoss,
    batch: Batch,
    optimizers: list[torch.optim.Optimizer],
    backward: BackwardFn = weighted_sum_backward,
) -> dict[str, torch.Tensor]:
    """One step: forward, per-task losses, ``backward(losses, model)``, every optimizer steps. Returns the losses."""
    losses = loss_fn.task_losses(model(batch), batch.labels)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    backward(losses, model)
    for opt in optimizers:
        opt.step()
    return losses


def shuffled_batches(
    table: pa.Table, transform: BatchTransform, batch_size: int, seed: int, epoch: int
) -> Iterator[Batch]:
    """Batches of a fixed-seed permutation of ``table`` (one permutation per (seed, epoch)); the last partial batch is
    dropped, as in the pipeline."""
    order = np.random.default_rng([seed, epoch]).permutation(table.num_rows)
    shuffled = table.take(pa.array(order))
    for start in range(0, table.num_rows - batch_size + 1, batch_size):
        yield transform(shuffled.slice(start, batch_size))


def train_local(
    spec: FeatureSpec,
    model_cfg: ModelConfig,
    stats: DenseStats,
    train_table: pa.Table,
    *,
    epochs: int = 1,
    batch_size: int = 1024,
    dense_lr: float = 1e-3,
    embedding_lr: float = 0.05,
    seed: int = 0,
    embedding_optimizer: Literal["adagrad", "adam"] = "adagrad",
    backward: BackwardFn | None = None,
    max_steps: int | None = None,
    on_step: StepCallback | None = None,
    init_output_bias: bool = True,
    gradients: GradientConfig | None = None,
    on_epoch: EpochCallback | None = None,
) -> MultiTaskModel:
    """Train the unsharded model on ``train_table`` (validated rows with the spec's columns) and return it in eval
    mode.

    ``seed`` fixes the initial weights and the batch order. ``on_step(step, {task: loss, 'total': ...})`` is called
    after every step (for logging; converting losses to floats costs a little); the gradient method's diagnostics
    are added on the steps it computes them. ``on_epoch(epoch, model)`` after every epoch (the model is in train
    mode again when it returns). ``max_steps`` stops early. ``init_output_bias`` starts every tower's output at the
    training labels' base rate / mean (``output_bias_priors``: without it the dwell regression's offset swamps the
    shared layers early on). ``gradients`` and ``backward`` are exclusive.
    """
    if gradients is not None and backward is not None:
        raise ValueError("train_local: pass either gradients or backward, not both")
    torch.manual_seed(seed)
    model = build_model(spec, model_cfg, torch.device("cpu"), head_config(gradients) if gradients else None)
    model.train()
    transform = BatchTransform(spec, stats)
    if init_output_bias:
        set_output_bias(model, output_bias_priors(spec, transform.labels_numpy(train_table)))
    loss_fn = MultiTaskLoss(spec)
    diagnostics: dict[str, float] = {}
    extra: list[torch.nn.Parameter] = []
    if gradients is not None:
        method = build_gradient_method(gradients, model, model.task_names, dict(loss_fn.weights))
        extra = method.extra_parameters()

        def method_backward(losses: dict[str, torch.Tensor], _: MultiTaskModel) -> None:
            diagnostics.update(method.backward(losses))

        backward = method_backward
    backward = backward or weighted_sum_backward
    optimizers = make_optimizers(model, dense_lr, embedding_lr, embedding_optimizer, extra)
    step = 0
    for epoch in range(epochs):
        for batch in shuffled_batches(train_table, transform, batch_size, seed, epoch):
            if max_steps is not None and step >= max_steps:
                break
            diagnostics.clear()
            losses = train_step(model, loss_fn, batch, optimizers, backward)
            step += 1
            if on_step is not None:
                values = {k: float(v.detach()) for k, v in losses.items()}
                values["total"] = sum(loss_fn.weights[k] * v for k, v in values.items())
                values.update({k: float(v) for k, v in diagnostics.items()})
                on_step(step, values)
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch, model)
            model.train()
        if max_steps is not None and step >= max_steps:
            break
    model.eval()
    return model
