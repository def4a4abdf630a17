"""Checkpoints reach Ray Train's storage and the model folder without copying their files when the storage is a local
path: the workers' staged files are renamed into place, the driver hard-links the final checkpoint. Real Ray Train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.checkpoint_files import checkpoint_to_folder


def _stage_and_report(config: dict[str, Any]) -> None:
    """Each rank stages a file of its own (rank 0 also a nested one), notes its inode and reports it."""
    import ray.train

    from pipeline.checkpoint_files import move_into_storage, staging_folder

    rank = ray.train.get_context().get_world_rank()
    for step in range(2):
        with staging_folder() as folder:
            staged = folder / f"rank{rank}.bin"
            staged.write_bytes(bytes([rank, step]) * 1000)
            if rank == 0:
                (folder / "dcp").mkdir()
                (folder / "dcp" / ".metadata").write_text(f"step {step}")
            Path(config["out"], f"staged{rank}-{step}.json").write_text(
                json.dumps({"inode": staged.stat().st_ino, "staging": str(folder)})
            )
            ray.train.report(
                {"step": step},
                checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                checkpoint_upload_fn=move_into_storage,
            )


def test_checkpoints_are_moved_into_local_storage_and_linked_into_the_model_folder(
    ray_local: None, tmp_path: Path
) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp_path / "out"
    out.mkdir()
    storage = tmp_path / "results"
    result = TorchTrainer(
        _stage_and_report,
        train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(
            name="moved", storage_path=str(storage), checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)
        ),
    ).fit()
    assert result.error is None and result.checkpoint is not None
    final = Path(result.checkpoint.path)
    # Both workers' files merged into the last checkpoint, each the very file the worker staged (renamed, not copied).
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()) == [
        "dcp/.metadata",
        "rank0.bin",
        "rank1.bin",
    ]
    assert (final / "dcp" / ".metadata").read_text() == "step 1"
    for rank in (0, 1):
        staged = json.loads((out / f"staged{rank}-1.json").read_text())
        assert (final / f"rank{rank}.bin").stat().st_ino == staged["inode"]
        assert (final / f"rank{rank}.bin").read_bytes() == bytes([rank, 1]) * 1000
        assert not Path(staged["staging"]).exists()  # the staging folder went with the report
    assert not list((storage / "moved").glob(".staging-*"))

    model = tmp_path / "model"
    model.mkdir()
    (model / "stale.json").write_text("{}")  # from an earlier run: replaced
    checkpoint_to_folder(result.checkpoint, model)
    assert sorted(p.name for p in model.iterdir()) == ["dcp", "rank0.bin", "rank1.bin"]
    assert (model / "rank0.bin").stat().st_ino == (final / "rank0.bin").stat().st_ino  # a link, not a copy
    assert (model / "dcp" / ".metadata").read_text() == "step 1"
