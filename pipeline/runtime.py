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
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
