"""The plain step against TorchRec's TrainPipelineSparseDist (``train.step_pipeline``), side by side in one run.

    .venv/bin/python benchmarks/step_pipeline.py --steps 30 --rounds 3

The demo experiment (``configs/experiments/demo.yaml``: its feature spec, model, gradient method and batch size) over
2 gloo processes, as the Ray Train workers run it (``build_training``: meta device, planner, DMP, fused embedding
optimizer). Each rank transforms its own batches of generated logs once, before any clock; then every round builds
the model afresh for each stepper and times ``--steps`` steps after ``--warmup`` over those same batches, plain and
sparse_dist alternating, so a change of load on the shared machine falls on both. Reports the median round's
samples/s of each (all ranks' samples over rank 0's wall time, between barriers), the ratio, and the load average
(``uptime``) before and after; writes ``benchmarks/results/step_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from features.batch import Batch
from features.generator import generate_logs
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from pipeline.config import ExperimentConfig, load_config
from pipeline.step_pipeline import make_stepper
from pipeline.train_worker import build_training

REPO = Path(__file__).resolve().parents[1]
KINDS = ("plain", "sparse_dist")


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5, 15 minutes)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def rank_batches(cfg: ExperimentConfig, files: list[Path], rank: int, world: int, count: int) -> list[Batch]:
    """This rank's ``count`` batches: stats from the first day, rows dealt out by rank from the last."""
    spec = cfg.feature_spec()
    first = pa.concat_tables([pq.read_table(f) for f in files if f.parent.name == files[0].parent.name])
    last = pa.concat_tables([pq.read_table(f) for f in files if f.parent.name == files[-1].parent.name])
    transform = BatchTransform(spec, dense_stats_from_moments([compute_dense_moments(first, spec)], spec))
    bs = cfg.train.batch_size
    if last.num_rows < world * count * bs:
        raise RuntimeError(f"{last.num_rows} rows: --impressions too small for {world} x {count} batches of {bs}")
    mine = last.slice(rank * count * bs, count * bs)
    return [transform(mine.slice(i * bs, bs)) for i in range(count)]


