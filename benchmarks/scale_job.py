"""The whole job at scale: embedding tables of up to 100M rows in all, trained by 2 Ray Train workers, checkpointed,
exported, evaluated and registered, with the peak memory of every process per stage, at several sizes in one run.

    .venv/bin/python benchmarks/scale_job.py --scales 0.25 0.5 1.0       # 25M, 50M, 100M embedding rows

The tables of ``configs/features/behaviour_logs_scale.yaml`` resized to ``--scale x`` (item 64M, user 32M, seller
3.2M, category 0.8M rows at 1.0; dim 16 / 16 / 8 / 8), row-wise Adagrad (one optimizer float per row), fp32. The item
table (candidate and every history) is pinned row-wise over both workers; the planner places the rest. Each size runs
``mtrec run``'s stages in a fresh run folder on small generated logs (``--steps`` training steps: the point is the
memory of the tables, not the model's quality): ingest, train (including the DCP checkpoint and the driver's
tensor-by-tensor export of the weights), evaluate, register in MLflow (SQLite, local artifacts).

A sampler thread reads the anonymous resident memory (``RssAnon``: allocated, not file pages) of the driver and of
every Ray Train worker every 0.2 s and keeps each process's peak per stage, and each worker's last reading. Bytes per
embedding row: the slope of the workers' summed peak in training against the table rows over the sizes (least
squares), beside the theoretical ``4 * dim + 4`` bytes (weights + one row-wise Adagrad float); linear if the
residuals are small against the slope's contribution.

With ``--model-only``, each size also times the same sharded model stepping over batches already in memory (the
model-only side of ``benchmarks/train_throughput.py``, in its own Ray Train run after the job), beside the job's own
loop and steady-state rates: what the whole run's data path, checkpoints and start-up cost at that size. Give it
enough rows for a few hundred steps:

    .venv/bin/python benchmarks/scale_job.py --scales 1.0 --rows-per-day 400000 --steps 400 --model-only \
        --out benchmarks/results/scale_throughput.json

Writes ``benchmarks/results/scale_job.json`` (or ``--out``) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
BASE_SPEC = REPO / "configs" / "features" / "behaviour_logs_scale.yaml"
FULL_ROWS = {"item": 64_000_000, "user": 32_000_000, "seller": 3_200_000, "category": 800_000}
GB = 1024**3


def anon_gb(pid: int) -> float:
    """Private anonymous memory of a process (``RssAnon``): what it allocated. File pages (the memory-mapped export, the
    page cache of files it read) are left out: the kernel drops them under pressure, and they would otherwise count a
    file written through ``mmap`` as held memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024 / GB
    raise psutil.NoSuchProcess(pid)


