"""Shared fixtures. The expensive one, ``pipeline_run``, runs the real pipeline (local Ray with 2 workers, TorchRec
sharding over gloo, a SQLite MLflow store) once per test session on a tiny config, for every test that needs a trained
and registered model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import ExperimentConfig, load_config

REPO = Path(__file__).resolve().parent.parent
SMALL_CONFIG = REPO / "configs" / "experiments" / "small.yaml"


#: DRGrad (paper router, EMA updater, PPNet gate over the id embeddings) through the real pipeline: the shared
#: pipeline run and the resilience runs use it, so the split tower, its mu state and its diagnostics go through Ray
#: Train, DMP, DCP checkpoints, evaluation, MLflow and the pyfunc. Other tests train with the default method.
DRGRAD_SET = [
    "gradients.method=drgrad",
    "gradients.diagnostics_every=5",
    "gradients.drgrad.updater=ema",
    "gradients.drgrad.ema_decay=0.9",
    "gradients.drgrad.personalized_gate=[user_id, item_id, seller_id]",
]


def small_config(run_dir: Path, *overrides: str) -> ExperimentConfig:
    """The small test config writing everything under ``run_dir``."""
    return load_config(
        SMALL_CONFIG,
        [
            f"run_dir={run_dir}",
            f"data.path={run_dir / 'data'}",
            f"data.oracle_path={run_dir / 'oracle.parquet'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole test run (start-up costs several seconds)."""
    import ray

    from pipeline.runtime import ensure_ray

    ensure_ray(small_config(Path("/tmp/unused")))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, ray_local: None):  # type: ignore[no-untyped-def]
    """Generate -> ingest -> train -> evaluate -> register on the small config, once."""
    from pipeline.run import run_pipeline

    run_dir = tmp_path_factory.mktemp("pipeline")
    cfg = small_config(run_dir, *DRGRAD_SET)
    result = run_pipeline(cfg, with_generate=True)
    return cfg, result
