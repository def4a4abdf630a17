"""The trained weights leave the workers without a gather: every rank checkpoints its own shards (and its shards of the
best epoch's model), the driver writes the unsharded safetensors file from the DCP checkpoint tensor by tensor, and a
warm start reads the checkpoint back onto another worker count. Checked against ``gather_state_dict``, the gather the
export replaces, on a real 2-process gloo DMP model with row-wise, column-wise, table-wise and data-parallel tables."""

from __future__ import annotations

import json
import os
import shutil
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from models.io import MODEL_FILE, WEIGHTS_FILE
from pipeline.export import BEST_PREFIX, MODEL_PREFIX, export_weights, source_prefix, stored_dcp_keys
from tests.conftest import small_config

PINNED = "train.sharding.tables={item: [row_wise], user: [column_wise], seller: [table_wise], slot: [data_parallel]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_export_writes_a_safetensors_file_of_every_dtype_and_shape(tmp_path: Path) -> None:
    """The streamed file is a valid safetensors file: scalars, empty tensors, mixed dtypes, names with dots."""
    tensors = {
        "a.weight": torch.randn(5, 3),
        "a.bias": torch.randn(3),
        "b.count": torch.tensor(7, dtype=torch.int64),
        "b.half": torch.randn(4, 2).to(torch.bfloat16),
        "c.empty": torch.zeros(0, 4),
        "c.flag": torch.tensor([True, False, True]),
    }
    dcp.save({MODEL_PREFIX: tensors, "optim": {"x": torch.ones(2)}}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    out = tmp_path / WEIGHTS_FILE
    sizes = export_weights(tmp_path / "dcp", out, MODEL_PREFIX)
    loaded = load_file(str(out))
    assert loaded.keys() == tensors.keys()  # "optim" stays out
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
        assert sizes[name] == value.numel() * value.element_size()
    assert source_prefix(stored_dcp_keys(tmp_path / "dcp")) == MODEL_PREFIX
    assert not list(tmp_path.glob("*.partial"))


def test_export_copies_saved_chunks_through_memory_maps_without_loading_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vectors and matrices (fp32, bf16) are copied byte for byte from the checkpoint files, a few rows at a time:
    DCP's loader, which holds a chunk in memory several times over, is never called. Row- and column-sharded chunks:
    the 2-process test below."""
    table = torch.randn(1000, 8)
    tensors = {"t.weight": table, "t.bias": torch.randn(8), "u.weight": torch.randn(70_000, 4).to(torch.bfloat16)}
    dcp.save({MODEL_PREFIX: tensors}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)

    def no_dcp_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the export fell back to DCP's loader")

    monkeypatch.setattr(dcp, "load", no_dcp_load)
    monkeypatch.setattr("pipeline.export.COPY_ROWS", 333)  # several copies per chunk, the last one partial
    out = tmp_path / WEIGHTS_FILE
    export_weights(tmp_path / "dcp", out, MODEL_PREFIX)
    loaded = load_file(str(out))
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name


def _unwrapped(key: str) -> str:
    from models.sharding import unwrapped_name

    return unwrapped_name(key.split(".", 1)[1])


def _perturb(model: torch.nn.Module) -> None:
    """Change every weight in place on every rank alike (replicas stay equal), so "best" and "last" differ."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for value in model.state_dict().values():  # sharded tables: views of this rank's rows
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    shard.tensor.add_(1.0)
        for p in model.parameters():  # dense layers and data-parallel tables (the state dict may hold copies)
            if not isinstance(p, ShardedTensor):
                p.add_(1.0)


def _parts(run_dir: Path, *overrides: str) -> Any:
    from pipeline.train_worker import build_training

    cfg = small_config(run_dir, *overrides)
    return build_training(cfg, cfg.feature_spec(), torch.device("cpu"), local_world_size=dist.get_world_size())


def _local_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a state tree by key, each local shard of a ShardedTensor under its own key."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _local_tensors(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, ShardedTensor):
        return {f"{prefix}shard{i}": s.tensor for i, s in enumerate(tree.local_shards())}
    return {prefix: tree} if isinstance(tree, torch.Tensor) else {}


def _views(tree: Any) -> list[str]:
    """The CPU tensors DCP's file writer would clone before writing: those whose storage is larger than them."""
    return [k for k, t in _local_tensors(tree).items() if t.untyped_storage().nbytes() != t.nbytes]


def _save_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """2 ranks: snapshot the model as "best", change it, checkpoint both; rank 0 keeps the gathered references."""
    from models.sharding import gather_state_dict
    from pipeline.worker_state import (
        LEGACY_BEST_FILE,
        TrainState,
        _tensor_state,
        checkpoint_tree,
        save_checkpoint,
        snapshot_model,
    )

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out: dict[str, Any] = {}
    try:
        parts = _parts(Path(run_dir), PINNED)
        out["plan"] = {k: v["sharding_type"] for k, v in parts.plan_summary.items()}
        best = snapshot_model(parts.model)
        # A copy: on the CPU the gathered dense entries are the live parameters themselves.
        best_gathered = {k: v.clone() for k, v in gather_state_dict(parts.model).items()}
        _perturb(parts.model)  # the snapshot must not follow the live weights
        last_gathered = gather_state_dict(parts.model)
        live, written = _local_tensors(_tensor_state(parts)), _local_tensors(checkpoint_tree(parts, best))
        out["live_views"], out["written_views"] = _views(live), _views(written)
        out["copied"] = [k for k, t in live.items() if written[k].data_ptr() != t.data_ptr()]
        save_checkpoint(parts, TrainState(step=1, world_size=world, best_epoch=1), Path(run_dir, "ckpt"), best)
        # As checkpoints were written before the best epoch went into DCP: rank 0's unsharded copy beside it.
        save_checkpoint(parts, TrainState(step=1, world_size=world, best_epoch=1), Path(run_dir, "ckpt_legacy"))
        if rank == 0:
            save_file(best_gathered, str(Path(run_dir, "gathered_best.safetensors")))
            save_file(best_gathered, str(Path(run_dir, "ckpt_legacy", LEGACY_BEST_FILE)))
            save_file(last_gathered, str(Path(run_dir, "gathered_last.safetensors")))
        dist.barrier()  # no rank tears gloo down while the other still writes (an abort at exit otherwise)
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        Path(run_dir, f"save{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()


def _load_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """1 rank: warm start from the 2-rank checkpoint (and from an older model folder), resume its best snapshot, and
    refuse a changed architecture; writes what it got for the test to compare."""
    from models.sharding import gather_state_dict
    from pipeline.worker_state import load_best, warm_start

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out: dict[str, Any] = {}
    root = Path(run_dir)
    try:
        parts = _parts(root)
        warm_start(parts, root / "model", rank)
        save_file(gather_state_dict(parts.model), str(root / "warm_dcp.safetensors"))
        _perturb(parts.model)
        warm_start(parts, root / "old_model", rank)  # no dcp/: the safetensors path
        save_file(gather_state_dict(parts.model), str(root / "warm_old.safetensors"))
        _perturb(parts.model)
        best = load_best(parts, root / "ckpt")
        assert best is not None
        parts.model.load_state_dict(best)
        save_file(gather_state_dict(parts.model), str(root / "resumed_best.safetensors"))
        _perturb(parts.model)
        legacy = load_best(parts, root / "ckpt_legacy")
        assert legacy is not None
        parts.model.load_state_dict(legacy)
        save_file(gather_state_dict(parts.model), str(root / "resumed_legacy.safetensors"))
        changed = _parts(root, "model.tower_mlp=[8]")
        for folder in ("model", "old_model"):
            try:
                warm_start(changed, root / folder, rank)
                out[folder] = "no error"
            except (KeyError, ValueError) as err:
                out[folder] = str(err)
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        Path(run_dir, f"load{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.slow
def test_export_and_warm_start_match_the_gather_across_worker_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mp.spawn(_save_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    saved = json.loads((tmp_path / "save0.json").read_text())
    assert "error" not in saved, saved.get("error")
    # The fused tables are views into flat buffers; DCP gets them as tensors of their own bytes, not copies, so its
    # writer does not clone them either (a transient of the largest table shard otherwise).
    assert saved["live_views"], "expected the fused tables to be views into one buffer"
    assert saved["written_views"] == [] and saved["copied"] == [], saved
    assert {saved["plan"][t] for t in ("item", "user", "seller", "slot")} == {
        "row_wise",
        "column_wise",
        "table_wise",
        "data_parallel",
    }
    # The driver's side: the final checkpoint copied to a model folder, the weights exported from its DCP folder.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copytree(tmp_path / "ckpt" / "dcp", model_dir / "dcp")
    dcp_dir = model_dir / "dcp"
    assert source_prefix(stored_dcp_keys(dcp_dir)) == BEST_PREFIX
    best, last = (
        load_file(str(tmp_path / "gathered_best.safetensors")),
        load_file(str(tmp_path / "gathered_last.safetensors")),
    )
    assert not any(torch.equal(best[k], last[k]) for k in best)  # the snapshot did not follow the live weights
    loaded_by_dcp: list[str] = []
    real_load = dcp.load

    def recording_load(state: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        loaded_by_dcp.extend(state)
        real_load(state, *args, **kwargs)

    monkeypatch.setattr(dcp, "load", recording_load)
    sizes = export_weights(dcp_dir, model_dir / WEIGHTS_FILE, BEST_PREFIX)
    monkeypatch.undo()
    # Row-, column- and table-wise shards and replicated tables are copied from the files; DCP loads only scalars.
    assert not [k for k in loaded_by_dcp if best[_unwrapped(k)].dim() > 0], loaded_by_dcp
    _assert_equal(load_file(str(model_dir / WEIGHTS_FILE)), best)
    assert sum(sizes.values()) == sum(v.numel() * v.element_size() for v in best.values())
    export_weights(dcp_dir, tmp_path / "last.safetensors", MODEL_PREFIX)
    _assert_equal(load_file(str(tmp_path / "last.safetensors")), last)

    # An older model folder: weights and description, no DCP checkpoint.
    (tmp_path / "old_model").mkdir()
    shutil.copy(model_dir / WEIGHTS_FILE, tmp_path / "old_model" / WEIGHTS_FILE)
    (model_dir / MODEL_FILE).write_text("{}")
    mp.spawn(_load_worker, args=(1, _free_port(), str(tmp_path)), nprocs=1, join=True)
    loaded = json.loads((tmp_path / "load0.json").read_text())
    assert "error" not in loaded, loaded.get("error")
    _assert_equal(load_file(str(tmp_path / "warm_dcp.safetensors")), best)
    _assert_equal(load_file(str(tmp_path / "warm_old.safetensors")), best)
    _assert_equal(load_file(str(tmp_path / "resumed_best.safetensors")), best)
    _assert_equal(load_file(str(tmp_path / "resumed_legacy.safetensors")), best)
    assert source_prefix(stored_dcp_keys(tmp_path / "ckpt_legacy" / "dcp")) == MODEL_PREFIX
    for folder in ("model", "old_model"):
        assert "architecture changed" in loaded[folder] and "tower" in loaded[folder], loaded[folder]
