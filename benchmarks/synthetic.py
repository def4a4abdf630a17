"""MMoE synthetic benchmark (method spec, section 4): MMoE, Split-MMoE, DRGrad variants and PCGrad side by side.

    .venv/bin/python benchmarks/synthetic.py --n-train 10000 --ps -0.5 0.9 --seeds 0 1 2 \
        --out benchmarks/results/synthetic.json

Model: the pipeline's ``MMoE`` top (``mtrec.models.tops``; 8 experts of one 16-unit layer over the 512-d input, one
gate per task) under the DRGrad head (``mtrec.models.drgrad.SplitTowerHead``; towers [8] -> 1). ``split: false`` is
plain MMoE (T1 on gate 1, T2 on gate 2). Gradients through ``mtrec.models.gradients.build_gradient_method``.

Paired design (the spec: re-drawing initial weights alone moves results by up to 0.03): for a given (p, seed) every
method sees the same data, the same batch order and the same initial weights (experts, gates, and T1' / T2; T1'' has
its own seeded draw, identical across split methods). Train Adam 1e-3, batch 128, equal loss weights, ``--epochs``
epochs; the reported test AUC is the one at the epoch with the best mean validation AUC of the two tasks.

Output JSON: ``{p: {method: {task: {auc_mean, auc_std, n_seeds}}}}`` plus ``_ceiling`` (the noiseless score's AUC),
``_paired`` (mean and wins of each method minus MMoE, per task), ``_diagnostics`` (DRGrad mu and conflict share at
the end) and ``_meta`` (sizes, command, wall time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from mtrec.features.synthetic import make_synthetic
from mtrec.models.gradients import GradientConfig, build_gradient_method, build_split_head
from mtrec.models.tops import MMoE

TASKS = ["task1", "task2"]  # task1 is the primary (DRGrad's split tower)

#: method -> gradients section. ``split`` lives in drgrad (the head is built from it); baselines use split: false.
METHODS: dict[str, dict[str, Any]] = {
    "mmoe": {"method": "equal", "drgrad": {"split": False}},
    "split_mmoe": {"method": "equal", "drgrad": {"split": True, "router": False, "updater": "none"}},
    "drgrad_paper_sum": {"method": "drgrad", "drgrad": {"updater": "sum"}},
    "drgrad_paper_ema": {"method": "drgrad", "drgrad": {"updater": "ema", "ema_decay": 0.99}},
    "pcgrad": {"method": "pcgrad", "drgrad": {"split": False}},
}


class Net(nn.Module):
    def __init__(self, cfg: GradientConfig, d: int, experts: int, expert_units: int, tower: list[int]) -> None:
        super().__init__()
        self.top = MMoE(d, len(TASKS), experts, [expert_units])
        self.head = build_split_head(cfg.drgrad, expert_units, tower, TASKS)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        v1, v2 = self.top([x, x])
        return self.head(v1, v2)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s))


def run_one(
    raw: dict[str, Any], data: Any, split_idx: tuple[slice, slice, slice], seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Train one method on one (p, seed) draw; test AUC per task at the best-validation epoch, and diagnostics."""
    cfg = GradientConfig.model_validate({**raw, "diagnostics_every": 25})
    d = data.x.shape[1]
    # Shared initial weights: the backbone from seed, the towers from seed + 1 drawn in a fixed order (T1', T1'', T2)
    # in a split reference head, copied into this method's head.
    torch.manual_seed(seed)
    model = Net(cfg, d, args.experts, args.expert_units, args.tower)
    torch.manual_seed(seed + 1)
    ref = build_split_head(GradientConfig().drgrad, args.expert_units, args.tower, TASKS)
    with torch.no_grad():
        model.head.own.load_state_dict(ref.own.state_dict())
        model.head.aux.load_state_dict(ref.aux.state_dict())
        if model.head.shared is not None:
            assert ref.shared is not None
            model.head.shared.load_state_dict(ref.shared.state_dict())
    method = build_gradient_method(cfg, model, TASKS)
    opt = torch.optim.Adam([*model.parameters(), *method.extra_parameters()], lr=args.lr)
    tr, va, te = split_idx
    x = torch.from_numpy(data.x)
    y = {"task1": torch.from_numpy(data.y1), "task2": torch.from_numpy(data.y2)}
    n_train = tr.stop - tr.start
    order_gen = torch.Generator().manual_seed(seed + 2)  # same batch order for every method
    best: tuple[float, dict[str, float]] = (-1.0, {})
    curve: list[dict[str, Any]] = []
    sampled: dict[str, list[float]] = {}
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n_train, generator=order_gen) + tr.start
        for i in range(0, n_train - args.batch_size + 1, args.batch_size):
            idx = perm[i : i + args.batch_size]
            out = model(x[idx])
            losses = {t: F.binary_cross_entropy_with_logits(out[t], y[t][idx]) for t in TASKS}
            opt.zero_grad()
            for k, v in method.backward(losses).items():
                sampled.setdefault(k, []).append(v)
            opt.step()
        model.eval()
        with torch.no_grad():
            scores = {s: model(x[sl]) for s, sl in (("val", va), ("test", te))}
        val = {t: _auc(y[t][va].numpy(), scores["val"][t].numpy()) for t in TASKS}
        test = {t: _auc(y[t][te].numpy(), scores["test"][t].numpy()) for t in TASKS}
        curve.append({"epoch": epoch, "val": val, "test": test})
        if np.mean(list(val.values())) > best[0]:
            best = (float(np.mean(list(val.values()))), test)
    diag = {f"mean_{k}": float(np.mean(v)) for k, v in sampled.items()}
    if model.head.shared is not None:
        diag["final_mu_own"] = float(model.head.mu[0])
    best_epoch = max(range(len(curve)), key=lambda e: float(np.mean(list(curve[e]["val"].values()))))
    return {"test": best[1], "best_epoch": best_epoch, "diag": diag}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-val", type=int, default=5_000)
    parser.add_argument("--n-test", type=int, default=20_000)
    parser.add_argument("--ps", type=float, nargs="+", default=[-0.5, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-units", type=int, default=16)
    parser.add_argument("--tower", type=int, nargs="+", default=[8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/synthetic.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    n = args.n_train + args.n_val + args.n_test
    split_idx = (
        slice(0, args.n_train),
        slice(args.n_train, args.n_train + args.n_val),
        slice(args.n_train + args.n_val, n),
    )
    results: dict[str, Any] = {}
    raw_runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    ceiling: dict[str, dict[str, float]] = {}
    for p in args.ps:
        key = f"{p:g}"
        raw_runs[key] = {m: [] for m in args.methods}
        ceil: dict[str, list[float]] = {"task1": [], "task2": []}
        for seed in args.seeds:
            data = make_synthetic(n, p=p, seed=seed)
            te = split_idx[2]
            ceil["task1"].append(_auc(data.y1[te], data.noiseless1[te]))
            ceil["task2"].append(_auc(data.y2[te], data.noiseless2[te]))
            for m in args.methods:
                t0 = time.perf_counter()
                r = run_one(METHODS[m], data, split_idx, seed, args)
                raw_runs[key][m].append(r)
                aucs = " ".join(f"{t}={r['test'][t]:.4f}" for t in TASKS)
                took = time.perf_counter() - t0
                print(f"p={key} seed={seed} {m:<18} {aucs} epoch={r['best_epoch']} ({took:.1f}s)", flush=True)
        ceiling[key] = {t: float(np.mean(v)) for t, v in ceil.items()}
        results[key] = {
            m: {
                t: {
                    "auc_mean": float(np.mean([r["test"][t] for r in runs])),
                    "auc_std": float(np.std([r["test"][t] for r in runs], ddof=1)) if len(runs) > 1 else 0.0,
                    "n_seeds": len(runs),
                }
                for t in TASKS
            }
            for m, runs in raw_runs[key].items()
        }
    paired: dict[str, Any] = {}
    if "mmoe" in args.methods:
        for key, by_method in raw_runs.items():
            paired[key] = {}
            base = by_method["mmoe"]
            for m, runs in by_method.items():
                if m == "mmoe":
                    continue
                paired[key][m] = {}
                for t in TASKS:
                    diff = [r["test"][t] - b["test"][t] for r, b in zip(runs, base, strict=True)]
                    paired[key][m][t] = {
                        "mean_diff_vs_mmoe": float(np.mean(diff)),
                        "wins": int(sum(x > 0 for x in diff)),
                        "n": len(diff),
                    }
    out = {
        **results,
        "_ceiling": ceiling,
        "_paired": paired,
        "_diagnostics": {
            key: {m: [r["diag"] for r in runs] for m, runs in by_method.items() if runs and runs[0]["diag"]}
            for key, by_method in raw_runs.items()
        },
        "_meta": {
            "command": "python benchmarks/synthetic.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "sizes": {k: v for k, v in vars(args).items() if k != "out"},
            "wall_seconds": time.perf_counter() - started,
            "torch": torch.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
