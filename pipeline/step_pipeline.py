"""How the worker loop turns a stream of batches into optimisation steps (``train.step_pipeline``).

``plain``: take a batch, move it to the device, :func:`pipeline.train_worker.train_step`.

``sparse_dist``: TorchRec's :class:`TrainPipelineSparseDist`. It holds up to two batches ahead of the one being
trained: while batch i runs forward and backward, batch i+1's ids are already being redistributed to the ranks that
own their tables (``input_dist``, the all-to-all) and batch i+2 is being copied to the device. On CUDA the copy and
the all-to-all run on side streams; on CPU the copy is a no-op and only the all-to-all, an asynchronous gloo
collective, can overlap the step. The pipeline calls ``zero_grad``, ``_backward(losses)`` and ``optimizer.step()``
itself; ``_backward`` is overridden here so that the gradient method (equal, uncertainty, PCGrad, DRGrad) does the
backward, as in the plain step.

Both steppers return ``None`` when the epoch's iterator is exhausted, and only after every batch taken from it has
been trained: the pipeline drains the batches it holds before it reports the end. Batches it prefetched but did not
train when the loop stops early (``train.max_steps``) were never counted, so a resume (which skips the trained
batches of the epoch) trains them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from features.batch import Batch
from models.embeddings import SparseArch
from models.sparse_output import SparseOutput
from pipeline.train_worker import TrainingParts, forward_losses, train_step

StepResult = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]


class Stepper(Protocol):
    """One optimisation step per call on the next batch of ``batches``; ``None`` once they are all trained."""

    def step(self, batches: Iterator[Batch]) -> StepResult | None: ...

    def pause(self) -> None:
        """Before the model is called outside the stepper (validation): restore its ordinary forward."""


class PlainStepper:
    """The plain loop: one batch, one step."""

    def __init__(self, parts: TrainingParts, device: torch.device) -> None:
        self.parts, self.device = parts, device

    def step(self, batches: Iterator[Batch]) -> StepResult | None:
        batch = next(batches, None)
        if batch is None:
            return None
        return train_step(self.parts, batch.to(self.device, non_blocking=True))

    def pause(self) -> None:
        pass


def loss_forward(parts: TrainingParts, task_names: list[str]) -> Callable[[Batch | None], tuple[torch.Tensor, Any]]:
    """The pipeline's forward: the model, then the per-task losses stacked in ``task_names`` order (the pipeline
    passes one tensor to ``_backward``); the outputs go back to the caller of ``progress``. As in the plain step
    (:func:`~pipeline.train_worker.forward_losses`)."""

    def forward(batch: Batch | None) -> tuple[torch.Tensor, Any]:
        assert batch is not None  # the pipeline calls the forward only with a batch in hand
        outputs, losses = forward_losses(parts, batch)
        return torch.stack([losses[t] for t in task_names]), outputs

    return forward


class _SparseCalls(nn.Module):
    """What the pipeline traces in place of the model. TorchRec finds the embedding modules to pipeline by tracing the
    model with torch.fx; the dense part of ours is not traceable (its tops hand lists of tensors around), and need
    not be: every sharded module sits in the model's ``sparse`` arch, which the model calls on ``batch.sparse``.
    ``sparse`` is registered under the same name, so the traced names are the model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        sparse = getattr(model, "sparse", None)
        if not isinstance(sparse, SparseArch):
            raise TypeError(f"train.step_pipeline: sparse_dist needs the model's embeddings in .sparse, got {sparse!r}")
        self.sparse = sparse

    def forward(self, batch: Batch) -> SparseOutput:
        return self.sparse(batch.sparse)  # as MultiTaskModel.forward


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedModelParallel, with its sharded children (no DDP or DMP wrapper)."""
    from torchrec.distributed import DistributedModelParallel

    return model.module if isinstance(model, DistributedModelParallel) else model


def _pipeline_class() -> type:
    """TrainPipelineSparseDist with the gradient method as its backward; built on first use (TorchRec's import)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.distributed.train_pipeline.utils import _override_input_dist_forwards, _rewrite_model
    from torchrec.distributed.types import ShardedModule

    class MethodPipeline(TrainPipelineSparseDist):  # type: ignore[misc]
        """``_backward`` hands the stacked losses to the gradient method, unstacked by task; the method's
        diagnostics and the per-task losses of the step are kept for the stepper to return. ``_pipeline_model``
        traces :class:`_SparseCalls` instead of the model."""

        def __init__(self, parts: TrainingParts, task_names: list[str], device: torch.device) -> None:
            super().__init__(
                parts.model,
                parts.optimizer,
                device,
                execute_all_batches=True,  # train the batches it holds when the iterator runs out
                custom_model_fwd=loss_forward(parts, task_names),
            )
            self.method, self.task_names = parts.method, task_names
            self.traced = _SparseCalls(_unwrapped(parts.model))
            self.sharded = {n for n, m in self.traced.named_modules() if isinstance(m, ShardedModule)}
            self.losses: dict[str, torch.Tensor] = {}
            self.diagnostics: dict[str, float] = {}

        def _pipeline_model(self, batch: Batch | None, context: Any, pipelined_forward: Any = None) -> None:
            # TrainPipelineSparseDist._pipeline_model, tracing the stand-in; the model itself stays as it is.
            modules, _, forwards, postprocs, left_out = _rewrite_model(
                model=self.traced,
                context=context,
                dist_stream=self._data_dist_stream,
                default_stream=torch.get_device_module(self._device).current_stream(),
                batch=batch,
                apply_jit=False,
                pipelined_forward=pipelined_forward or self._pipelined_forward_type,
                pipeline_postproc=False,
            )
            if left_out or len(modules) != len(self.sharded):
                raise RuntimeError(
                    f"train.step_pipeline: sparse_dist could not pipeline the sharded modules {sorted(left_out)} "
                    "(their input is not the batch's KJT as is); use plain"
                )
            self._pipelined_modules, self._original_forwards, self._pipelined_postprocs = modules, forwards, postprocs
            self.start_sparse_data_dist(batch, context)
            self._original_kjt_dist_forwards = _override_input_dist_forwards(self._pipelined_modules)

        def _backward(self, losses: torch.Tensor) -> None:
            # unbind keeps the graph: each task's loss is a view of the stacked tensor, so autograd reaches the
            # model through it exactly as through the unstacked losses (PCGrad's per-task passes included).
            self.losses = dict(zip(self.task_names, losses.unbind(0), strict=True))
            self.diagnostics = self.method.backward(self.losses)

    return MethodPipeline


class SparseDistStepper:
    """Steps through TorchRec's TrainPipelineSparseDist (see the module docstring)."""

    def __init__(self, parts: TrainingParts, device: torch.device, task_names: list[str]) -> None:
        self.parts = parts
        self.pipeline = _pipeline_class()(parts, task_names, device)

    def step(self, batches: Iterator[Batch]) -> StepResult | None:
        try:
            self.pipeline.progress(batches)
        except StopIteration:
            return None
        losses, diagnostics = self.pipeline.losses, self.pipeline.diagnostics
        # As in train_step: the total is taken after the optimizer step (uncertainty weighting's s is updated by then).
        return self.parts.method.total(losses).detach(), losses, diagnostics

    @property
    def pipelined_modules(self) -> int:
        """How many sharded modules the pipeline feeds itself (all of the model's, once it has traced)."""
        return len(self.pipeline._pipelined_modules)

    def pause(self) -> None:
        # The pipelined embedding modules read their inputs from the pipeline's context, not their arguments: put the
        # original forwards back; the next progress() rewrites the model again (with a fresh trace).
        self.pipeline.detach()


def make_stepper(kind: str, parts: TrainingParts, device: torch.device, task_names: list[str]) -> Stepper:
    """The stepper ``train.step_pipeline`` names."""
    if kind == "plain":
        return PlainStepper(parts, device)
    if kind == "sparse_dist":
        return SparseDistStepper(parts, device, task_names)
    raise ValueError(f"train.step_pipeline: expected 'plain' or 'sparse_dist', got {kind!r}")
