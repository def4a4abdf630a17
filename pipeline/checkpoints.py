"""Which training checkpoints a run may continue from.

A training run keeps its checkpoints in ``<run_dir>/ray_results/<name>-train`` beside a small identity file: the hash
of the config as far as it shapes the checkpoint, and the key of the data window. A new run of the same command
continues from them when both match (the default, so a crash never costs the finished steps); a checkpoint of
another config or another window is refused, naming both hashes, rather than silently mixed in or thrown away.
``fresh`` starts over and moves the old folder aside (``<name>-train.aside-<UTC time>``), never deleting it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExperimentConfig
from pipeline.logs import notice

IDENTITY_FILE = "checkpoint_identity.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train writes it once a checkpoint is registered

#: Train settings a resumed run may change: how long it runs and on what (DCP reshards onto another worker count),
#: how often it logs and checkpoints. Everything else of the config shapes the state in the checkpoint.
RESUMABLE_TRAIN_FIELDS = frozenset(
    {
        "max_steps",
        "epochs",
        "num_workers",
        "use_gpu",
        "cpus_per_worker",
        "log_every",
        "checkpoint_every_steps",
        "checkpoints_to_keep",
        "max_failures",
    }
)


class CheckpointMismatchError(RuntimeError):
    """The run folder holds checkpoints of another config or data window."""


@dataclass(frozen=True)
class CheckpointIdentity:
    config_hash: str
    data_window: str

    @classmethod
    def of(cls, cfg: ExperimentConfig, window_key: str) -> CheckpointIdentity:
        return cls(checkpoint_config_hash(cfg), window_key)


def checkpoint_config_hash(cfg: ExperimentConfig) -> str:
    """The config's fingerprint without the settings a resumed run may change (``RESUMABLE_TRAIN_FIELDS``)."""
    reset = {name: getattr(type(cfg.train)(), name) for name in RESUMABLE_TRAIN_FIELDS}
    base = cfg.model_copy(update={"train": cfg.train.model_copy(update=reset)})
    return hashlib.sha256(base.fingerprint().encode()).hexdigest()[:12]


def _aside_name(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder.with_name(f"{folder.name}.aside-{stamp}")
    n = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.aside-{stamp}-{n}")
        n += 1
    return target


def prepare_checkpoints(
    folder: Path, identity: CheckpointIdentity, fresh: bool, say: Callable[[str], None] = notice
) -> bool:
    """Get ``folder`` (a Ray Train run folder) ready for a run of ``identity``; True when it will resume.

    Raises :class:`CheckpointMismatchError` when the folder's checkpoints belong to another config or window (and
    ``fresh`` is not set)."""
    ident_path = folder / IDENTITY_FILE
    if folder.exists():
        stored = _read_identity(ident_path)
        has_checkpoint = (folder / SNAPSHOT_FILE).exists()
        if fresh or (not has_checkpoint and stored != identity):
            aside = _aside_name(folder)
            folder.rename(aside)
            why = "--fresh" if fresh else "no checkpoint of this config in it"
            say(f"[train] starting fresh ({why}); the old run folder is kept at {aside}")
        elif stored is None:
            raise CheckpointMismatchError(
                f"{folder} holds checkpoints without a recorded config hash; this config is {identity.config_hash} "
                f"(data window {identity.data_window}). Run with --fresh to start over (they are moved aside)."
            )
        elif stored != identity:
            raise CheckpointMismatchError(
                f"{folder} holds checkpoints of config {stored.config_hash} (data window {stored.data_window}); this "
                f"config is {identity.config_hash} (data window {identity.data_window}). Run with --fresh to start "
                "over (the old checkpoints are moved aside), or point run_dir elsewhere."
            )
        elif has_checkpoint:
            say(f"[train] resuming from the checkpoints in {folder} (config {identity.config_hash})")
            return True
    folder.mkdir(parents=True, exist_ok=True)
    ident_path.write_text(json.dumps({"config_hash": identity.config_hash, "data_window": identity.data_window}))
    return False


def _read_identity(path: Path) -> CheckpointIdentity | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return CheckpointIdentity(str(data.get("config_hash")), str(data.get("data_window")))
