"""Quality per architecture on generated logs with the conflict knob on: per-task AUC (RMSE for dwell) over seeds,
with the oracle beside.

    .venv/bin/python benchmarks/models_quality.py --seeds 0 1 2

For each seed: generate ``--days`` days of logs (the generator seed is the run's seed), train every architecture on
all days but the last with ``pipeline.local.train_local`` (same seed: same initial dense-layer draw order and
batch order per architecture), score the last day, and compute ``pipeline.evaluate.task_metrics`` for the
model and for the oracle on the same rows. Architectures are the ``model:`` sections of the experiment YAMLs
(``configs/experiments/<file>``), so the table measures exactly what the pipeline would train.

Writes ``--out`` (default ``benchmarks/results/models.json``)::

    {"<architecture>": {"<task>": {"auc_mean", "auc_std", "n_seeds"}}, "oracle": {"<task>": float}}

with ``rmse_mean`` / ``rmse_std`` for the regression task (dwell: RMSE of log1p(dwell seconds) on clicked rows;
lower is better) and the oracle averaged over seeds. Per-seed values, settings, timings and DTRN diagnostics go to
``--runs-out``, rewritten after every seed; ``--resume`` reuses the seeds already there (same settings), so the seed
count can grow across invocations.
Prints a markdown table, and paired differences (same data, same seed) of each DTRN model against its plain top.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from features.generator import GeneratorConfig, generate_logs
from features.spec import FeatureSpec, TaskKind, load_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.dtrn import DTRNBottom
from models.multitask import MultiTaskModel
from pipeline.evaluate import score_files
from pipeline.local import train_local
from pipeline.metrics import task_metrics

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs/features/behaviour_logs.yaml"
EXPERIMENTS = REPO / "configs/experiments"
ARCHITECTURES = {
    "shared_bottom": "demo.yaml",
    "mmoe": "mmoe.yaml",
    "ple": "ple.yaml",
    "dtrn_mmoe": "dtrn_mmoe.yaml",
    "dtrn_ple": "dtrn_ple.yaml",
}
ORACLE_COLUMNS = {"ctr": "p_click", "cvr": "p_conversion", "ctr_cvr": "p_ctcvr", "dwell": "dwell_log_mean"}
PAIRS = [("dtrn_mmoe", "mmoe"), ("dtrn_ple", "ple")]


_NOT_COMPARED = {"seeds", "out", "runs_out", "resume", "report_only", "threads"}


def model_config(arch: str, overrides: list[str]) -> ModelConfig:
    """The ``model:`` section of the architecture's experiment YAML, with ``key=value`` overrides (dotted)."""
    data = yaml.safe_load((EXPERIMENTS / ARCHITECTURES[arch]).read_text())["model"]
    for o in overrides:
        key, raw = o.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return ModelConfig.model_validate(data)


def metric_of(spec: FeatureSpec, name: str) -> str:
    task = next((t for t in spec.tasks if t.name == name), None)
    return "rmse" if task is not None and task.kind == TaskKind.regression else "auc"


