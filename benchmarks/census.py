"""UCI Census-Income (KDD) through the pipeline's models and gradient methods: baselines, DRGrad modes and variants,
AUC per task over seeds with paired differences (DRGrad paper protocol on Census).

    .venv/bin/python -m features.census ../shared/data/census_income_kdd runs/census/data   # once
    .venv/bin/python benchmarks/census.py --seeds 0 1 2 3 4

Data: the converter's partitions (MMoE protocol): train = census-income.data (199,523 rows), census-income.test split
1:1 by a fixed seed into validation and test (49,881 each). Tasks: income > 50K (``income``, the primary task of
DRGrad's split tower) and never married. Model: ``configs/experiments/census.yaml``'s ``model:`` section (plain bottom
over the 32 categorical embeddings and 7 dense features; MMoE 8 experts [64]; towers [32]), with the top switched for
shared-bottom and PLE; the gradients section per method as below. Training: ``pipeline.local.train_local``
(the pipeline's model, losses, output-bias priors and gradient methods, one process), Adam ``--lr`` on dense layers,
Adagrad on the tables, batch ``--batch-size``, ``--epochs`` epochs.

Selection on validation only: every epoch is scored on validation and test; a run reports its test AUC at the epoch
with the best validation AUC of the primary task (income). The "best DRGrad variant" is the variant with the best
mean validation income AUC over the seeds (``_selection`` in the JSON), then reported on test like the others. Test
AUC never chooses anything.

Paired design: for one seed every method starts from the same seed (same draw order for the shared layers) and sees
the same batch order. ``_paired`` holds each method minus the best baseline (by mean validation income AUC) on the same
seeds: mean, standard error and wins.

Per-run records go to ``--runs`` (JSON lines, appended as they finish; runs already there are skipped, so the command
resumes and seeds can be added later); ``--out`` is rebuilt from all records.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from sklearn.metrics import roc_auc_score

from features.spec import FeatureSpec, load_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.gradients import GradientConfig
from models.multitask import MultiTaskModel
from pipeline.local import train_local

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs/features/census.yaml"
EXPERIMENT = REPO / "configs/experiments/census.yaml"
PARTITIONS = {"train": "dt=1994-01-01", "validation": "dt=1994-01-02", "test": "dt=1994-01-03"}
TASKS = ["income", "never_married"]
PRIMARY = "income"

PLE = {"top": "ple", "ple": {"num_levels": 2, "task_experts": 2, "shared_experts": 2, "expert_mlp": [64]}}
SHARED_BOTTOM = {"top": "shared_bottom", "bottom_mlp": [128, 64]}
EMA = {"updater": "ema", "ema_decay": 0.99}

#: method -> (model overrides on census.yaml's model section, gradients section). Baselines first.
BASELINES = ["shared_bottom", "mmoe", "ple", "pcgrad", "uncertainty"]
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "shared_bottom": (SHARED_BOTTOM, {"method": "equal"}),
    "mmoe": ({}, {"method": "equal"}),
    "ple": (PLE, {"method": "equal"}),
    "pcgrad": ({}, {"method": "pcgrad"}),
    "uncertainty": ({}, {"method": "uncertainty"}),
    # DRGrad as printed (Eq. 1-2, sum updater) on MMoE, and the authors' code mode (symmetric first-layer routing
    # between the two towers) on their backbone, 2-level PLE.
    "drgrad_paper": ({}, {"method": "drgrad", "drgrad": {"updater": "sum"}}),
    "drgrad_code": (PLE, {"method": "drgrad", "drgrad": {"mode": "code", "split": False}}),
    # Split tower without routing (Split-MMoE): separates the split tower's effect from the router's.
    "split_mmoe": ({}, {"method": "drgrad", "drgrad": {"router": False, "updater": "none"}}),
    # Variants aimed at the flaws (candidates for "best variant", chosen on validation).
    "drgrad_ema": ({}, {"method": "drgrad", "drgrad": EMA}),
    "drgrad_tied": ({}, {"method": "drgrad", "drgrad": {**EMA, "tied_init": True}}),
    "drgrad_all_layers": ({}, {"method": "drgrad", "drgrad": {**EMA, "router_scope": "all_layers"}}),
    "drgrad_gamma0.5": ({}, {"method": "drgrad", "drgrad": {**EMA, "gamma": 0.5}}),
    "drgrad_gamma2": ({}, {"method": "drgrad", "drgrad": {**EMA, "gamma": 2.0}}),
    "per_sample_pcgrad": (
        {},
        {"method": "drgrad", "drgrad": {"router": False, "updater": "none", "per_sample": True}},
    ),
    "per_sample_drgrad": (
        {},
        {
            "method": "drgrad",
            "drgrad": {"router": False, "updater": "none", "per_sample": True, "per_sample_rule": "drgrad"},
        },
    ),
    "per_sample_project_aux": (
        {},
        {
            "method": "drgrad",
            "drgrad": {"router": False, "updater": "none", "per_sample": True, "per_sample_rule": "project_aux"},
        },
    ),
}
#: Candidates for "best DRGrad variant": everything that routes (Split-MMoE, the split tower without any routing, is
#: the ablation they are compared with, not a candidate).
VARIANTS = [m for m in METHODS if m not in BASELINES and m not in ("drgrad_paper", "drgrad_code", "split_mmoe")]
PUBLISHED = {
    "MMoE paper, MMoE": {"income": 0.9359, "never_married": 0.9927},
    "PLE paper, PLE": {"income": 0.9522, "never_married": 0.9945},
    "DRGrad paper, PLE (same table)": {"income": 0.9522, "never_married": 0.9945},
    "DRGrad paper, MMoE (same table)": {"income": 0.9387, "never_married": 0.9927},
    "DRGrad paper, DRGrad": {"income": 0.9550, "never_married": 0.9949},
}


def model_config(overrides: dict[str, Any]) -> ModelConfig:
    data = yaml.safe_load(EXPERIMENT.read_text())["model"]
    return ModelConfig.model_validate({**data, **overrides})


def load_split(logs: Path, name: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted((logs / PARTITIONS[name]).glob("*.parquet"))])


def score(model: MultiTaskModel, transform: BatchTransform, table: pa.Table, chunk: int = 16384) -> dict[str, float]:
    """AUC per task of the model's probabilities on ``table``."""
    preds: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    labels: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    with torch.no_grad():
        for start in range(0, table.num_rows, chunk):
            batch = transform(table.slice(start, chunk))
            out = model(batch)
            for t in TASKS:
                preds[t].append(torch.sigmoid(out[t]).numpy())
                labels[t].append(batch.labels[t].numpy())
    return {t: float(roc_auc_score(np.concatenate(labels[t]), np.concatenate(preds[t]))) for t in TASKS}


