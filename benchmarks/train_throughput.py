"""Training throughput: the real pipeline (Ray Data streaming -> Arrow->KJT collate -> DMP step) beside the same
sharded model stepping over batches already in memory, in one run, same config, same workers, same data.

    .venv/bin/python benchmarks/train_throughput.py --rows-per-day 100000 --days 3

Both sides run inside Ray Train workers with DistributedModelParallel over gloo; the "model only" side reads its share
of the files into memory and converts them to batches before the clock starts. The ratio e2e / model-only says how
much the data path costs (1.0 = free). Steady-state rates exclude the first ``--warmup`` steps of each side
(planner, first dataset execution).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.spec import FeatureSpec
from features.stats import DenseStats
from features.transform import BatchTransform
from pipeline.config import ExperimentConfig, load_config
from pipeline.ingest import IngestResult, ingest
from pipeline.run import generate
from pipeline.train_worker import arrow_collate, build_training, train_step

REPO = Path(__file__).resolve().parent.parent


def _loop(config: dict[str, Any]) -> None:
    """Times steps in one worker; ``mode`` is 'e2e' (streaming shard) or 'model' (in-memory batches)."""
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.model_validate(config["experiment"])
    spec = FeatureSpec.model_validate(config["spec"])
    stats = DenseStats(**config["stats"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    parts = build_training(cfg, spec, device, ctx.get_local_world_size())
    bs = cfg.train.batch_size
    if config["mode"] == "model":
        transform = BatchTransform(spec, stats)
        files = config["files"][rank::world]
        table = pa.concat_tables([pq.read_table(f) for f in files])
        batches = [transform(table.slice(i, bs)) for i in range(0, table.num_rows - bs + 1, bs)]
        # Files are dealt out unevenly: agree on the step count once, before the clock (the stream side needs no
        # agreement: Ray Train's equal split gives every rank the same number of batches).
        count = torch.tensor([len(batches)], device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        source = iter(batches[: int(count.item())])
    else:
        shard = ray.train.get_dataset_shard("train")
        source = iter(
            shard.iter_torch_batches(
                batch_size=bs,
                collate_fn=arrow_collate(spec, stats, pin_memory=device.type == "cuda"),
                drop_last=True,
                prefetch_batches=2,
                local_shuffle_buffer_size=max(cfg.train.local_shuffle_buffer, bs)
                if cfg.train.shuffle == "local"
                else None,
                local_shuffle_seed=cfg.train.seed if cfg.train.shuffle == "local" else None,
            )
        )
    steps, timed_steps, started = 0, 0, 0.0
    while True:
        batch = next(source, None)
        if batch is None:
            break
        train_step(parts, batch.to(device, non_blocking=True))
        steps += 1
        if steps == config["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        elif steps > config["warmup"]:
            timed_steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    import resource

    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux
    peaks = torch.tensor([peak_rss_gb], device=device)
    torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    metrics = {
        "steps": steps,
        "samples_per_s": timed_steps * bs * world / max(seconds, 1e-9),
        "peak_rss_gb": float(peaks.item()),
    }
    # Result.metrics is only kept with a checkpoint in Ray Train 2.60: rank 0 carries the figures in one.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def run_side(cfg: ExperimentConfig, files: list[str], stats: DenseStats, mode: str, warmup: int) -> dict[str, Any]:
    """One side of the comparison in its own TorchTrainer run; returns steps, samples/s and peak RSS per worker."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _loop,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "spec": cfg.feature_spec().model_dump(mode="json"),
            "stats": stats.__dict__,
            "mode": mode,
            "files": files,
            "warmup": warmup,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"bench-{mode}-{cfg.train.num_workers}", storage_path=str((cfg.run_dir / "ray_results").resolve())
        ),
        datasets={"train": ray.data.read_parquet(files)} if mode == "e2e" else None,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    assert result.checkpoint is not None, "rank 0 reported no checkpoint"
    with result.checkpoint.as_directory() as folder:
        return dict(json.loads((Path(folder) / "metrics.json").read_text()))


def prepare(run_dir: Path, config: Path, overrides: list[str]) -> tuple[ExperimentConfig, IngestResult]:
    """Generate and ingest the benchmark's logs under ``run_dir``."""
    cfg = load_config(
        config,
        [
            f"run_dir={run_dir}",
            f"data.path={run_dir / 'logs'}",
            f"data.oracle_path={run_dir / 'oracle.parquet'}",
            *overrides,
        ],
    )
    generate(cfg)
    return cfg, ingest(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-per-day", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL (train.use_gpu)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="train.precision")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg, ingested = prepare(
            Path(tmp),
            REPO / "configs" / "experiments" / "demo.yaml",
            [
                f"generator.num_days={args.days + 1}",
                f"generator.impressions_per_day={args.rows_per_day}",
                f"train.batch_size={args.batch_size}",
                f"train.num_workers={args.workers}",
                f"train.use_gpu={str(args.use_gpu).lower()}",
                f"train.precision={args.precision}",
            ],
        )
        files = ingested.train_files
        no_shuffle = cfg.model_copy(update={"train": cfg.train.model_copy(update={"shuffle": "none"})})
        shuffled = cfg.model_copy(update={"train": cfg.train.model_copy(update={"shuffle": "local"})})
        e2e = run_side(no_shuffle, files, ingested.stats, "e2e", args.warmup)
        e2e_shuffled = run_side(shuffled, files, ingested.stats, "e2e", args.warmup)
        model = run_side(cfg, files, ingested.stats, "model", args.warmup)

    ratio = e2e["samples_per_s"] / model["samples_per_s"]
    print(
        f"\n{args.workers} workers ({'nccl, GPU' if args.use_gpu else 'gloo, CPU'}, {args.precision}), "
        f"batch {args.batch_size}, "
        f"{args.days * args.rows_per_day:,} training rows\n"
    )
    print("| path | steps | samples/s |\n|---|---:|---:|")
    print(
        f"| end to end, no shuffle (Ray Data stream -> collate -> DMP) | {e2e['steps']} | {e2e['samples_per_s']:,.0f} |"
    )
    print(
        f"| end to end, local shuffle buffer {cfg.train.local_shuffle_buffer:,} rows | {e2e_shuffled['steps']} "
        f"| {e2e_shuffled['samples_per_s']:,.0f} |"
    )
    print(f"| model only (in-memory batches -> DMP) | {model['steps']} | {model['samples_per_s']:,.0f} |")
    print(
        f"\ne2e / model-only = {ratio:.2f} (no shuffle), "
        f"{e2e_shuffled['samples_per_s'] / model['samples_per_s']:.2f} (local shuffle)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"e2e": e2e, "e2e_local_shuffle": e2e_shuffled, "model_only": model, "ratio": ratio}, indent=2)
        )


if __name__ == "__main__":
    main()