def dtrn_diagnostics(model: MultiTaskModel, transform: BatchTransform, rows: pa.Table) -> dict[str, Any]:
    """What DTRN learned: how far apart the tasks' generated LayerNorms are, how different the tasks' interest
    vectors for the same sequences are, and each task's mean TRM field weight."""
    bottom = model.bottom
    assert isinstance(bottom, DTRNBottom)
    batch = transform(rows)
    with torch.no_grad():
        gamma, beta = bottom.tim.hyper()  # [K, M, norms, d]
        out = model.sparse(batch.sparse)
        u = bottom.interests(out)  # [K, M, B, d]
        fields = bottom.fields + (["dense"] if bottom.dense_field else []) + bottom.sequences
        trm = {}
        for k, task in enumerate(model.task_names):
            w = bottom.trm.weights(k, bottom.task_fields(out, batch.dense, u, k)).mean(dim=0)
            trm[task] = {f: round(float(v), 3) for f, v in zip(fields, w, strict=True)}
        nonempty = [out.sequences[s][1].any(dim=1) for s in bottom.sequences]
        # Relative distance of task k's interest vector from the tasks' mean, on rows with a non-empty sequence.
        spread = {
            s: round(float(((u[:, m, rows_m] - u[:, m, rows_m].mean(0)).norm(dim=-1) / u[:, m, rows_m].norm(dim=-1)
                           .clamp_min(1e-9)).mean()), 4)
            for m, (s, rows_m) in enumerate(zip(bottom.sequences, nonempty, strict=True))
        }  # fmt: skip
    return {
        "gamma_task_spread": float((gamma - gamma.mean(0)).abs().mean()),
        "beta_task_spread": float((beta - beta.mean(0)).abs().mean()),
        "interest_task_spread": spread,
        "trm_mean_weight": trm,
    }


