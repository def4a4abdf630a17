"""Step-time overhead of each gradient method over equal weights, on the same model and the same batches, one run.

    .venv/bin/python benchmarks/overhead.py --out benchmarks/results/overhead.json

Model: the pipeline's pieces on the behaviour-log spec (``configs/features/behaviour_logs.yaml``): TorchRec
``SparseArch`` sharded by ``DistributedModelParallel`` (one gloo process, fused row-wise Adagrad tables), the plain
bottom, the ``MMoE`` top with the default sizes (4 experts [64]), and the DRGrad head (towers [32] -> 1; ``split:
false`` is plain MMoE); the pipeline's ``MultiTaskLoss`` (ctr, ESMM cvr, dwell given ctr) and the dense Adam. Batches:
``--batches`` batches of ``--batch-size`` rows of the built-in generator's logs, transformed once up front; every
method runs the same list.

A step is forward + losses + ``method.backward`` + optimizer step (what the train loop does). Methods run interleaved
step by step over ``--rounds`` passes of the batches (so machine load hits all of them alike); the per-step time is
the median over all timed steps, in CPU time of the process (one compute thread; on a shared machine wall-clock time
mostly measures other users' load), with wall-clock medians printed beside. The DRGrad router + updater (the work
after backward) is also timed on its own. Ratios are medians of per-step ratios (method / baseline on the same batch,
timed back to back), which cancels most of the drift in machine load.
Ratios are against equal weights on the *same* model: the plain MMoE model for ``uncertainty`` and ``pcgrad``, the
split-tower model for the DRGrad variants; ``drgrad_paper_vs_mmoe`` compares the full DRGrad (extra tower included)
with plain MMoE, the comparison behind the paper's +1.5 %.
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
from torch import nn

from mtrec.config import GeneratorConfig
from mtrec.features.batch import Batch
from mtrec.features.generator import generate_logs
from mtrec.features.spec import FeatureSpec, load_feature_spec
from mtrec.features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from mtrec.models.drgrad import SplitTowerHead
from mtrec.models.embeddings import SparseArch
from mtrec.models.gradients import (
    DRGradRouter,
    GradientConfig,
    GradientMethod,
    build_gradient_method,
    build_split_head,
)
from mtrec.models.multitask import MultiTaskLoss, PlainBottom
from mtrec.models.sharding import dense_optimizer, embedding_sharders, shard_model
from mtrec.models.tops import MMoE

SPEC = Path(__file__).resolve().parents[1] / "configs/features/behaviour_logs.yaml"

#: name -> (gradients section, baseline it is compared with)
METHODS: dict[str, tuple[dict[str, Any], str | None]] = {
    "equal": ({"method": "equal", "drgrad": {"split": False}}, None),
    "uncertainty": ({"method": "uncertainty", "drgrad": {"split": False}}, "equal"),
    "pcgrad": ({"method": "pcgrad", "drgrad": {"split": False}}, "equal"),
    "equal_split": ({"method": "equal", "drgrad": {"router": False, "updater": "none"}}, None),
    "drgrad_paper": ({"method": "drgrad"}, "equal_split"),
    "drgrad_paper_all_layers": ({"method": "drgrad", "drgrad": {"router_scope": "all_layers"}}, "equal_split"),
    "drgrad_code": ({"method": "drgrad", "drgrad": {"mode": "code"}}, "equal_split"),
    "drgrad_per_sample": (
        {"method": "drgrad", "drgrad": {"per_sample": True, "router": False, "updater": "none"}},
        "equal_split",
    ),
}


class BenchModel(nn.Module):
    """SparseArch -> plain bottom -> MMoE -> DRGrad head; primary = the spec's first task."""

    def __init__(self, spec: FeatureSpec, cfg: GradientConfig, experts: int, expert_mlp: list[int], tower: list[int]):
        super().__init__()
        tasks = [t.name for t in spec.tasks]
        self.tasks = tasks
        self.sparse = SparseArch(spec, torch.device("meta"))
        self.bottom = PlainBottom(spec, self.sparse.field_dims, self.sparse.sequence_dim)
        self.top = MMoE(self.bottom.out_dim, len(tasks), experts, expert_mlp, device=torch.device("meta"))
        self.head: SplitTowerHead = build_split_head(
            cfg.drgrad, expert_mlp[-1], tower, tasks, device=torch.device("meta")
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        hidden = self.top(self.bottom(self.sparse(batch.sparse), batch.dense))
        if self.head.per_sample:  # every auxiliary tower reads v_s = mean of the auxiliary gates (one fork)
            v_s = torch.stack(hidden[1:]).mean(0)
            return self.head(hidden[0], v_s)
        return self.head.forward_task_inputs(hidden)


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
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--expert-mlp", type=int, nargs="+", default=[64])
    parser.add_argument("--tower", type=int, nargs="+", default=[32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
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
    runs: dict[str, tuple[nn.Module, GradientMethod, Any]] = {}
    for name in args.methods:
        cfg = GradientConfig.model_validate(METHODS[name][0])
        torch.manual_seed(0)
        dmp, _ = shard_model(
            BenchModel(spec, cfg, args.experts, args.expert_mlp, args.tower),
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
    for name, (_, base) in METHODS.items():
        if name in median and base is not None and base in median:
            ratios[name] = paired(name, base)
    if "drgrad_paper" in median and "equal" in median:
        ratios["drgrad_paper_vs_mmoe"] = paired("drgrad_paper", "equal")
    if "equal_split" in median and "equal" in median:
        ratios["split_tower_model_vs_mmoe"] = paired("equal_split", "equal")
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
        "sizes": {k: v for k, v in vars(args).items() if k != "out"},
        "steps_timed_per_method": args.rounds * args.batches,
        "wall_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "device": "cpu",
    }
    print(json.dumps(detail, indent=2))  # the details go into RESULTS.md; the JSON keeps {method: ratio}
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