def time_side(kind: str, cfg: ExperimentConfig, batches: list[Batch], warmup: int) -> tuple[float, float]:
    """``kind`` over the batches after ``warmup`` steps: samples/s (every rank's samples over rank 0's wall clock) and
    samples per CPU second (over the CPU time of all ranks: on a shared machine the steadier figure)."""
    device = torch.device("cpu")
    spec = cfg.feature_spec()
    parts = build_training(cfg, spec, device, local_world_size=dist.get_world_size())
    parts.model.train()
    stepper = make_stepper(kind, parts, device, [t.name for t in spec.tasks])
    it = iter(batches)
    for _ in range(warmup):
        stepper.step(it)
    dist.barrier()
    started, cpu_started, steps = time.perf_counter(), time.process_time(), 0
    while stepper.step(it) is not None:
        steps += 1
    cpu = torch.tensor([time.process_time() - cpu_started], dtype=torch.float64)
    dist.barrier()
    seconds = time.perf_counter() - started
    dist.all_reduce(cpu)
    stepper.pause()
    samples = steps * cfg.train.batch_size * dist.get_world_size()
    return samples / seconds, samples / float(cpu)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, cfg_json: str, files: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(args.scratch)
    try:
        cfg = ExperimentConfig.model_validate_json(cfg_json)
        batches = rank_batches(cfg, [Path(f) for f in files], rank, world, args.warmup + args.steps)
        rates: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in KINDS}
        for round_ in range(args.rounds):
            for kind in KINDS if round_ % 2 == 0 else reversed(KINDS):  # alternate which side goes first
                wall, cpu = time_side(kind, cfg, batches, args.warmup)
                rates[kind]["wall"].append(wall)
                rates[kind]["cpu"].append(cpu)
                if rank == 0:
                    print(f"round {round_ + 1} {kind}: {wall:,.0f} samples/s, {cpu:,.0f} per CPU second", flush=True)
        if rank == 0:
            (out / "rates.json").write_text(json.dumps(rates))
    except Exception:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--impressions", type=int, default=None, help="impressions per generated day; default: enough for the batches"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--config", type=Path, default=REPO / "configs/experiments/demo.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. gradients.method=equal")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/step_pipeline.json")
    args = parser.parse_args()
    world = 2
    load_before = uptime()
    cfg = load_config(args.config, args.set)  # the experiment as configured; the generator only sizes the logs
    if args.impressions is None:
        args.impressions = int(1.2 * world * (args.warmup + args.steps) * cfg.train.batch_size)
    with tempfile.TemporaryDirectory(prefix="mtrec-bench-step-pipeline-") as tmp:
        logs = generate_logs(
            cfg.generator.model_copy(update={"num_days": 2, "impressions_per_day": args.impressions}),
            Path(tmp) / "logs",
            Path(tmp) / "oracle.parquet",
        )
        args.scratch = tmp
        files = [str(f) for f in logs.files]
        started = time.perf_counter()
        try:
            mp.spawn(worker, args=(world, free_port(), args, cfg.model_dump_json(), files), nprocs=world, join=True)
        except Exception:
            errors = "\n".join(p.read_text() for p in Path(tmp).glob("*.err"))
            raise SystemExit(f"a worker failed:\n{errors}") from None
        rates: dict[str, dict[str, list[float]]] = json.loads((Path(tmp) / "rates.json").read_text())
        seconds = time.perf_counter() - started
    load_after = uptime()
    median = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in rates.items()}
    # Per round: the two sides ran back to back, so their ratio is less exposed to the load drifting between rounds.
    ratios = {
        m: [a / b for a, b in zip(rates["sparse_dist"][m], rates["plain"][m], strict=True)] for m in ("wall", "cpu")
    }
    paired = {m: statistics.median(r) for m, r in ratios.items()}
    # The spread says whether the median ratio is a difference or the machine's noise: a quartile range across 1.0
    # is a tie on this machine.
    quartiles = {m: statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3 for m, r in ratios.items()}
    wins = {m: sum(x > 1 for x in r) for m, r in ratios.items()}
    settings = (
        f"{world} gloo processes x {args.threads} thread(s), {cfg.model.bottom}+{cfg.model.top}, "
        f"gradients {cfg.gradients.method}, batch {cfg.train.batch_size} per rank, {args.steps} timed steps after "
        f"{args.warmup} warm-up, {args.rounds} rounds, CPU"
    )
    print(f"\n{settings}")
    print(f"load before: {load_before}\nload after:  {load_after}\n")
    print(
        "| step pipeline | samples/s (median round) | per CPU second (median) | samples/s, every round |\n"
        "|---|---:|---:|---|"
    )
    for kind in KINDS:
        rounds = ", ".join(f"{r:,.0f}" for r in rates[kind]["wall"])
        print(f"| {kind} | {median[kind]['wall']:,.0f} | {median[kind]['cpu']:,.0f} | {rounds} |")
    print(f"| sparse_dist / plain (median of the rounds' ratios) | {paired['wall']:.3f} | {paired['cpu']:.3f} | |")
    for m, label in (("wall", "samples/s"), ("cpu", "per CPU second")):
        q = quartiles[m]
        print(
            f"\n{label}: the rounds' ratios have quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}; sparse_dist ahead in "
            f"{wins[m]} of {args.rounds} rounds"
        )
    print(f"\n({seconds:.0f} s for both sides)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "settings": {
            "world": world,
            "threads": args.threads,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "impressions": args.impressions,
            "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
            "overrides": args.set,
            "batch_size": cfg.train.batch_size,
            "gradients": cfg.gradients.method,
            "model": f"{cfg.model.bottom}+{cfg.model.top}",
            "device": "cpu",
        },
        "rounds": rates,
        "median": median,
        "ratio_sparse_dist_over_plain": {
            "median": paired,
            "quartiles": quartiles,
            "rounds_sparse_dist_ahead": wins,
            "every_round": ratios,
        },
        "uptime": {"before": load_before, "after": load_after},
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