class RssSampler:
    """Peak anonymous RSS per process (the driver and each RayTrainWorker) per named stage, and each worker's last
    reading (its memory after the final checkpoint, as it exits)."""

    def __init__(self) -> None:
        self.stage = "setup"
        self.peaks: dict[str, dict[str, float]] = {}
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _processes(self) -> dict[str, psutil.Process]:
        """The driver and the training workers of this run's Ray (the driver started it: they descend from it)."""
        driver = psutil.Process()
        found = {"driver": driver}
        for p in driver.children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found[f"worker pid {p.pid}"] = p
            except psutil.Error:
                continue
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self._processes().items():
                try:
                    rss = anon_gb(proc.pid)
                except (OSError, psutil.Error):
                    continue
                stage = self.peaks.setdefault(self.stage, {})
                stage[name] = max(stage.get(name, 0.0), rss)
                self.last[name] = rss
            time.sleep(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def during(self, stage: str) -> Any:
        self.stage = stage
        yield
        self.stage = "between"


def scaled_spec(scale: float, out: Path) -> tuple[Path, int, dict[str, int]]:
    data = yaml.safe_load(BASE_SPEC.read_text())
    for table in data["tables"]:
        if table["name"] in FULL_ROWS:
            table["num_buckets"] = int(FULL_ROWS[table["name"]] * scale)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    rows = sum(t["num_buckets"] for t in data["tables"])
    dims = {t["name"]: t["dim"] for t in data["tables"]}
    theoretical = sum(t["num_buckets"] * (4 * t["dim"] + 4) for t in data["tables"])
    return out, rows, {"theoretical_bytes": theoretical, **{f"dim.{k}": v for k, v in dims.items()}}


def run_size(scale: float, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate
    from pipeline.ingest import ingest
    from pipeline.register import register
    from pipeline.run import generate
    from pipeline.runtime import ensure_ray
    from pipeline.train import train

    run_dir = args.runs / f"scale-{scale:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec_path, rows, theory = scaled_spec(scale, run_dir / "spec.yaml")
    cfg = load_config(
        REPO / "configs" / "experiments" / "demo.yaml",
        [
            f"run_dir={run_dir}",
            f"features={spec_path}",
            f"data.path={args.logs}",
            f"data.oracle_path={args.logs.parent / 'oracle.parquet'}",
            "generator.num_days=3",
            f"generator.impressions_per_day={args.rows_per_day}",
            f"train.batch_size={args.batch_size}",
            f"train.max_steps={args.steps}",
            "train.log_every=10",
            "train.embedding_optimizer=rowwise_adagrad",
            "train.sharding.tables.item=[row_wise]",
            "train.num_workers=2",
        ],
    )
    if not args.logs.exists():
        generate(cfg)
    ensure_ray(cfg)
    seconds: dict[str, float] = {}
    results: dict[str, Any] = {}
    stages = (
        ("ingest", lambda: ingest(cfg)),
        ("train", lambda: train(cfg, results["ingest"], fresh=True)),
        ("evaluate", lambda: evaluate(cfg, results["ingest"], results["train"])),
        ("register", lambda: register(cfg, results["ingest"], results["train"], results["evaluate"])),
    )
    with RssSampler() as sampler:
        for stage, fn in stages:
            start = time.perf_counter()
            with sampler.during(stage):
                results[stage] = fn()
            seconds[stage] = round(time.perf_counter() - start, 1)
            print(f"[scale {scale:g}] {stage} {seconds[stage]} s", flush=True)
    trained = results["train"]
    train_peaks = sampler.peaks.get("train", {})
    workers = {k: round(v, 3) for k, v in train_peaks.items() if k.startswith("worker")}
    workers_last = {k: round(sampler.last[k], 3) for k in workers}
    model_dir = Path(trained.model_dir)
    dcp_bytes = sum(f.stat().st_size for f in (model_dir / "dcp").rglob("*") if f.is_file())
    weights_bytes = (model_dir / "weights.safetensors").stat().st_size
    out = {
        "scale": scale,
        "embedding_rows": rows,
        **theory,
        "stage_seconds": seconds,
        "peak_rss_gb": {s: {k: round(v, 3) for k, v in p.items()} for s, p in sampler.peaks.items()},
        "train_worker_peaks_gb": workers,
        "workers_sum_gb": round(sum(workers.values()), 3),
        "train_worker_last_gb": workers_last,
        "workers_last_sum_gb": round(sum(workers_last.values()), 3),
        "dcp_bytes": dcp_bytes,
        "weights_bytes": weights_bytes,
        "plan": {t: p["sharding_type"] for t, p in trained.plan.items()},
        "loop_samples_per_s": round(trained.samples_per_s),
        "steady_samples_per_s": round(trained.steady_samples_per_s),
        "startup_s": trained.startup,
        "wind_down_s": trained.wind_down,
        "model_version": results["register"].model_uri,
    }
    shutil.rmtree(run_dir / "ray_results", ignore_errors=True)  # gigabytes of checkpoints: the figures are taken
    if args.model_only:
        out.update(model_only_rates(cfg, results["ingest"], trained))
    return out


def model_only_rates(cfg: Any, ingested: Any, trained: Any) -> dict[str, Any]:
    """The same sharded model stepping over the same training files already in memory, in its own Ray Train run."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import run_side

    model = run_side(cfg, ingested.train_files, ingested.stats, "model", warmup=5)
    print(f"[scale] model only: {model['steps']} steps, {model['samples_per_s']:,.0f} samples/s", flush=True)
    return {
        "model_only_steps": model["steps"],
        "model_only_samples_per_s": round(model["samples_per_s"]),
        "job_steps": trained.steps,
        "loop_over_model_only": round(trained.samples_per_s / model["samples_per_s"], 3),
        "steady_over_model_only": round(trained.steady_samples_per_s / model["samples_per_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--rows-per-day", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "scale_job")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale_job.json")
    parser.add_argument("--model-only", action="store_true", help="also time the model on in-memory batches")
    args = parser.parse_args()
    args.runs = args.runs.resolve()
    args.logs = args.runs / f"logs-{args.rows_per_day}"  # generated once per size of the logs
    sizes = []
    for scale in args.scales:
        sizes.append(run_size(scale, args))
        sizes[-1]["load_average"] = round(os.getloadavg()[0], 1)
    rows = np.array([s["embedding_rows"] for s in sizes], dtype=np.float64)
    mem = np.array([s["workers_sum_gb"] * GB for s in sizes])
    fit: dict[str, float] = {}
    if len(sizes) >= 2:
        slope, intercept = np.polyfit(rows, mem, 1)
        residual = mem - (slope * rows + intercept)
        theory_per_row = sizes[-1]["theoretical_bytes"] / sizes[-1]["embedding_rows"]
        fit = {
            "bytes_per_row": round(float(slope), 2),
            "theoretical_bytes_per_row": round(theory_per_row, 2),
            "over_theoretical": round(float(slope) / theory_per_row, 3),
            "intercept_gb": round(float(intercept) / GB, 3),
            "max_residual_gb": round(float(np.abs(residual).max()) / GB, 3),
        }
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/scale_job.py", *sys.argv[1:]]),
        "sizes": sizes,
        "fit": fit,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    header = "| embedding rows | train peak RSS per worker (GB) | workers sum | driver peak (GB): train / evaluate"
    print(f"\n{header} / register | DCP GB | seconds: ingest / train / evaluate / register |")
    print("|---:|---|---:|---|---:|---|")
    for s in sizes:
        peaks = s["peak_rss_gb"]
        driver = " / ".join(f"{peaks.get(st, {}).get('driver', 0):.2f}" for st in ("train", "evaluate", "register"))
        secs = " / ".join(f"{s['stage_seconds'][st]:.0f}" for st in ("ingest", "train", "evaluate", "register"))
        per_worker = ", ".join(f"{v:.2f}" for v in s["train_worker_peaks_gb"].values())
        print(
            f"| {s['embedding_rows']:,} | {per_worker} | {s['workers_sum_gb']:.2f} | {driver} | "
            f"{s['dcp_bytes'] / GB:.2f} | {secs} |"
        )
    if fit:
        print(
            f"\nworkers' memory vs rows: {fit['bytes_per_row']:.1f} bytes per row (theoretical "
            f"{fit['theoretical_bytes_per_row']:.1f}, ratio {fit['over_theoretical']:.3f}), intercept "
            f"{fit['intercept_gb']:.2f} GB, largest residual {fit['max_residual_gb']:.3f} GB"
        )
    if args.model_only:
        print("\n| embedding rows | job steps | job loop samples/s | job steady state | model only", end="")
        print(" | loop / model only |")
        print("|---:|---:|---:|---:|---:|---:|")
        for s in sizes:
            print(
                f"| {s['embedding_rows']:,} | {s['job_steps']} | {s['loop_samples_per_s']:,} | "
                f"{s['steady_samples_per_s']:,} | {s['model_only_samples_per_s']:,} | {s['loop_over_model_only']:.2f} |"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
