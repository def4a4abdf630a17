"""Checkpoint folders moved, not copied, when Ray Train's storage is a local path.

Ray Train persists a reported checkpoint by copying the worker's folder into its storage, and the driver copied the
final one again into the model folder: at 100M embedding rows each copy is 6 GB. When the storage is a local (or
mounted) path, a worker stages its checkpoint on that filesystem and renames the files into place, and the driver
hard-links the final checkpoint's files into the model folder. Storage elsewhere (a bucket), or a staging folder on
another device, gets Ray's own copy, as before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _storage() -> tuple[Any, Path | None]:
    """This worker's Ray Train storage context and, when it is a local filesystem, its run folder."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return storage, Path(storage.experiment_fs_path)
    return storage, None


@contextmanager
def staging_folder() -> Iterator[Path]:
    """A temporary folder for one checkpoint, inside the run's storage folder when that is local (so that its files
    can be renamed into place), else in the system's temporary folder. Removed on exit."""
    _, root = _storage()
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=root) as folder:
        yield Path(folder)


def move_into_storage(checkpoint: Any, name: str) -> Any:
    """``checkpoint_upload_fn`` for ``ray.train.report``: rename the staged files into the checkpoint's folder in the
    storage (every worker's files merge there, as with Ray's copy); Ray's copy when the storage is not local or the
    staging folder lies on another device."""
    import ray.train

    storage, root = _storage()
    source = Path(checkpoint.path)
    if root is None or source.stat().st_dev != root.stat().st_dev:
        return storage.persist_current_checkpoint(checkpoint, name)
    target = Path(storage.build_checkpoint_path_from_name(name))
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        destination = target / file.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, destination)
    target.mkdir(parents=True, exist_ok=True)  # a worker with nothing to write still reports the folder
    return ray.train.Checkpoint(str(target), filesystem=storage.storage_filesystem)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another device, or a filesystem without hard links
        shutil.copy2(source, destination)


def checkpoint_to_folder(checkpoint: Any, folder: Path) -> None:
    """The checkpoint's files in ``folder`` (replaced): hard links when the checkpoint is a local folder (its files
    are never written again, only deleted, which leaves the links), else Ray's download."""
    import pyarrow.fs

    shutil.rmtree(folder, ignore_errors=True)
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        shutil.copytree(checkpoint.path, folder, copy_function=_link_or_copy)
    else:
        checkpoint.to_directory(str(folder))
