"""Model rows on real logs through ``mtrec run``, over seeds, beside the data set's baselines.

    .venv/bin/python benchmarks/real_data.py movielens --variants shipped mean_pooling ple --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/real_data.py census --variants shipped --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/real_data.py repeat --variants shipped --seeds 0 1 2 3 4   # generated, vs the oracle
    .venv/bin/python benchmarks/real_data.py movielens --report          # tables from the recorded runs only

Every run is one ``mtrec run -c <shipped config> --set train.seed=S --set run_dir=runs/real/<data>/<variant>/sS``
plus the variant's overrides (below); a variant that changes the feature spec gets the shipped spec edited and
written beside its runs. A run whose folder already holds ``eval.json`` is read, not repeated, so the command
resumes. Per run the record keeps the evaluation metrics, the kept epoch, the validation curve's best value, the
wall time and the load average; ``benchmarks/results/real_data.json`` keeps every record and, per variant, mean,
standard deviation and the paired difference to the best baseline (per seed: model minus baseline; mean and
standard error over the seeds; the baselines are deterministic).

Choices are made on the validation column only; the evaluation columns are reported, never used to pick.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "real_data.json"

SpecEdit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Variant:
    """One model row: ``--set`` overrides on the shipped config and an optional edit of its feature spec."""

    help: str
    sets: tuple[str, ...] = ()
    spec_edit: SpecEdit | None = None


@dataclass(frozen=True)
class Dataset:
    config: str
    # evaluation key -> (metric path in eval.json "task.metric", True when higher is better)
    metrics: dict[str, tuple[str, bool]]
    # evaluation key -> baseline name and value (filled from the baselines JSON where the data set has one)
    baselines: Callable[[], dict[str, tuple[str, float]]]
    variants: dict[str, Variant] = field(default_factory=dict)
    # Generated logs: each variant's logs are generated once (``mtrec generate`` with the variant's overrides) into
    # runs/real/<data>/<variant>/data and shared by its seeds (train.seed varies, the world does not); the runs
    # also record the oracle's value of every metric on the same rows.
    generated: bool = False


def _mean_pooling(spec: dict[str, Any]) -> None:
    for seq in spec.get("sequences", []):
        seq.pop("pooling", None)


def _movielens_baselines() -> dict[str, tuple[str, float]]:
    recorded = json.loads((ROOT / "benchmarks/results/movielens_baselines.json").read_text())["baselines"]
    return {
        "liked.auc": ("item like-rate", recorded["item_like_rate.liked_auc"]),
        "loved.auc": ("item love-rate (liked rows)", recorded["item_love_rate.loved_auc_on_liked"]),
        "liked_loved.auc": ("like-rate x love-rate", recorded["item_like_x_love.loved_auc"]),
        "rating.rmse": ("item mean rating", recorded["item_mean_rating.rating_rmse"]),
    }


def _no_baselines() -> dict[str, tuple[str, float]]:
    return {}


def _lr_variants(rates: tuple[float, ...], *sets: str) -> dict[str, Variant]:
    """The dense layers' Adam rate, the one default every data set shares (see the README's defaults table)."""
    return {
        f"lr{r:g}": Variant(" ".join([f"train.dense_lr={r:g}", *sets]), sets=(f"train.dense_lr={r:g}", *sets))
        for r in rates
    }


LEARNING_RATES = (0.001, 0.003, 0.01)


DATASETS: dict[str, Dataset] = {
    "movielens": Dataset(
        config="configs/experiments/movielens.yaml",
        metrics={
            "liked.auc": ("liked.auc", True),
            "loved.auc": ("loved.auc", True),
            "liked_loved.auc": ("liked_loved.auc", True),
            "rating.rmse": ("rating.rmse", False),
        },
        baselines=_movielens_baselines,
        variants={
            # The shipped top is PLE, chosen on validation over MMoE; the ablation rows were measured on the MMoE
            # top (the earlier shipped one) and say so, so that each row reproduces what was measured.
            "shipped": Variant("the shipped configuration (plain bottom, PLE, target attention)"),
            "mmoe": Variant("MMoE top (8 experts)", sets=("model.top=mmoe",)),
            "mean_pooling": Variant(
                "MMoE, histories mean-pooled instead of target attention",
                sets=("model.top=mmoe",),
                spec_edit=_mean_pooling,
            ),
            "dtrn_mmoe": Variant("DTRN bottom, MMoE", sets=("model.top=mmoe", "model.bottom=dtrn")),
            "pcgrad": Variant("MMoE, PCGrad", sets=("model.top=mmoe", "gradients.method=pcgrad")),
            "drgrad_split": Variant(
                "MMoE, DRGrad split tower, no routing",
                sets=(
                    "model.top=mmoe",
                    "gradients.method=drgrad",
                    "gradients.drgrad.split=true",
                    "gradients.drgrad.router=false",
                    "gradients.drgrad.updater=none",
                ),
            ),
            # On the MMoE top, beside the MMoE rows (seed 0 at 1e-3 is the mmoe variant's).
            **_lr_variants(LEARNING_RATES, "model.top=mmoe"),
        },
    ),
    "census": Dataset(
        config="configs/experiments/census.yaml",
        metrics={"income.auc": ("income.auc", True), "never_married.auc": ("never_married.auc", True)},
        baselines=_no_baselines,
        variants={
            "shipped": Variant("the shipped configuration"),
            "ple": Variant("PLE top instead of MMoE", sets=("model.top=ple",)),
            **_lr_variants(LEARNING_RATES),
        },
    ),
    "repeat": Dataset(
        config="configs/experiments/repeat.yaml",
        metrics={
            "ctr.auc": ("ctr.auc", True),
            "cvr.auc": ("cvr.auc", True),
            "ctr_cvr.auc": ("ctr_cvr.auc", True),
            "dwell.rmse": ("dwell.rmse", False),
        },
        baselines=_no_baselines,
        variants={
            "shipped": Variant("the shipped configuration"),
            "no_match": Variant("without the match features", spec_edit=lambda spec: spec.pop("match", None)),
            "mean_pooling": Variant("histories mean-pooled instead of target attention", spec_edit=_mean_pooling),
            # Learning curve: the same world (generator seed, users, items), more impressions per day.
            **{
                f"rows_x{k:g}": Variant(
                    f"{k:g}x the impressions per day", sets=(f"generator.impressions_per_day={int(100_000 * k)}",)
                )
                for k in (0.25, 0.5, 2, 4)
            },
        },
        generated=True,
    ),
}


def _run_one(data: str, ds: Dataset, name: str, variant: Variant, seed: int) -> dict[str, Any]:
    run_dir = ROOT / "runs" / "real" / data / name / f"s{seed}"
    record_path = run_dir / "record.json"
    if record_path.exists():
        return dict(json.loads(record_path.read_text()))
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = [f"train.seed={seed}", f"run_dir={run_dir}", f"mlflow.experiment=real-{data}-{name}", *variant.sets]
    if variant.spec_edit is not None:
        shipped = yaml.safe_load((ROOT / ds.config).read_text())["features"]
        spec_path = (ROOT / ds.config).parent / shipped
        spec = yaml.safe_load(spec_path.read_text())
        variant.spec_edit(spec)
        edited = run_dir / "features.yaml"
        edited.write_text(yaml.safe_dump(spec, sort_keys=False))
        sets.append(f"features={edited}")
    if ds.generated:
        data_dir = run_dir.parent / "data"
        sets += [f"data.path={data_dir}", f"data.oracle_path={data_dir.parent / 'oracle.parquet'}"]
        if not (data_dir.parent / "oracle.parquet").exists():
            generate = [sys.executable, "-m", "jobs.cli", "generate", "--config", ds.config]
            for s in sets:
                generate += ["--set", s]
            subprocess.run(generate, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    command = [sys.executable, "-m", "jobs.cli", "run", "--config", ds.config]
    for s in sets:
        command += ["--set", s]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with (run_dir / "console.log").open("w") as log:
        proc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{data}/{name} seed {seed} failed (exit {proc.returncode}): see {run_dir / 'console.log'}")
    evaluated = json.loads((run_dir / "eval.json").read_text())
    trained = json.loads((run_dir / "train.json").read_text())
    metrics: dict[str, float] = {}
    oracle: dict[str, float] = {}
    for key, (path, _) in ds.metrics.items():
        task, metric = path.rsplit(".", 1)
        metrics[key] = float(evaluated["metrics"][task][metric])
        if metric in evaluated.get("oracle", {}).get(task, {}):
            oracle[key] = float(evaluated["oracle"][task][metric])
    record = {
        "data": data,
        "variant": name,
        "seed": seed,
        "command": " ".join(command[1:]),
        "metrics": metrics,
        **({"oracle": oracle} if oracle else {}),
        "best_epoch": trained.get("best_epoch", 0),
        "epochs": trained.get("epochs", 0),
        "validation": trained.get("validation", []),
        "wall_s": round(wall, 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    record_path.write_text(json.dumps(record, indent=2))
    return record


def _summary(ds: Dataset, records: list[dict[str, Any]]) -> dict[str, Any]:
    baselines = ds.baselines()
    out: dict[str, Any] = {"seeds": [r["seed"] for r in records], "metrics": {}}
    for key, (_, higher) in ds.metrics.items():
        values = [r["metrics"][key] for r in records]
        row: dict[str, Any] = {
            "values": values,
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
        if all(key in r.get("oracle", {}) for r in records):
            # Distance to the oracle on the same rows, per seed (oracle minus model; for RMSE model minus oracle).
            gaps = [
                (r["oracle"][key] - r["metrics"][key]) if higher else (r["metrics"][key] - r["oracle"][key])
                for r in records
            ]
            row["oracle"] = statistics.fmean(r["oracle"][key] for r in records)
            row["gap_to_oracle"] = {
                "mean": statistics.fmean(gaps),
                "se": statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else 0.0,
                "max": max(gaps),
            }
        if key in baselines:
            name, base = baselines[key]
            gains = [(v - base) if higher else (base - v) for v in values]
            row["baseline"] = {"name": name, "value": base}
            row["gain_over_baseline"] = {
                "mean": statistics.fmean(gains),
                "se": statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else 0.0,
                "better_on": sum(g > 0 for g in gains),
                "note": "positive = better than the baseline (for RMSE: baseline minus model)",
            }
        out["metrics"][key] = row
    out["kept_epochs"] = [r["best_epoch"] for r in records]
    # The watched validation metric at the kept epoch: the only column any choice between variants reads.
    kept = [next((v["value"] for v in r["validation"] if v["epoch"] == r["best_epoch"]), None) for r in records]
    out["validation_kept"] = kept
    if all(v is not None for v in kept):
        out["validation_kept_mean"] = statistics.fmean(float(v) for v in kept if v is not None)
    return out


def _table(ds: Dataset, summaries: dict[str, Any]) -> str:
    keys = list(ds.metrics)
    lines = [
        "| variant | seeds | validation (kept epoch) | " + " | ".join(keys) + " |",
        "|---|---:|---:|" + "---:|" * len(keys),
    ]
    baselines = ds.baselines()
    if baselines:
        cells = [f"{baselines[k][1]:.4f}" if k in baselines else "-" for k in keys]
        lines.append("| best baseline | - | - | " + " | ".join(cells) + " |")
    for name, s in summaries.items():
        cells = []
        for k in keys:
            m = s["metrics"][k]
            cell = f"{m['mean']:.4f} ± {m['std']:.4f}"
            if "gain_over_baseline" in m:
                g = m["gain_over_baseline"]
                cell += f" ({g['mean']:+.4f} ± {g['se']:.4f})"
            if "gap_to_oracle" in m:
                g = m["gap_to_oracle"]
                cell += f" (oracle {m['oracle']:.4f}, gap {g['mean']:.4f} ± {g['se']:.4f})"
            cells.append(cell)
        val = s.get("validation_kept_mean")
        val_cell = f"{val:.4f}" if val is not None else "-"
        lines.append(f"| {name} | {len(s['seeds'])} | {val_cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _store(data: str, ds: Dataset, name: str, variant: Variant, records: list[dict[str, Any]]) -> None:
    """Read, update one variant, write: at the moment of writing, so that two invocations running side by side (one
    per data set or variant) do not write back each other's older copy. The variant's runs are merged by seed: a run
    of some seeds replaces those seeds' records and keeps the others'."""
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    section = results.setdefault(data, {"config": ds.config, "variants": {}})
    kept = {r["seed"]: r for r in section["variants"].get(name, {}).get("runs", [])}
    merged = [r for _, r in sorted({**kept, **{r["seed"]: r for r in records}}.items())]
    entry = {"help": variant.help, "sets": list(variant.sets), "runs": merged, **_summary(ds, merged)}
    section["variants"][name] = entry
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(OUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", choices=sorted(DATASETS))
    parser.add_argument("--variants", nargs="+", default=["shipped"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--report", action="store_true", help="no runs: tables from the recorded runs")
    args = parser.parse_args()
    ds = DATASETS[args.data]
    unknown = [v for v in args.variants if v not in ds.variants]
    if unknown:
        parser.error(f"unknown variant(s) {unknown} for {args.data}: choose from {sorted(ds.variants)}")

    for name in args.variants:
        variant = ds.variants[name]
        records = []
        for seed in args.seeds:
            if args.report and not (ROOT / "runs/real" / args.data / name / f"s{seed}" / "record.json").exists():
                continue
            record = _run_one(args.data, ds, name, variant, seed)
            records.append(record)
            print(f"{args.data}/{name} seed {seed}: {record['metrics']} ({record['wall_s']} s)", flush=True)
        if not records:
            continue
        _store(args.data, ds, name, variant, records)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    variants = results.get(args.data, {}).get("variants", {})
    summaries = {n: v for n, v in variants.items() if n in ds.variants}
    print(_table(ds, summaries))


if __name__ == "__main__":
    main()
