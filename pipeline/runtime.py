"""Ray start-up shared by the stages: a local Ray by default, a cluster when ``RAY_ADDRESS`` is set (``ray job submit``
sets it), so the same code runs unchanged on a laptop and on a cluster."""

from __future__ import annotations

import logging
import os

from pipeline.config import ExperimentConfig


def ensure_ray(cfg: ExperimentConfig) -> None:
    import ray
    import ray.data

    # Progress bars of Ray Data flood batch-job logs; the train loop prints its own progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # Locally, the training workers hold cpus_per_worker each; Ray Data's read and validate tasks need CPUs too, or
    # they wait for the workers that wait for them. Give the local node logical headroom beyond the physical cores.
    needed = cfg.train.num_workers * cfg.train.cpus_per_worker + 4
    ray.init(
        num_cpus=max(os.cpu_count() or 1, needed),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
