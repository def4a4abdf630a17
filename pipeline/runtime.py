"""Ray start-up shared by the stages: a local Ray by default, a cluster when ``RAY_ADDRESS`` is set (``ray job submit``
sets it), so the same code runs unchanged on a laptop and on a cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.config import ExperimentConfig
from pipeline.progress import log_dir

_verbose = False


def set_verbose(on: bool) -> None:
    """Show library output live (Ray forwards the workers' output to the driver, workers keep their own output)
    instead of keeping it in ``<run_dir>/logs/``. Set by the command line's ``--verbose``."""
    global _verbose
    _verbose = on


def verbose() -> bool:
    return _verbose


def ensure_ray(cfg: ExperimentConfig) -> None:
    import ray
    import ray.data

    # Progress bars of Ray Data flood batch-job logs; the train loop prints its own progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        _start_ray(cfg)
    _link_ray_logs(cfg)


def _link_ray_logs(cfg: ExperimentConfig) -> None:
    """``<run_dir>/logs/ray`` points at this Ray session's log folder (Ray Data tasks, raylet, the training actors'
    own files), so everything about a run is found from its run folder. Only where that folder is on this machine."""
    import ray

    if not ray.is_initialized():
        return
    node = getattr(ray._private.worker.global_worker, "node", None)  # Ray has no public API for the log folder
    if node is None or not hasattr(node, "get_logs_dir_path"):
        return
    source = Path(node.get_logs_dir_path())
    link = log_dir(cfg.run_dir) / "ray"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(source, target_is_directory=True)


def _start_ray(cfg: ExperimentConfig) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=_verbose)
        return
    # Locally, the training workers hold cpus_per_worker each and Ray Data's read tasks need CPUs too, or they wait
    # for the workers that wait for them: the local node gets what the run needs at once (pipeline.resources), even
    # beyond the physical cores, and says so. On a cluster the same needs are checked, never invented.
    from pipeline.resources import local_cpus

    num_cpus = local_cpus(cfg)
    cores = os.cpu_count() or 1
    if num_cpus > cores:
        logging.getLogger(__name__).warning(
            "local Ray: %d logical CPUs on %d cores (the training workers and the data path share them)",
            num_cpus,
            cores,
        )
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=_verbose,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
