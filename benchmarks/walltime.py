"""The whole Census job, Parquet to registered model version, timed per stage beside torch-rechub's training loop on
the same data, epochs and batch size, in one run.

    .venv/bin/python -m features.census ../shared/data/census_income_kdd runs/census/data   # once
    .venv/bin/pip install --no-deps -r requirements/bench.txt                              # once: torch-rechub
    .venv/bin/python benchmarks/walltime.py --epochs 4

Ours: ``configs/experiments/census.yaml`` with ``train.epochs`` fixed (the validation window is still scored at every
epoch end and picks the kept epoch, but never stops the run early), each stage called as ``mtrec run`` calls it, in a
fresh run folder and a local Ray of its own: Ray start, ingest, train (start-up, loop, epoch ends), evaluate, register
(MLflow on SQLite). Once with ``train.materialize: never`` (every epoch streams the files and redoes the seeded global
shuffle) and once with the default ``auto``. The training loop's figures come from the run itself: samples/s over the
whole loop, the steady state (median log window, each epoch's first excluded) and their ratio.

The peer: torch-rechub's MMOE with the same sizes, trained by its ``MTLTrainer.train_one_epoch`` on its
``DataLoader`` (``benchmarks/peers.py``, Adam 1e-3: its best rate on the validation window), with every core
(``torch.set_num_threads``); its loop time excludes loading the data and its per-epoch evaluation, as the done-when
compares our whole job against its loop alone. Test AUCs are taken at each side's best validation epoch.

Writes ``benchmarks/results/walltime.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "experiments" / "census.yaml"


def run_ours(tag: str, materialize: str, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate
    from pipeline.ingest import ingest
    from pipeline.register import register
    from pipeline.runtime import ensure_ray
    from pipeline.train import train

    run_dir = args.runs / tag
    # A fresh folder: a model already registered in an earlier run's store would skip registration's work.
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        CONFIG,
        [
            f"run_dir={run_dir}",
            f"data.path={args.data}",
            f"train.epochs={args.epochs}",
            f"train.validation.patience={args.epochs + 1}",
            f"train.materialize={materialize}",
            *args.set,
            f"train.seed={args.seed}",
        ],
    )
    import ray

    # Each run starts its own local Ray, as `mtrec run` does: a Ray left running by the run before would hide that.
    if ray.is_initialized():
        ray.shutdown()
    stages: dict[str, float] = {}
    job = time.perf_counter()
    t = time.perf_counter()
    ensure_ray(cfg)
    stages["ray start"] = time.perf_counter() - t
    t = time.perf_counter()
    ingested = ingest(cfg)
    stages["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = train(cfg, ingested, fresh=True)
    stages["train"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluated = evaluate(cfg, ingested, trained)
    stages["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    registered = register(cfg, ingested, trained, evaluated)
    stages["register"] = time.perf_counter() - t
    total = time.perf_counter() - job
    return {
        "materialize": materialize,
        "materialized": trained.materialized,
        "stages_s": {k: round(v, 2) for k, v in stages.items()},
        "job_s": round(total, 2),
        "startup_s": trained.startup,
        "wind_down_s": trained.wind_down,
        "loop_s": round(trained.loop_seconds, 2),
        "loop_samples_per_s": round(trained.samples_per_s),
        "steady_samples_per_s": round(trained.steady_samples_per_s),
        "loop_over_steady": round(trained.samples_per_s / trained.steady_samples_per_s, 3),
        "epochs": trained.epochs,
        "kept_epoch": trained.best_epoch,
        "test_auc": {k: round(v["auc"], 4) for k, v in evaluated.metrics.items() if "auc" in v},
        "model_version": registered.model_uri,
    }


def run_peer(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import peers

    from features.encode import compute_dense_moments, dense_stats_from_moments
    from features.spec import load_feature_spec
    from features.transform import BatchTransform

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    spec = load_feature_spec(peers.SPEC)
    import pyarrow.parquet as pq

    train_table = pq.read_table(args.data / peers.SPLITS["train"])
    stats = dense_stats_from_moments([compute_dense_moments(train_table, spec)], spec)
    transform = BatchTransform(spec, stats)
    data = {name: peers.load_split(args.data / part, transform, spec)[1] for name, part in peers.SPLITS.items()}
    load_s = time.perf_counter() - t
    peer_args = argparse.Namespace(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, max_steps=None)
    model_cfg = peers.our_configs()["mtrec_mmoe"]
    t = time.perf_counter()
    r = peers.run_rechub("rechub_mmoe", model_cfg, spec, data, peer_args, args.seed)
    wall = time.perf_counter() - t
    return {
        "load_and_prepare_s": round(load_s, 2),
        "loop_s": round(r["train_s"], 2),
        "loop_samples_per_s": round(r["samples_per_s"]),
        "wall_with_epoch_evaluation_s": round(wall, 2),
        "best_epoch": r["best_epoch"],
        "test_auc": {k: round(v, 4) for k, v in r["test"].items()},
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1024, help="per step; ours: 2 workers x half")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=REPO / "runs" / "census" / "data")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "walltime")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "walltime.json")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for our runs (repeatable)"
    )
    args = parser.parse_args()
    args.data, args.runs = args.data.resolve(), args.runs.resolve()
    load = [os.getloadavg()[0]]
    ours_streamed = run_ours("streamed", "never", args)
    load.append(os.getloadavg()[0])
    peer = run_peer(args)
    load.append(os.getloadavg()[0])
    ours = run_ours("materialized", "auto", args)
    load.append(os.getloadavg()[0])
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/walltime.py", *sys.argv[1:]]),
        "load_average_between_runs": [round(x, 1) for x in load],
        "cores": os.cpu_count(),
        "ours_default": ours,
        "ours_materialize_never": ours_streamed,
        "rechub_mmoe": peer,
        "job_over_peer_loop": round(ours["job_s"] / peer["loop_s"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    loads = result["load_average_between_runs"]
    print(f"\nCensus, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}, load average {loads}\n")
    stages = list(ours["stages_s"])
    print("| run | " + " | ".join(stages) + " | whole job s | loop samples/s | steady | loop / steady | income AUC |")
    print("|---" * (len(stages) + 6) + "|")
    for name, r in (("mtrec run, materialize never", ours_streamed), ("mtrec run, default (auto)", ours)):
        cells = " | ".join(f"{r['stages_s'][s]:.1f}" for s in stages)
        print(
            f"| {name} | {cells} | {r['job_s']:.1f} | {r['loop_samples_per_s']:,} | {r['steady_samples_per_s']:,} | "
            f"{r['loop_over_steady']:.2f} | {r['test_auc'].get('income', float('nan')):.4f} |"
        )
    print(
        f"\ntorch-rechub MMOE: loop {peer['loop_s']:.1f} s ({peer['loop_samples_per_s']:,} samples/s, "
        f"{peer['threads']} threads), data load {peer['load_and_prepare_s']:.1f} s, income AUC "
        f"{peer['test_auc'].get('income', float('nan')):.4f}"
    )
    print(f"start-up of the default run: {ours['startup_s']}")
    print(f"wind-down of the default run: {ours['wind_down_s']}")
    print(f"our whole job / their loop alone: {result['job_over_peer_loop']:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
