"""``train.step_pipeline: sparse_dist`` (TorchRec's TrainPipelineSparseDist with the gradient method as its backward)
against the plain step, under DistributedModelParallel with 2 gloo processes, each fed different batches.

Both steppers train the same model (built by ``build_training``, same seed) on the same batches over two epochs,
with a validation-style forward between them (the pipeline must hand the model back with its ordinary forward); the
step counts, the losses of every step, the probe's outputs and every parameter (sharded tables gathered) must agree to
float tolerance. The pipeline holds two batches ahead of the one it trains, so a batch it skipped or trained twice at
an epoch's end changes the step count and the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from features.batch import Batch
from features.generator import GeneratorConfig, generate_logs
from features.spec import FeatureSpec, parse_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.sharding import gather_state_dict
from pipeline.config import ConfigError, ExperimentConfig, parse_config
from pipeline.ingest import IngestResult, ingest
from pipeline.run import generate
from pipeline.step_pipeline import make_stepper
from pipeline.train import train
from pipeline.train_worker import build_training
from tests.conftest import small_config
from tests.ray_nodes import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 64
EPOCHS = [3, 2]  # batches per epoch: an odd and an even count, so the pipeline's drain is seen holding 1 and 2
# name -> (gradients section, train precision)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "equal": ({"method": "equal"}, "fp32"),
    "equal_bf16": ({"method": "equal"}, "bf16"),  # the forward under autocast, as train_step runs it
    "pcgrad": ({"method": "pcgrad", "diagnostics_every": 2}, "fp32"),
    "uncertainty": ({"method": "uncertainty"}, "fp32"),
    "drgrad": (
        {
            "method": "drgrad",
            "diagnostics_every": 2,
            "drgrad": {"updater": "ema", "per_sample": True, "aux_input": "shared", "personalized_gate": ["user_id"]},
        },
        "fp32",
    ),
}
MODEL = {"bottom_mlp": [32, 16], "tower_mlp": [8]}


def _spec() -> FeatureSpec:
    data = yaml.safe_load((REPO / "configs/features/behaviour_logs.yaml").read_text())
    for t in data["tables"]:
        t["num_buckets"] = min(t["num_buckets"], 500)
    return parse_feature_spec(data)


def _config(method: dict[str, Any], precision: str) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "features": str(REPO / "configs/features/behaviour_logs.yaml"),
            "model": MODEL,
            "gradients": method,
            "train": {"batch_size": BATCH, "seed": 0, "dense_lr": 0.01, "precision": precision},
        }
    )


def _train(kind: str, cfg: ExperimentConfig, spec: FeatureSpec, epochs: list[list[Batch]], probe: Batch) -> Any:
    """Train through ``kind``'s stepper as the worker loop does; returns (state on rank 0, per-step totals,
    probe outputs after each epoch, diagnostics, how many sharded modules the pipeline fed)."""
    device = torch.device("cpu")
    parts = build_training(cfg, spec, device, local_world_size=WORLD)
    parts.model.train()
    stepper = make_stepper(kind, parts, device, [t.name for t in spec.tasks])
    totals: list[list[float]] = []
    probes: list[dict[str, torch.Tensor]] = []
    diagnostics: list[dict[str, float]] = []
    pipelined = 0
    for batches in epochs:
        it, seen = iter(batches), []
        while (result := stepper.step(it)) is not None:
            total, _, diag = result
            seen.append(float(total))
            diagnostics.append(diag)
        totals.append(seen)
        pipelined = max(pipelined, getattr(stepper, "pipelined_modules", 0))
        stepper.pause()
        parts.model.eval()
        with torch.no_grad():
            probes.append({k: v.clone() for k, v in parts.model(probe).items()})
        parts.model.train()
    return gather_state_dict(parts.model), totals, probes, diagnostics, pipelined


def _compare(rank: int, spec: FeatureSpec, table: pa.Table) -> dict[str, Any]:
    stats = dense_stats_from_moments([compute_dense_moments(table, spec)], spec)
    transform = BatchTransform(spec, stats)
    per_rank = sum(EPOCHS) * BATCH
    mine = table.slice(rank * per_rank, per_rank)
    batches = [transform(mine.slice(i * BATCH, BATCH)) for i in range(sum(EPOCHS))]
    epochs = [batches[: EPOCHS[0]], batches[EPOCHS[0] :]]
    probe = transform(table.slice(WORLD * per_rank, BATCH))
    out: dict[str, Any] = {}
    for name, (method, precision) in METHODS.items():
        cfg = _config(method, precision)
        plain = _train("plain", cfg, spec, epochs, probe)
        piped = _train("sparse_dist", cfg, spec, epochs, probe)
        record: dict[str, Any] = {
            "steps": [[len(e) for e in plain[1]], [len(e) for e in piped[1]]],
            # Steps compared in order, as far as both went (a different count fails on "steps").
            "loss_diff": max(abs(a - b) for a, b in zip(chain(*plain[1]), chain(*piped[1]), strict=False)),
            "probe_diff": max(
                float((a[k] - b[k]).abs().max()) for a, b in zip(plain[2], piped[2], strict=True) for k in a
            ),
            "diagnostics": [sorted(k for d in plain[3] for k in d), sorted(k for d in piped[3] for k in d)],
            "pipelined_modules": piped[4],
        }
        if rank == 0:
            assert plain[0].keys() == piped[0].keys()
            record["param_diff"] = {k: float((plain[0][k] - piped[0][k]).abs().max()) for k in plain[0]}
        out[name] = record
    return out


def _worker(rank: int, port: int, data_path: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict[str, Any] = {}
    try:
        results = _compare(rank, _spec(), pq.read_table(data_path))
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def test_sparse_dist_pipeline_trains_as_the_plain_step(tmp_path: Path) -> None:
    gen = GeneratorConfig(seed=4, num_days=2, impressions_per_day=1500, num_users=60, num_items=400, conflict=1.0)
    result = generate_logs(gen, tmp_path / "logs", tmp_path / "oracle.parquet")
    rows = (WORLD * sum(EPOCHS) + 1) * BATCH
    data_path = tmp_path / "rows.parquet"
    pq.write_table(pa.concat_tables([pq.read_table(f) for f in result.files]).slice(0, rows), data_path)
    try:
        mp.spawn(_worker, args=(free_port(), str(data_path), str(tmp_path)), nprocs=WORLD, join=True)
    finally:
        reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for report in reports:
        assert "error" not in report, report.get("error")
    for name in METHODS:
        for rank, report in enumerate(reports):
            r = report[name]
            assert r["steps"] == [EPOCHS, EPOCHS], f"{name} rank {rank}: steps per epoch plain/pipelined {r['steps']}"
            assert r["loss_diff"] < 1e-5, f"{name} rank {rank}: per-step losses differ by {r['loss_diff']}"
            assert r["probe_diff"] < 1e-4, f"{name} rank {rank}: outputs after an epoch differ by {r['probe_diff']}"
            assert r["diagnostics"][0] == r["diagnostics"][1], f"{name}: diagnostics differ"
            # The EBC and the EC of the sparse arch: fed by the pipeline, not by the model's forward.
            assert r["pipelined_modules"] == 2, f"{name}: {r['pipelined_modules']} sharded modules pipelined"
        diffs = reports[0][name]["param_diff"]
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] < 1e-4, f"{name}: {worst} differs by {diffs[worst]} between plain and pipelined"
    assert any(reports[0]["pcgrad"]["diagnostics"][0]), "PCGrad reported no diagnostics: its backward did not run"


def test_unknown_step_pipeline_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train\.step_pipeline"):
        parse_config({"features": str(REPO / "configs/features/behaviour_logs.yaml"), "train": {"step_pipeline": "x"}})


def test_worker_loop_with_validation_trains_as_the_plain_loop(tmp_path: Path, ray_local: None) -> None:
    """Through Ray Train's worker loop with a validation window: each epoch ends with the pipeline drained and the
    model scored with its own forward; steps, the validation curve and the kept weights match the plain loop's."""
    settings = [
        "generator.impressions_per_day=6000",
        "generator.num_days=3",
        "data.validation_days=1",
        "train.batch_size=256",
        "train.epochs=2",
        "train.shuffle=none",
        "train.log_every=5",
    ]
    plain_cfg = small_config(tmp_path / "plain", *settings)
    generate(plain_cfg)
    plain = train(plain_cfg, ingest(plain_cfg))
    piped_dir = tmp_path / "piped"
    piped_dir.mkdir()
    shutil.copy(plain_cfg.run_dir / "ingest.json", piped_dir / "ingest.json")
    piped_cfg = small_config(piped_dir, *settings, "train.step_pipeline=sparse_dist")
    piped = train(piped_cfg, IngestResult.load(piped_dir / "ingest.json"))
    assert piped.epochs == plain.epochs == 2 and piped.steps == plain.steps and piped.samples == plain.samples
    assert [v["epoch"] for v in piped.validation] == [v["epoch"] for v in plain.validation] and piped.validation
    for a, b in zip(plain.validation, piped.validation, strict=True):
        assert a["step"] == b["step"]
        assert abs(a["value"] - b["value"]) < 1e-4, f"epoch {a['epoch']}: validation {a['value']} vs {b['value']}"
    assert piped.best_epoch == plain.best_epoch
    a, b = (load_file(str(Path(r.model_dir) / "weights.safetensors")) for r in (plain, piped))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
