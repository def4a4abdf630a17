"""A training worker's state on disk: DCP checkpoints (save, resume) and the warm start from a trained model.

Every rank reads and writes only its own shards; nothing here gathers a table onto one rank. A checkpoint's DCP
folder holds tensors only (DCP unpickles any non-tensor entry when loading) under ``model``, ``optim``, ``method``
and, once a validation epoch improved, ``best``: the best epoch's model, each rank keeping a copy of its own shards
(:func:`snapshot_model`). :func:`pipeline.export.export_weights` writes the unsharded weights from it on the driver.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from models.io import MODEL_FILE, WEIGHTS_FILE
from models.sharding import unwrapped_name
from pipeline.checkpoint_files import move_into_storage, staging_folder
from pipeline.export import BEST_PREFIX, MODEL_PREFIX, source_prefix, stored_dcp_keys, stored_tensors

if TYPE_CHECKING:
    from pipeline.train_worker import TrainingParts

STATE_FILE = "train_state.json"
VALIDATION_FILE = "validation_curve.json"  # the validation window's per-epoch metrics, in the final checkpoint
DCP_DIR = "dcp"
# Where checkpoints written before the best epoch was kept in DCP hold it: rank 0's unsharded copy. Read, never written.
LEGACY_BEST_FILE = "best_weights.safetensors"


@dataclass
class TrainState:
    """Where training is: saved with every checkpoint so a resumed run continues at the same step and data position.

    ``epoch_samples`` counts the samples of the current epoch consumed by ALL workers, so a run resumed with another
    worker count skips the same global number of rows.
    """

    step: int = 0
    epoch: int = 0
    epoch_samples: int = 0
    samples: int = 0
    world_size: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    diagnostics: list[dict[str, float]] = field(default_factory=list)
    # The validation window's per-epoch metrics and rank 0's decisions (identical on every rank: broadcast).
    validation: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # epochs completed when the watched metric was best; 0: none yet
    best_value: float | None = None
    stale_epochs: int = 0
    stopped_early: bool = False
    # samples/s of each log window; ``epoch_start`` marks an epoch's first window (it pays the stream's start-up).
    rates: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: int = 0  # written so far, the one being written included


def _tensor_state(parts: TrainingParts) -> dict[str, Any]:
    """Model and optimizer state as a tree of tensors only (ShardedTensors for sharded tables)."""
    optim_state = parts.optimizer.state_dict()["state"]
    state: dict[str, Any] = {MODEL_PREFIX: parts.model.state_dict(), "optim": optim_state}
    extra = parts.method.extra_parameters()  # e.g. uncertainty weighting's log-variances, outside the model
    if extra:
        state["method"] = {str(i): p.data for i, p in enumerate(extra)}
    return state


def snapshot_model(model: nn.Module) -> dict[str, Any]:
    """A copy of this rank's part of the model state: ShardedTensors keep their global layout with cloned local
    shards, so the extra memory is this rank's own shards (on the model's device)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_tree(parts: TrainingParts, best: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :func:`save_checkpoint` hands DCP: the model, optimizer and method state (and ``best``), every CPU
    tensor that is a view into a larger buffer re-wrapped as a tensor of its own bytes (:func:`own_storage`)."""
    tree = _tensor_state(parts)
    if best is not None:
        tree[BEST_PREFIX] = best
    return _map_tensors(tree, own_storage)


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as ``tensor``, as a tensor whose storage is exactly its bytes.

    DCP's file writer clones a CPU tensor whose storage is larger than the tensor (it would otherwise serialise the
    whole storage). TorchRec's fused kernels keep a worker's tables and their optimizer state in flat buffers, so
    every table is such a view, and the clone made the checkpoint's peak memory grow by the largest table shard.
    Wrapping the contiguous view through NumPy gives it a storage of its own size without copying (the array keeps
    the buffer alive). Other tensors, and any on an accelerator (copied to the host anyway), are returned as they are.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    # NumPy has no bfloat16 (nor some other torch dtypes): wrap the same bytes as integers of the same width.
    carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return torch.from_numpy(tensor.view(carrier).numpy()).view(tensor.dtype)


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a state tree, ShardedTensors' local shards included (same global layout)."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, ShardedTensor):
        shards = [Shard(tensor=fn(s.tensor), metadata=s.metadata) for s in tree.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, tree.metadata(), process_group=tree._process_group
        )
    if type(tree) in (torch.Tensor, nn.Parameter):  # not subclasses such as DTensor: DCP handles those itself
        return fn(tree.detach())
    return tree


def save_checkpoint(parts: TrainingParts, state: TrainState, folder: Path, best: dict[str, Any] | None = None) -> None:
    """Collective: every rank writes its shards (and its part of ``best``, the best epoch's snapshot, when given)
    into ``folder/dcp``; rank 0 adds the train state."""
    import torch.distributed.checkpoint as dcp

    dcp.save(checkpoint_tree(parts, best), checkpoint_id=str(folder / DCP_DIR))
    if dist.get_rank() == 0:
        (folder / STATE_FILE).write_text(json.dumps(asdict(state)))


def load_checkpoint(parts: TrainingParts, folder: Path) -> TrainState:
    """Load in place; DCP reads by global offsets, so it also reshards onto another worker count."""
    import torch.distributed.checkpoint as dcp

    parts.dense_optimizer.init_state()  # Adam's state is lazy: create it so DCP can load into it in place
    target = _tensor_state(parts)
    dcp.load(target, checkpoint_id=str(folder / DCP_DIR))
    parts.model.load_state_dict(target[MODEL_PREFIX])
    for i, p in enumerate(parts.method.extra_parameters()):
        p.data.copy_(target["method"][str(i)])
    current = parts.optimizer.state_dict()
    parts.optimizer.load_state_dict({**current, "state": target["optim"]})
    return TrainState(**json.loads((folder / STATE_FILE).read_text()))


def load_best(parts: TrainingParts, folder: Path) -> dict[str, Any] | None:
    """Collective: this rank's shards of the checkpoint's best-epoch snapshot (resharded onto the current plan), or
    None when the checkpoint has none."""
    import torch.distributed.checkpoint as dcp

    target = snapshot_model(parts.model)  # the current layout, filled by global offsets
    if source_prefix(stored_dcp_keys(folder / DCP_DIR)) == BEST_PREFIX:
        dcp.load({BEST_PREFIX: target}, checkpoint_id=str(folder / DCP_DIR))
        return target
    if (folder / LEGACY_BEST_FILE).is_file():
        _load_from_safetensors(target, folder / LEGACY_BEST_FILE)
        return target
    return None


def warm_start(parts: TrainingParts, model_dir: Path, rank: int) -> None:
    """Collective: initialise the model from a trained model folder, each rank reading only its own shards.

    From the folder's DCP checkpoint (the best epoch's model when it holds one, else the last step's), resharded by
    DCP whatever the worker count that wrote it; a folder without one (an older model) is read from its safetensors
    weights, again row ranges of this rank's shards only. Raises KeyError (a tensor the folder lacks) or ValueError
    (another shape) when the architecture changed.
    """
    own = parts.model.state_dict()
    dcp_dir = model_dir / DCP_DIR
    if dcp_dir.is_dir():
        source = _load_from_dcp(own, dcp_dir)
    else:
        _load_from_safetensors(own, model_dir / WEIGHTS_FILE)
        # A registered version keeps the serving files only (and older models had no checkpoint beside them).
        source = f"{WEIGHTS_FILE}, each rank its own rows (no {DCP_DIR}/ checkpoint in the folder)"
    parts.model.load_state_dict(own)
    if rank == 0:
        print(f"[train] warm start from {model_dir}: {source}", flush=True)


def _load_from_dcp(own: dict[str, Any], dcp_dir: Path) -> str:
    import torch.distributed.checkpoint as dcp

    prefix = source_prefix(stored_dcp_keys(dcp_dir))
    stored = stored_tensors(dcp_dir, prefix)
    target: dict[str, Any] = {}
    for key, tensor in own.items():
        name = unwrapped_name(key)
        if name not in stored:
            raise KeyError(f"warm start: {dcp_dir} has no weights for '{name}' (architecture changed?)")
        if stored[name].shape != tuple(tensor.size()):
            raise ValueError(
                f"warm start: '{name}' is {list(stored[name].shape)} in {dcp_dir}, {list(tensor.size())} in this "
                "model (architecture changed?)"
            )
        target[stored[name].key] = tensor  # DCP loads in place, by global offsets
    dcp.load(target, checkpoint_id=str(dcp_dir))
    return f"{DCP_DIR}/ ({'best epoch' if prefix == BEST_PREFIX else 'last step'})"


def _load_from_safetensors(own: dict[str, Any], path: Path) -> None:
    """Copy each own shard's rows from the file (memory-mapped slices: never the whole table)."""
    from safetensors import safe_open
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad(), safe_open(str(path), framework="pt") as fh:
        names = set(fh.keys())
        for key, target in own.items():
            name = unwrapped_name(key)
            if name not in names:
                raise KeyError(f"warm start: {path} has no weights for '{name}' (architecture changed?)")
            whole = fh.get_slice(name)
            if tuple(whole.get_shape()) != tuple(target.size()):
                raise ValueError(
                    f"warm start: '{name}' is {whole.get_shape()} in {path}, {list(target.size())} in this model "
                    "(architecture changed?)"
                )
            if isinstance(target, ShardedTensor):
                for shard in target.local_shards():
                    ranges = zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True)
                    shard.tensor.copy_(whole[tuple(slice(o, o + n) for o, n in ranges)])
            else:
                target.copy_(fh.get_tensor(name))


def report_checkpoint(
    parts: TrainingParts,
    state: TrainState,
    metrics: dict[str, Any],
    best: dict[str, Any] | None,
    records: dict[str, str] | None = None,
) -> None:
    """Checkpoint through Ray Train: every rank reports its own folder, Ray merges them into one. ``best`` (with a
    validation window): this rank's shards of the best epoch's model travel in every checkpoint, so a resumed run
    still has them. ``records``: files (name -> text) written beside the state."""
    import ray.train

    state.checkpoints += 1
    with staging_folder() as folder:
        save_checkpoint(parts, state, folder, best)
        for name, text in (records or {}).items():
            (folder / name).write_text(text)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=move_into_storage)


def report_final(
    parts: TrainingParts,
    state: TrainState,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None,
    best: dict[str, Any] | None,
) -> None:
    """The final checkpoint: the DCP state (every rank's shards, with ``best`` when a validation epoch improved) and,
    from rank 0 (``extra``), the model description and run records. The driver exports the weights from it."""
    metrics["checkpoints"] = state.checkpoints + 1  # this one included
    records = None
    if extra is not None:
        records = {
            MODEL_FILE: json.dumps(extra["description"], indent=2),
            "plan.json": json.dumps(extra["plan"], indent=2),
            "training_curve.json": json.dumps(extra["curve"]),
            "gradient_diagnostics.json": json.dumps(extra["diagnostics"]),
            VALIDATION_FILE: json.dumps(extra["validation"]),
            "summary.json": json.dumps(metrics),
        }
    report_checkpoint(parts, state, metrics, best, records)
