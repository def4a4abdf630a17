"""Gradient methods on the pipeline's own generated logs with the conflict knob on: click is
the primary task, conversion (ESMM) and dwell the auxiliary ones; per-task AUC / RMSE beside the oracle.

    .venv/bin/python benchmarks/gradients_logs.py --seeds 0 1 2 3 4

Data per seed as in ``benchmarks/models_quality.py`` (generator seed = run seed): 4 days x 50,000 impressions, 2,000
users, 10,000 items, ``conflict: 1.0`` (a quarter of the items are click-bait: clicks up, conversion and dwell down,
so click and the other tasks pull the shared layers apart). Train on days 1-3 with ``train_local`` (the pipeline's
model, losses and gradient methods), 1 epoch, batch 512, Adam 3e-3 / Adagrad 0.05; evaluate on day 4 with the
pipeline's ``task_metrics``, the oracle on the same rows. Model: ``configs/experiments/mmoe.yaml``'s ``model:``
section for every method. DRGrad's personalized gate reads the user, item and seller embeddings (the paper's ids).

Paired design: every method of a seed sees the same data, the same batch order and the same seed for the shared
layers' draw; ``_paired`` holds each method minus ``equal`` (equal weights, same model): mean, standard error, and
how often the method was better (higher AUC, lower RMSE).
Per-run records are appended to ``--runs`` (JSON lines; runs already there are skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from features.generator import GeneratorConfig, generate_logs
from features.spec import FeatureSpec, TaskKind, load_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.gradients import GradientConfig
from pipeline.evaluate import score_files
from pipeline.local import train_local
from pipeline.metrics import task_metrics

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs/features/behaviour_logs.yaml"
ORACLE_COLUMNS = {"ctr": "p_click", "cvr": "p_conversion", "ctr_cvr": "p_ctcvr", "dwell": "dwell_log_mean"}
GATE = {"personalized_gate": ["user_id", "item_id", "seller_id"]}
EMA = {"updater": "ema", "ema_decay": 0.99}
METHODS: dict[str, dict[str, Any]] = {
    "equal": {"method": "equal"},
    "uncertainty": {"method": "uncertainty"},
    "pcgrad": {"method": "pcgrad"},
    # DRGrad's split primary tower with no routing and no updater (Split-MMoE under an MMoE top)
    "split_tower": {"method": "drgrad", "drgrad": {"router": False, "updater": "none"}},
    "drgrad_paper": {"method": "drgrad", "drgrad": {"updater": "sum", **GATE}},
    "drgrad_code": {"method": "drgrad", "drgrad": {"mode": "code", "split": False}},
    "drgrad_ema": {"method": "drgrad", "drgrad": {**EMA, **GATE}},
    "drgrad_ema_no_gate": {"method": "drgrad", "drgrad": EMA},
    "drgrad_tied": {"method": "drgrad", "drgrad": {**EMA, **GATE, "tied_init": True}},
    # control for the per-sample rows: the same model (every auxiliary tower reads v_s), no routing
    "split_tower_shared": {"method": "drgrad", "drgrad": {"router": False, "updater": "none", "aux_input": "shared"}},
    "per_sample_pcgrad": {
        "method": "drgrad",
        "drgrad": {"router": False, "updater": "none", "per_sample": True, "aux_input": "shared"},
    },
    "per_sample_project_aux": {
        "method": "drgrad",
        "drgrad": {
            "router": False,
            "updater": "none",
            "per_sample": True,
            "per_sample_rule": "project_aux",
            "aux_input": "shared",
        },
    },
}


def metric_of(spec: FeatureSpec, name: str) -> str:
    task = next((t for t in spec.tasks if t.name == name), None)
    return "rmse" if task is not None and task.kind == TaskKind.regression else "auc"


def run_seed(
    seed: int, methods: list[str], args: argparse.Namespace, spec: FeatureSpec, work: Path
) -> list[dict[str, Any]]:
    gen = GeneratorConfig(
        seed=seed,
        num_days=args.days,
        impressions_per_day=args.impressions,
        num_users=args.users,
        num_items=args.items,
        conflict=args.conflict,
    )
    result = generate_logs(gen, work / "logs", work / "oracle.parquet")
    eval_dir = f"dt={result.dates[-1]}"
    train = pa.concat_tables([pq.read_table(f) for f in result.files if f.parent.name != eval_dir])
    eval_files = [str(f) for f in result.files if f.parent.name == eval_dir]
    stats = dense_stats_from_moments([compute_dense_moments(train, spec)], spec)
    transform = BatchTransform(spec, stats)
    oracle_frame = pl.read_parquet(result.oracle_path).rename({c: f"oracle:{n}" for n, c in ORACLE_COLUMNS.items()})
    model_cfg = ModelConfig.model_validate(yaml.safe_load((REPO / args.model_config).read_text())["model"])
    records = []
    oracle: dict[str, float] | None = None
    for m in methods:
        gradients = GradientConfig.model_validate({**METHODS[m], "diagnostics_every": 50})
        sampled: dict[str, list[float]] = {}

        def on_step(step: int, values: dict[str, float], sampled: dict[str, list[float]] = sampled) -> None:
            for k, v in values.items():
                if "/" in k:
                    sampled.setdefault(k, []).append(v)

        t0 = time.perf_counter()
        model = train_local(
            spec,
            model_cfg,
            stats,
            train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            dense_lr=args.dense_lr,
            embedding_lr=args.embedding_lr,
            seed=seed,
            gradients=gradients,
            on_step=on_step,
        )
        train_s = time.perf_counter() - t0
        frame = score_files(eval_files, model, transform, spec, 8192)
        metrics = task_metrics(spec, frame, {c[5:]: c for c in frame.columns if c.startswith("pred:")}, False)
        if oracle is None:
            joined = frame.join(oracle_frame, on=spec.keys.request_id, how="left")
            oracle = {
                n: v[metric_of(spec, n)]
                for n, v in task_metrics(spec, joined, {n: f"oracle:{n}" for n in ORACLE_COLUMNS}, False).items()
            }
        rec = {
            "seed": seed,
            "method": m,
            "metrics": {n: v[metric_of(spec, n)] for n, v in metrics.items()},
            "oracle": oracle,
            "train_s": train_s,
            "diag": {k: float(np.mean(v)) for k, v in sampled.items()},
            "settings": settings_of(args),
        }
        records.append(rec)
        print(f"[seed {seed}] {m:<20} {json.dumps(rec['metrics'])} {train_s:.0f}s", flush=True)
        with (args.runs or args.out.with_suffix(".runs.jsonl")).open("a") as f:
            f.write(json.dumps(rec) + "\n")
    return records


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("days", "impressions", "users", "items", "conflict", "epochs", "batch_size", "dense_lr", "embedding_lr")
    return {k: getattr(args, k) for k in keys} | {"model_config": str(args.model_config)}


def summarise(records: list[dict[str, Any]], spec: FeatureSpec) -> dict[str, Any]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    tasks = list(records[0]["oracle"])
    out: dict[str, Any] = {}
    for m in [m for m in METHODS if m in by_method]:
        out[m] = {}
        for t in tasks:
            values = [r["metrics"][t] for r in by_method[m]]
            metric = metric_of(spec, t)
            out[m][t] = {
                f"{metric}_mean": statistics.fmean(values),
                f"{metric}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n_seeds": len(values),
            }
    seeds = {r["seed"]: r["oracle"] for r in records}
    out["oracle"] = {t: statistics.fmean(o[t] for o in seeds.values()) for t in tasks}
    paired: dict[str, Any] = {}
    base = {r["seed"]: r for r in by_method.get("equal", [])}
    for m, runs in by_method.items():
        if m == "equal" or not base:
            continue
        paired[f"{m}-equal"] = {}
        for t in tasks:
            diff = np.array([r["metrics"][t] - base[r["seed"]]["metrics"][t] for r in runs if r["seed"] in base])
            if diff.size == 0:
                continue
            better = diff < 0 if metric_of(spec, t) == "rmse" else diff > 0
            se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
            paired[f"{m}-equal"][t] = {
                "mean_diff": float(diff.mean()),
                "se": se,
                "better": int(better.sum()),
                "n": int(diff.size),
            }
    out["_paired"] = paired
    out["_diagnostics"] = {
        m: {k: statistics.fmean(r["diag"][k] for r in runs if k in r["diag"]) for k in runs[0]["diag"]}
        for m, runs in by_method.items()
        if runs[0]["diag"]
    }
    out["_train_s_mean"] = {m: statistics.fmean(r["train_s"] for r in runs) for m, runs in by_method.items()}
    return out


def markdown(summary: dict[str, Any], spec: FeatureSpec) -> str:
    """Mean ± std per task, then each method minus equal weights on the same seeds (mean ± standard error, and on
    how many seeds the method was better): rows with fewer seeds are only comparable through the paired columns."""
    tasks = list(summary["oracle"])
    lines = [
        "| method | n | "
        + " | ".join(f"{t} {metric_of(spec, t).upper()}" for t in tasks)
        + " | "
        + " | ".join(f"Δ{t} vs equal" for t in tasks)
        + " |",
        "|---" * (2 * len(tasks) + 2) + "|",
    ]
    for m in METHODS:
        if m not in summary:
            continue
        cells, diffs = [], []
        for t in tasks:
            k = metric_of(spec, t)
            cells.append(f"{summary[m][t][f'{k}_mean']:.4f} ± {summary[m][t][f'{k}_std']:.4f}")
            d = summary["_paired"].get(f"{m}-equal", {}).get(t)
            diffs.append(f"{d['mean_diff']:+.4f} ± {d['se']:.4f} ({d['better']}/{d['n']})" if d else "")
        n = summary[m][tasks[0]]["n_seeds"]
        lines.append(f"| {m} | {n} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    lines.append("| oracle | | " + " | ".join(f"{summary['oracle'][t]:.4f}" for t in tasks) + " |" + " |" * len(tasks))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--impressions", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--conflict", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--dense-lr", type=float, default=3e-3)
    parser.add_argument("--embedding-lr", type=float, default=0.05)
    parser.add_argument("--model-config", type=Path, default=Path("configs/experiments/mmoe.yaml"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gradients_logs.json")
    parser.add_argument("--runs", type=Path, default=None, help="per-run JSON lines (default: OUT .runs.jsonl)")
    parser.add_argument("--report", action="store_true", help="only rebuild OUT from the runs file and print tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = load_feature_spec(SPEC)
    runs_path = args.runs or args.out.with_suffix(".runs.jsonl")
    existing = [json.loads(x) for x in runs_path.read_text().splitlines() if x.strip()] if runs_path.exists() else []
    records = [r for r in existing if r["settings"] == settings_of(args)]
    done = {(r["seed"], r["method"]) for r in records}
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    for seed in [] if args.report else args.seeds:
        todo = [m for m in args.methods if (seed, m) not in done]
        if todo:
            with tempfile.TemporaryDirectory() as tmp:
                records += run_seed(seed, todo, args, spec, Path(tmp))
    summary = summarise(records, spec)
    summary["_meta"] = {
        "command": "python benchmarks/gradients_logs.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs_file": str(runs_path.relative_to(REPO) if runs_path.is_relative_to(REPO) else runs_path),
        "settings": settings_of(args),
        "wall_seconds_this_invocation": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(markdown(summary, spec))
    print(f"wrote {args.out} ({len(records)} runs) in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