def run_one(
    method: str,
    seed: int,
    spec: FeatureSpec,
    tables: dict[str, pa.Table],
    transform: BatchTransform,
    args: argparse.Namespace,
) -> dict[str, Any]:
    overrides, grads = METHODS[method]
    cfg = model_config(overrides)
    gradients = GradientConfig.model_validate({**grads, "diagnostics_every": 50})
    curve: list[dict[str, Any]] = []
    sampled: dict[str, list[float]] = {}
    train_seconds = [0.0]
    t_epoch = [time.perf_counter()]

    def on_step(step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            if "/" in k:
                sampled.setdefault(k, []).append(v)

    def on_epoch(epoch: int, model: MultiTaskModel) -> None:
        train_seconds[0] += time.perf_counter() - t_epoch[0]
        curve.append(
            {
                "epoch": epoch,
                "validation": score(model, transform, tables["validation"]),
                "test": score(model, transform, tables["test"]),
            }
        )
        t_epoch[0] = time.perf_counter()

    train_local(
        spec,
        cfg,
        transform.stats,
        tables["train"],
        epochs=args.epochs,
        batch_size=args.batch_size,
        dense_lr=args.lr,
        embedding_lr=args.embedding_lr,
        seed=seed,
        gradients=gradients,
        on_step=on_step,
        on_epoch=on_epoch,
    )
    best = max(curve, key=lambda c: c["validation"][PRIMARY])
    return {
        "validation": best["validation"],
        "test": best["test"],
        "best_epoch": best["epoch"],
        "curve": curve,
        "train_seconds": train_seconds[0],
        "diag": {k: float(np.mean(v)) for k, v in sampled.items()},
    }


def _stats(values: list[float]) -> dict[str, float | int]:
    return {
        "auc_mean": float(np.mean(values)),
        "auc_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n_seeds": len(values),
    }


def _paired(runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    by_seed = {b["seed"]: b for b in base}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    out: dict[str, dict[str, float | int]] = {}
    for t in TASKS:
        diff = np.array([r["test"][t] - b["test"][t] for r, b in pairs])
        if diff.size:
            se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
            out[t] = {"mean_diff": float(diff.mean()), "se": se, "wins": int((diff > 0).sum()), "n": int(diff.size)}
    return out


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{method: {task: {auc_mean, auc_std, n_seeds}}}`` (test AUC) plus validation means, the selections, paired
    differences against the best baseline, diagnostics and the published figures."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    methods = [m for m in METHODS if m in by_method]
    out: dict[str, Any] = {m: {t: _stats([r["test"][t] for r in by_method[m]]) for t in TASKS} for m in methods}

    def chooser(candidates: list[str]) -> tuple[str | None, list[int]]:
        """The candidate with the best mean validation income AUC over the seeds every candidate has (so a
        candidate run on more seeds afterwards does not change the choice)."""
        if not candidates:
            return None, []
        common = set.intersection(*({r["seed"] for r in by_method[m]} for m in candidates))

        def val(m: str) -> float:
            return float(np.mean([r["validation"][PRIMARY] for r in by_method[m] if r["seed"] in common]))

        return max(candidates, key=val), sorted(common)

    baselines = [m for m in BASELINES if m in by_method]
    variants = [m for m in VARIANTS if m in by_method]
    best_baseline, baseline_seeds = chooser(baselines)
    best_variant, variant_seeds = chooser(variants)
    if best_variant is not None:
        out["drgrad_best_variant"] = out[best_variant]
    out["_validation"] = {
        m: {t: float(np.mean([r["validation"][t] for r in by_method[m]])) for t in TASKS} for m in methods
    }
    out["_selection"] = {
        "rule": f"highest mean validation {PRIMARY} AUC over the seeds all candidates share",
        "best_baseline": best_baseline,
        "baseline_selection_seeds": baseline_seeds,
        "best_variant": best_variant,
        "variant_selection_seeds": variant_seeds,
        "variant_candidates": variants,
    }
    if best_baseline is not None:
        base = by_method[best_baseline]
        out["_paired"] = {f"{m}-{best_baseline}": _paired(by_method[m], base) for m in methods if m != best_baseline}
    out["_diagnostics"] = {
        m: {k: float(np.mean([r["diag"][k] for r in runs if k in r["diag"]])) for k in runs[0]["diag"]}
        for m, runs in by_method.items()
        if runs[0]["diag"]
    }
    out["_train_seconds_mean"] = {m: float(np.mean([r["train_seconds"] for r in by_method[m]])) for m in methods}
    out["_published"] = PUBLISHED
    return out


def markdown(out: dict[str, Any]) -> str:
    lines = ["| method | income AUC | never-married AUC | val income AUC | s / run |", "|---|---|---|---|---|"]
    for m in [*METHODS, "drgrad_best_variant"]:
        if m not in out:
            continue
        row = out[m]
        cells = [f"{row[t]['auc_mean']:.4f} ± {row[t]['auc_std']:.4f} (n={row[t]['n_seeds']})" for t in TASKS]
        name = f"drgrad best variant ({out['_selection']['best_variant']})" if m == "drgrad_best_variant" else m
        v = out["_validation"].get(m if m != "drgrad_best_variant" else out["_selection"]["best_variant"], {})
        secs = out["_train_seconds_mean"].get(m, float("nan"))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {v.get(PRIMARY, float('nan')):.4f} | {secs:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, default=REPO / "runs/census/data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--embedding-lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/census.json")
    parser.add_argument("--runs", type=Path, default=None, help="per-run JSON lines (default: OUT .runs.jsonl)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = load_feature_spec(SPEC)
    missing = [p for p in PARTITIONS.values() if not (args.logs / p).is_dir()]
    if missing:
        sys.exit(f"{args.logs}: missing partitions {missing}; run the converter first (see this script's docstring)")
    tables = {name: load_split(args.logs, name) for name in PARTITIONS}
    stats = dense_stats_from_moments([compute_dense_moments(tables["train"], spec)], spec)
    transform = BatchTransform(spec, stats)
    runs_path = args.runs or args.out.with_suffix(".runs.jsonl")
    records = [json.loads(x) for x in runs_path.read_text().splitlines() if x.strip()] if runs_path.exists() else []
    settings = {k: v for k, v in vars(args).items() if k in ("epochs", "batch_size", "lr", "embedding_lr")}
    done = {(r["method"], r["seed"]) for r in records if r["settings"] == settings}
    records = [r for r in records if r["settings"] == settings]
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for m in args.methods:
            if (m, seed) in done:
                continue
            t0 = time.perf_counter()
            r = run_one(m, seed, spec, tables, transform, args)
            rec = {"method": m, "seed": seed, "settings": settings, **r}
            records.append(rec)
            with runs_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            test = " ".join(f"{t}={r['test'][t]:.4f}" for t in TASKS)
            print(
                f"seed={seed} {m:<18} test {test} val income={r['validation'][PRIMARY]:.4f} "
                f"epoch={r['best_epoch']} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    out = aggregate(records)
    out["_meta"] = {
        "command": "python benchmarks/census.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": settings,
        "rows": {k: v.num_rows for k, v in tables.items()},
        "runs_file": str(runs_path.relative_to(REPO) if runs_path.is_relative_to(REPO) else runs_path),
        "wall_seconds_this_invocation": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(markdown(out))
    print(f"wrote {args.out} ({len(records)} runs) in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
