"""All stages in order, each a plain function over the previous stages' typed outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.generator import GenerationResult, generate_logs
from pipeline.config import ExperimentConfig
from pipeline.evaluate import EvalResult, evaluate
from pipeline.ingest import IngestResult, ingest
from pipeline.register import RegisterResult, register
from pipeline.resources import check_cluster
from pipeline.train import TrainResult, train


@dataclass(frozen=True)
class PipelineResult:
    ingested: IngestResult
    trained: TrainResult
    evaluated: EvalResult
    registered: RegisterResult
    generated: GenerationResult | None = None


def generate(cfg: ExperimentConfig) -> GenerationResult:
    oracle = cfg.data.oracle_path or (cfg.run_dir / "oracle.parquet")
    return generate_logs(cfg.generator, Path(cfg.data.path), Path(oracle))


def run_pipeline(cfg: ExperimentConfig, with_generate: bool = False) -> PipelineResult:
    check_cluster(cfg)  # a cluster too small for training fails now, not after generation and ingest
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    generated = generate(cfg) if with_generate else None
    ingested = ingest(cfg)
    trained = train(cfg, ingested)
    evaluated = evaluate(cfg, ingested, trained)
    registered = register(cfg, ingested, trained, evaluated)
    return PipelineResult(ingested, trained, evaluated, registered, generated)
