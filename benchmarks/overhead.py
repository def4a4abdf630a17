"""Step-time overhead of each gradient method over equal weights, on the same model and the same batches, one run.

    .venv/bin/python benchmarks/overhead.py --out benchmarks/results/overhead.json

Model: the pipeline's model (``models.multitask.build_model``) with the ``model:`` section of
``--model-config`` (default ``configs/experiments/demo.yaml``, the pipeline's default model: plain bottom, shared
bottom [128, 64], towers [32]) on the behaviour-log spec, sharded by ``DistributedModelParallel`` (one gloo process,
fused row-wise Adagrad tables), the pipeline's ``MultiTaskLoss`` (ctr, ESMM cvr, dwell given ctr) and dense Adam.
``gradients.method: drgrad`` builds DRGrad's split-tower head in place of the towers, as the pipeline does. Batches:
``--batches`` batches of ``--batch-size`` rows of the built-in generator's logs, transformed once up front; every
method runs the same list.

A step is forward + losses + ``method.backward`` + optimizer step (what the train loop does). Methods run interleaved
step by step over ``--rounds`` passes of the batches (so machine load hits all of them alike); the per-step time is
the CPU time of the process (one compute thread; on a shared machine wall-clock time mostly measures other users'
load), with wall-clock medians printed beside. Ratios are medians of per-step ratios (method / equal weights on the
same batch, timed back to back), which cancels most of the drift in machine load.

``overhead.json`` holds ``{method: step_time_ratio_vs_equal_weights}`` where equal weights is the pipeline's model
with ordinary towers: for the DRGrad entries that is the whole cost of the method (the extra tower T1'' included,
the comparison behind the paper's +1.5 %). ``<method>_vs_split_tower`` entries compare with equal weights on the same
split-tower model (``split_tower``), i.e. the router / updater / per-sample work alone. The router + updater (the work
after backward) is also timed on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import yaml
from torch import nn

from features.batch import Batch
from features.generator import GeneratorConfig, generate_logs
from features.spec import FeatureSpec, load_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.gradients import DRGradRouter, GradientConfig, GradientMethod, build_gradient_method, head_config
from models.multitask import MultiTaskLoss, build_model
from models.sharding import dense_optimizer, embedding_sharders, shard_model

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs/features/behaviour_logs.yaml"

#: name -> gradients section. ``split_tower``: the DRGrad model trained with equal weights (no router, no updater).
METHODS: dict[str, dict[str, Any]] = {
    "equal": {"method": "equal"},
    "uncertainty": {"method": "uncertainty"},
    "pcgrad": {"method": "pcgrad"},
    "split_tower": {"method": "drgrad", "drgrad": {"router": False, "updater": "none"}},
    "drgrad_paper": {"method": "drgrad"},
    "drgrad_paper_ema": {"method": "drgrad", "drgrad": {"updater": "ema"}},
    "drgrad_paper_ema_gate": {
        "method": "drgrad",
        "drgrad": {"updater": "ema", "personalized_gate": ["user_id", "item_id", "seller_id"]},
    },
    "drgrad_paper_all_layers": {"method": "drgrad", "drgrad": {"router_scope": "all_layers"}},
    "drgrad_code": {"method": "drgrad", "drgrad": {"mode": "code", "split": False}},
    "drgrad_per_sample": {
        "method": "drgrad",
        "drgrad": {"per_sample": True, "router": False, "updater": "none", "aux_input": "shared"},
    },
}


def _batches(spec: FeatureSpec, n: int, batch_size: int, workdir: Path) -> list[Batch]:
    gen = GeneratorConfig(seed=0, num_days=2, impressions_per_day=max(n * batch_size + 1, 1000), files_per_day=1)
    result = generate_logs(gen, workdir / "logs", workdir / "oracle.parquet")
    table = pq.read_table(result.files[0])  # day 1 only; it holds n * batch_size rows
    if table.num_rows < n * batch_size:
        raise ValueError(f"generated {table.num_rows} rows, need {n * batch_size}")
    stats = dense_stats_from_moments([compute_dense_moments(table, spec)], spec)
    transform = BatchTransform(spec, stats)
    return [transform(table.slice(i * batch_size, batch_size)) for i in range(n)]


def _step(model: nn.Module, method: GradientMethod, opt: Any, loss_fn: MultiTaskLoss, batch: Batch) -> None:
    out = model(batch)
    losses = loss_fn.task_losses(out, batch.labels)
    opt.zero_grad()
    method.backward(losses)
    opt.step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model-config", type=Path, default=Path("configs/experiments/demo.yaml"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    spec = load_feature_spec(SPEC)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        batches = _batches(spec, args.batches, args.batch_size, Path(tmp))
    loss_fn = MultiTaskLoss(spec)
    model_cfg = ModelConfig.model_validate(yaml.safe_load((REPO / args.model_config).read_text())["model"])
    runs: dict[str, tuple[nn.Module, GradientMethod, Any]] = {}
    for name in args.methods:
        cfg = GradientConfig.model_validate(METHODS[name])
        torch.manual_seed(0)
        dmp, _ = shard_model(
            build_model(spec, model_cfg, torch.device("meta"), head_config(cfg)),
            device,
            embedding_sharders("rowwise_adagrad", 0.05),
        )
        method = build_gradient_method(cfg, dmp, [t.name for t in spec.tasks])
        opt = dense_optimizer(dmp, 1e-3)
        if method.extra_parameters():
            from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

            extra = {f"gradients.{i}": p for i, p in enumerate(method.extra_parameters())}
            opt = CombinedOptimizer([opt, KeyedOptimizerWrapper(extra, lambda p: torch.optim.Adam(p, lr=1e-3))])
        dmp.train()
        for b in batches[: args.warmup]:
            _step(dmp, method, opt, loss_fn, b)
        runs[name] = (dmp, method, opt)
    times: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for b in batches:  # interleaved step by step: a load spike on the machine hits every method alike
            for name, (model, method, opt) in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                _step(model, method, opt, loss_fn, b)
                times[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    # CPU time of this process (one compute thread): other users' load on a shared machine inflates wall-clock
    # steps by waiting, which CPU time does not count. Wall-clock medians are reported beside it.
    median = {name: statistics.median(ts) for name, ts in times.items()}
    median_wall = {name: statistics.median(ts) for name, ts in wall.items()}
    # The DRGrad router + updater alone (what runs after backward), timed in isolation: less sensitive to load
    # than a difference of two step times.
    router_ms: dict[str, float] = {}
    for name, (_, method, _) in runs.items():
        if isinstance(method, DRGradRouter):
            reps = []
            with torch.no_grad():
                for _ in range(200):
                    c0 = time.process_time()
                    method._route(due=False)
                    reps.append(time.process_time() - c0)
            router_ms[name] = 1000 * statistics.median(reps)

    def paired(name: str, base: str) -> float:
        """Median over steps of t(method) / t(base) on the same batch, timed back to back."""
        return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))

    ratios: dict[str, float] = {}
    for name in median:
        if name != "equal" and "equal" in median:
            ratios[name] = paired(name, "equal")
        if name.startswith("drgrad") and "split_tower" in median and METHODS[name].get("drgrad", {}).get("split", 1):
            ratios[f"{name}_vs_split_tower"] = paired(name, "split_tower")
    for name in median:
        ms, ms_wall = 1000 * median[name], 1000 * median_wall[name]
        print(f"{name:<26} {ms:8.2f} ms/step CPU ({ms_wall:8.2f} wall)  ratio {ratios.get(name, 1.0):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(ratios, indent=2, sort_keys=True) + "\n")
    detail = {
        "cpu_ms_per_step_median": {k: 1000 * v for k, v in median.items()},
        "wall_ms_per_step_median": {k: 1000 * v for k, v in median_wall.items()},
        "drgrad_router_and_updater_ms_median": router_ms,
        "ratios": ratios,
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "sizes": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "steps_timed_per_method": args.rounds * args.batches,
        "wall_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "device": "cpu",
    }
    print(json.dumps(detail, indent=2))  # the details go into RESULTS.md; the JSON keeps {method: ratio}
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
