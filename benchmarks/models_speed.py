"""Training step time and samples/s per architecture on the same batches (one run), plus the parameter report.

    .venv/bin/python benchmarks/models_speed.py --batch-size 512 --steps 30 [--precision bf16]

Generates the quality experiment's logs (seed 0), transforms ``--warmup + --steps`` batches of the last day once,
then for every architecture (the ``model:`` sections of ``configs/experiments/*.yaml``, plus the combinations without
a YAML) builds the unsharded model under a fixed seed and times full training steps on those same batches (forward,
the losses, backward, Adam on dense parameters and fused Adagrad on the tables: ``pipeline.local.train_step``)
and the forward pass alone (inference). Reports wall time and this process's CPU time per step: on a shared machine
the CPU time is the steadier number. Single-threaded by default (``--threads``). Prints each DTRN variant's CPU step
time over its plain counterpart's (``dtrn_mmoe/mmoe``: what DTRN's bottom costs on the same top) and the machine's
load average, both also in the JSON.

Also prints the parameter report of every architecture and, for DTRN, the TIM's shared encoder + hypernetwork beside
K x M separate encoders, at the configured size and at a larger encoder (``--large``: d_model 64, 2 layers, FFN 256).
Writes everything to ``--out`` (default ``benchmarks/results/models_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from features.batch import Batch
from features.generator import GeneratorConfig, generate_logs
from features.spec import FeatureSpec, load_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.multitask import MultiTaskLoss, build_model, format_parameter_report, parameter_report
from pipeline.local import make_optimizers, train_step

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs/experiments"
# name -> (experiment YAML whose model: section is the base, overrides)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "shared_bottom": ("demo.yaml", {}),
    "mmoe": ("mmoe.yaml", {}),
    "cgc": ("ple.yaml", {"top": "cgc"}),
    "ple": ("ple.yaml", {}),
    "dtrn_shared_bottom": ("dtrn_mmoe.yaml", {"top": "shared_bottom"}),
    "dtrn_mmoe": ("dtrn_mmoe.yaml", {}),
    "dtrn_cgc": ("dtrn_ple.yaml", {"top": "cgc"}),
    "dtrn_ple": ("dtrn_ple.yaml", {}),
}
LARGE_DTRN = {"d_model": 64, "num_heads": 4, "num_layers": 2, "ffn_dim": 256}


def model_config(name: str, large: bool = False) -> ModelConfig:
    path, overrides = ARCHITECTURES[name]
    data = {**yaml.safe_load((EXPERIMENTS / path).read_text())["model"], **overrides}
    if large and data.get("bottom") == "dtrn":
        data["dtrn"] = {**data.get("dtrn", {}), **LARGE_DTRN}
    return ModelConfig.model_validate(data)


def make_batches(args: argparse.Namespace, spec: FeatureSpec, tmp: Path) -> list[Batch]:
    # The quality experiment's data (benchmarks/models_quality.py): histories grow over the days, so the last day's
    # sequences are the fullest; DTRN's encoder cost grows with the number of real positions.
    gen = GeneratorConfig(
        seed=0, num_days=args.days, impressions_per_day=args.impressions, num_users=2000, num_items=10000, conflict=1.0
    )
    result = generate_logs(gen, tmp / "logs", tmp / "oracle.parquet")
    first = pa.concat_tables([pq.read_table(f) for f in result.files if f.parent.name == f"dt={result.dates[0]}"])
    last = pa.concat_tables([pq.read_table(f) for f in result.files if f.parent.name == f"dt={result.dates[-1]}"])
    transform = BatchTransform(spec, dense_stats_from_moments([compute_dense_moments(first, spec)], spec))
    n = args.warmup + args.steps
    if last.num_rows < n * args.batch_size:
        raise SystemExit(f"--impressions too small for {n} batches of {args.batch_size}")
    return [transform(last.slice(i * args.batch_size, args.batch_size)) for i in range(n)]


def time_architecture(
    name: str, spec: FeatureSpec, batches: list[Batch], warmup: int, bf16: bool = False
) -> dict[str, float]:
    """``bf16``: the step under CPU bfloat16 autocast (``train.precision: bf16``)."""
    torch.manual_seed(0)
    cfg = model_config(name)
    model = build_model(spec, cfg, torch.device("cpu"))
    model.train()
    loss_fn = MultiTaskLoss(spec)
    optimizers = make_optimizers(model, 1e-3, 0.05)
    wall, cpu = [], []
    for i, batch in enumerate(batches):
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            train_step(model, loss_fn, batch, optimizers)
        if i >= warmup:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    model.eval()
    infer = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            c0 = time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(batch)
            if i >= warmup:
                infer.append(time.process_time() - c0)
    batch_size = batches[0].batch_size
    step_ms = 1000 * statistics.median(wall)
    return {
        "step_ms_wall_median": step_ms,
        "step_ms_cpu_median": 1000 * statistics.median(cpu),
        "samples_per_s_wall": batch_size / statistics.median(wall),
        "samples_per_s_cpu": batch_size / statistics.median(cpu),
        "inference_ms_cpu_median": 1000 * statistics.median(infer),
        "dense_params": float(parameter_report(model, spec, cfg)["dense"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per architecture")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--days", type=int, default=4, help="generated days (stats from the first, batches from the last)"
    )
    parser.add_argument("--impressions", type=int, default=50_000, help="impressions per generated day")
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: CPU bfloat16 autocast")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/models_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    spec = load_feature_spec(REPO / "configs/features/behaviour_logs.yaml")

    reports: dict[str, dict[str, int | float]] = {}
    for name in args.archs:
        cfg = model_config(name)
        reports[name] = parameter_report(build_model(spec, cfg, torch.device("meta")), spec, cfg)
        print(f"## parameters: {name}\n{format_parameter_report(reports[name])}\n")
    large = {}
    for name in [a for a in args.archs if a.startswith("dtrn")][:1]:
        cfg = model_config(name, large=True)
        large[name] = parameter_report(build_model(spec, cfg, torch.device("meta")), spec, cfg)
        print(f"## parameters: {name} with {LARGE_DTRN}\n{format_parameter_report(large[name])}\n")

    with tempfile.TemporaryDirectory(prefix="mtrec-bench-models-") as tmp:
        batches = make_batches(args, spec, Path(tmp))
    seq_fill = {
        f.name: float(torch.cat([b.sparse[f.name].lengths() for b in batches]).float().mean() / f.max_length)
        for f in spec.sequences
    }
    timings = {}
    for name in args.archs:
        timings[name] = time_architecture(name, spec, batches, args.warmup, bf16=args.precision == "bf16")
        print(f"timed {name}: {json.dumps({k: round(v, 2) for k, v in timings[name].items()})}", flush=True)

    base = timings[args.archs[0]]["step_ms_cpu_median"]
    print(
        f"\nbatch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, {args.threads} thread(s), "
        f"{args.precision};"
    )
    print(f"sequence fill (mean length / max_length): {json.dumps({k: round(v, 2) for k, v in seq_fill.items()})}\n")
    print(
        "| architecture | dense params | step ms (CPU) | step ms (wall) | samples/s (CPU) | vs first | infer ms (CPU) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, t in timings.items():
        cells = [
            f"{int(t['dense_params']):,}",
            f"{t['step_ms_cpu_median']:.1f}",
            f"{t['step_ms_wall_median']:.1f}",
            f"{t['samples_per_s_cpu']:,.0f}",
            f"{t['step_ms_cpu_median'] / base:.2f}x",
            f"{t['inference_ms_cpu_median']:.1f}",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    # DTRN's cost over the same top without it: each DTRN variant beside its plain counterpart, when both ran.
    ratios = {
        f"{name}/{name.removeprefix('dtrn_')}": t["step_ms_cpu_median"]
        / timings[name.removeprefix("dtrn_")]["step_ms_cpu_median"]
        for name, t in timings.items()
        if name.startswith("dtrn_") and name.removeprefix("dtrn_") in timings
    }
    for pair, r in ratios.items():
        print(f"step (CPU) {pair}: {r:.2f}x")
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min) at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "sequence_fill": seq_fill,
                "load_average": {"start": list(load_start), "end": list(load)},
                "timings": timings,
                "step_ratios_cpu": ratios,
                "parameters": reports,
                "parameters_large_dtrn": large,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
