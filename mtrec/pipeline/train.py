"""Train stage: Ray Train ``TorchTrainer`` workers, each wrapping the spec-built model in TorchRec's
``DistributedModelParallel`` (tables sharded by the planner, fused embedding optimizer), fed by Ray Data streaming
shards of the validated training window.

The finished model leaves as a Ray Train checkpoint: rank 0 writes the unsharded weights (gathered from every rank)
as safetensors plus the model description, so evaluation and serving need no process group.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from mtrec.config import ExperimentConfig
from mtrec.features.batch import Batch
from mtrec.features.spec import FeatureSpec
from mtrec.features.stats import DenseStats
from mtrec.features.transform import BatchTransform
from mtrec.models.io import MODEL_FILE, WEIGHTS_FILE
from mtrec.pipeline.ingest import IngestResult


@dataclass(frozen=True)
class TrainResult:
    model_dir: str
    steps: int
    samples: int
    loop_seconds: float
    samples_per_s: float
    final_losses: dict[str, float]
    plan: dict[str, Any]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> TrainResult:
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the train stage first")
        return cls(**json.loads(path.read_text()))


def _arrow_collate(spec: FeatureSpec, stats: DenseStats) -> Any:
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):
        """Runs in Ray Data's prefetch threads, so the Arrow -> KJT work overlaps the training step."""

        def __init__(self) -> None:
            self.transform = BatchTransform(spec, stats)

        def __call__(self, batch: pa.Table) -> Batch:  # type: ignore[override]
            return self.transform(batch)

    return _Collate()


def _all_have_batch(have: bool, device: torch.device) -> bool:
    """Every rank must run the same number of steps (the sharded lookups are collectives): stop when any rank is out."""
    flag = torch.tensor([1 if have else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _worker_loop(config: dict[str, Any]) -> None:
    import tempfile

    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    from mtrec.models.multitask import MultiTaskLoss, build_model
    from mtrec.models.sharding import (
        dense_optimizer,
        describe_plan,
        embedding_sharders,
        gather_state_dict,
        shard_model,
    )

    cfg = ExperimentConfig.model_validate(config["experiment"])
    spec = FeatureSpec.model_validate(config["spec"])
    stats = DenseStats(**config["stats"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)

    model = build_model(spec, cfg.model, device=torch.device("meta"))
    sharders = embedding_sharders(cfg.train.embedding_optimizer, cfg.train.embedding_lr)
    dmp, plan = shard_model(model, device, sharders, local_world_size=ctx.get_local_world_size())
    optimizer = dense_optimizer(dmp, cfg.train.dense_lr)
    loss_fn = MultiTaskLoss(spec)
    plan_summary = describe_plan(plan)
    if rank == 0:
        print(f"[train] sharding plan: {json.dumps(plan_summary)}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    collate = _arrow_collate(spec, stats)
    shuffle = cfg.train.local_shuffle_buffer if cfg.train.shuffle == "local" else None
    curve: list[dict[str, float]] = []
    step, samples = 0, 0
    window: dict[str, float] = {}
    window_steps = 0
    started = time.perf_counter()
    last_log = started
    dmp.train()
    for epoch in range(cfg.train.epochs):
        batches = iter(
            shard.iter_torch_batches(
                batch_size=cfg.train.batch_size,
                collate_fn=collate,
                drop_last=True,
                local_shuffle_buffer_size=max(shuffle, cfg.train.batch_size) if shuffle else None,
                local_shuffle_seed=cfg.train.seed + 1000 * epoch + rank if shuffle else None,
                prefetch_batches=2,
            )
        )
        while True:
            batch = next(batches, None)
            if not _all_have_batch(batch is not None, device):
                break
            assert batch is not None
            batch = batch.to(device)
            outputs = dmp(batch)
            total, losses = loss_fn(outputs, batch.labels)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            step += 1
            samples += batch.batch_size
            window_steps += 1
            for k, v in {"total": total, **losses}.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            if step % cfg.train.log_every == 0:
                mean = torch.tensor([window[k] / window_steps for k in sorted(window)], device=device)
                dist.all_reduce(mean)
                point = {k: float(v) / world for k, v in zip(sorted(window), mean.tolist(), strict=True)}
                now = time.perf_counter()
                rate = cfg.train.log_every * cfg.train.batch_size * world / (now - last_log)
                last_log = now
                curve.append({"step": step, "epoch": epoch, **point})
                if rank == 0:
                    losses_txt = " ".join(f"{k}={v:.4f}" for k, v in point.items())
                    print(f"[train] epoch {epoch} step {step} {losses_txt} {rate:,.0f} samples/s", flush=True)
                window, window_steps = {}, 0
            if cfg.train.max_steps and step >= cfg.train.max_steps:
                break
        if cfg.train.max_steps and step >= cfg.train.max_steps:
            break
    loop_seconds = time.perf_counter() - started
    global_samples = samples * world

    weights = gather_state_dict(dmp)
    metrics = {
        "steps": step,
        "samples": global_samples,
        "loop_seconds": loop_seconds,
        "samples_per_s": global_samples / max(loop_seconds, 1e-9),
        **{f"loss_{k}": v for k, v in (curve[-1].items() if curve else []) if k not in ("step", "epoch")},
    }
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_file(weights, str(Path(tmp) / WEIGHTS_FILE))
            description = {"spec": config["spec"], "model": config["experiment"]["model"], "stats": config["stats"]}
            (Path(tmp) / MODEL_FILE).write_text(json.dumps(description, indent=2))
            (Path(tmp) / "plan.json").write_text(json.dumps(plan_summary, indent=2))
            (Path(tmp) / "training_curve.json").write_text(json.dumps(curve))
            (Path(tmp) / "summary.json").write_text(json.dumps(metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train(cfg: ExperimentConfig, ingested: IngestResult) -> TrainResult:
    """Train on the ingested training window; returns where the unsharded model was written."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtrec.pipeline.runtime import ensure_ray

    ensure_ray(cfg)
    spec = cfg.feature_spec()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # reproducible batch order
    dataset = ray.data.read_parquet(ingested.train_files)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "spec": spec.model_dump(mode="json"),
            "stats": asdict(ingested.stats),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-train", storage_path=str((cfg.run_dir / "ray_results").resolve())
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint from rank 0")
    model_dir = (cfg.run_dir / "model").resolve()
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    result.checkpoint.to_directory(str(model_dir))
    # The summary travels inside the checkpoint: Result.metrics is not kept by every Ray Train version.
    metrics = json.loads((model_dir / "summary.json").read_text())
    curve = json.loads((model_dir / "training_curve.json").read_text())
    out = TrainResult(
        model_dir=str(model_dir),
        steps=int(metrics.get("steps", 0)),
        samples=int(metrics.get("samples", 0)),
        loop_seconds=float(metrics.get("loop_seconds", 0.0)),
        samples_per_s=float(metrics.get("samples_per_s", 0.0)),
        final_losses={k: v for k, v in (curve[-1] if curve else {}).items() if k not in ("step", "epoch")},
        plan=json.loads((model_dir / "plan.json").read_text()),
    )
    out.save(cfg.run_dir.resolve() / "train.json")
    return out