def run_seed(seed: int, args: argparse.Namespace, spec: FeatureSpec, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
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
    train_files = [f for f in result.files if f.parent.name != eval_dir]
    eval_files = [str(f) for f in result.files if f.parent.name == eval_dir]
    train = pa.concat_tables([pq.read_table(f) for f in train_files])
    stats = dense_stats_from_moments([compute_dense_moments(train, spec)], spec)
    transform = BatchTransform(spec, stats)
    oracle = pl.read_parquet(result.oracle_path).rename({c: f"oracle:{n}" for n, c in ORACLE_COLUMNS.items()})
    out: dict[str, Any] = {"seed": seed, "train_rows": train.num_rows, "models": {}, "generate_s": 0.0}
    out["generate_s"] = time.perf_counter() - t0
    for arch in args.archs:
        cfg = model_config(arch, args.set)
        t1 = time.perf_counter()
        model = train_local(
            spec,
            cfg,
            stats,
            train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            dense_lr=args.dense_lr,
            embedding_lr=args.embedding_lr,
            seed=seed,
        )
        train_s = time.perf_counter() - t1
        frame = score_files(eval_files, model, transform, spec, 8192)
        metrics = task_metrics(spec, frame, {c[5:]: c for c in frame.columns if c.startswith("pred:")}, False)
        if "oracle" not in out:
            joined = frame.join(oracle, on=spec.keys.request_id, how="left")
            out["eval_rows"] = frame.height
            out["oracle"] = {
                n: m[metric_of(spec, n)]
                for n, m in task_metrics(spec, joined, {n: f"oracle:{n}" for n in ORACLE_COLUMNS}, False).items()
            }
        out["models"][arch] = {
            "metrics": {n: m[metric_of(spec, n)] for n, m in metrics.items()},
            "train_s": train_s,
        }
        if isinstance(model.bottom, DTRNBottom):
            eval_rows = pq.read_table(eval_files[0]).slice(0, 4096)
            out["models"][arch]["dtrn"] = dtrn_diagnostics(model, transform, eval_rows)
        print(f"[seed {seed}] {arch:<14} {json.dumps(out['models'][arch]['metrics'])} train {train_s:.0f}s", flush=True)
    return out


def summarise(runs: list[dict[str, Any]], spec: FeatureSpec, archs: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    tasks = list(runs[0]["oracle"])
    for arch in archs:
        summary[arch] = {}
        for task in tasks:
            values = [r["models"][arch]["metrics"][task] for r in runs]
            metric = metric_of(spec, task)
            summary[arch][task] = {
                f"{metric}_mean": statistics.fmean(values),
                f"{metric}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n_seeds": len(values),
            }
    summary["oracle"] = {task: statistics.fmean(r["oracle"][task] for r in runs) for task in tasks}
    return summary


def markdown(summary: dict[str, Any], runs: list[dict[str, Any]], spec: FeatureSpec, archs: list[str]) -> str:
    tasks = list(summary["oracle"])
    head = [f"{t} {metric_of(spec, t).upper()}" for t in tasks]
    lines = [
        "| architecture | " + " | ".join(head) + " | train s / run |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for arch in archs:
        cells = []
        for t in tasks:
            m = metric_of(spec, t)
            cells.append(f"{summary[arch][t][f'{m}_mean']:.4f} ± {summary[arch][t][f'{m}_std']:.4f}")
        train_s = statistics.fmean(r["models"][arch]["train_s"] for r in runs)
        lines.append(f"| {arch} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    lines.append("| oracle | " + " | ".join(f"{summary['oracle'][t]:.4f}" for t in tasks) + " | |")
    pairs = [(a, b) for a, b in PAIRS if a in archs and b in archs]
    if pairs:
        lines += [
            "",
            "Paired differences (same data and seed; AUC: + is better, RMSE: - is better): mean ± standard error,",
            "seeds where the DTRN model is better, and the per-seed values up to 5 seeds:",
            "",
        ]
        lines.append("| comparison | " + " | ".join(head) + " |")
        lines.append("|---" * (len(tasks) + 1) + "|")
        for a, b in pairs:
            cells = []
            for t in tasks:
                d = [r["models"][a]["metrics"][t] - r["models"][b]["metrics"][t] for r in runs]
                better = sum(x < 0 if metric_of(spec, t) == "rmse" else x > 0 for x in d)
                se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
                cell = f"{statistics.fmean(d):+.4f} ± {se:.4f}, {better}/{len(d)}"
                cells.append(cell + (f" [{', '.join(f'{x:+.4f}' for x in d)}]" if len(d) <= 5 else ""))
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--days", type=int, default=4, help="the last day is evaluated, the others train")
    parser.add_argument("--impressions", type=int, default=50_000, help="impressions per day")
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--conflict", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--dense-lr", type=float, default=3e-3)
    parser.add_argument("--embedding-lr", type=float, default=0.05)
    parser.add_argument("--set", nargs="*", default=[], help="model overrides for every architecture, key=value")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="reuse seeds already in --runs-out (same settings)")
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: summarise --seeds from --runs-out into --out"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/models.json")
    parser.add_argument("--runs-out", type=Path, default=REPO / "benchmarks/results/models_runs.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_feature_spec(SPEC)
    started = time.perf_counter()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    comparable = {k: v for k, v in settings.items() if k not in _NOT_COMPARED}
    done: dict[int, dict[str, Any]] = {}
    if (args.resume or args.report_only) and args.runs_out.exists():
        previous = json.loads(args.runs_out.read_text())
        if {k: v for k, v in previous["settings"].items() if k not in _NOT_COMPARED} != comparable:
            raise SystemExit(f"--resume: {args.runs_out} was written with other settings: {previous['settings']}")
        done = {r["seed"]: r for r in previous["runs"]}
        print(f"resuming: seeds {sorted(done)} read from {args.runs_out}")
    if args.report_only and not set(args.seeds) <= set(done):
        raise SystemExit(f"--report-only: seeds {sorted(set(args.seeds) - set(done))} are not in {args.runs_out}")
    runs = []
    args.runs_out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        if seed not in done:
            with tempfile.TemporaryDirectory(prefix="mtrec-quality-") as tmp:
                done[seed] = run_seed(seed, args, spec, Path(tmp))
            # Written after every seed, so an interrupted run can --resume.
            record = {"settings": settings, "runs": [done[s] for s in sorted(done)]}
            args.runs_out.write_text(json.dumps(record, indent=2) + "\n")
        runs.append(done[seed])
    summary = summarise(runs, spec, args.archs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    wall = time.perf_counter() - started
    print()
    print(markdown(summary, runs, spec, args.archs))
    print(f"\nwall time {wall:.0f} s; wrote {args.out} (per-seed runs: {args.runs_out})")


if __name__ == "__main__":
    main()
