"""MMoE synthetic benchmark (the MMoE paper's protocol): MMoE, Split-MMoE, DRGrad variants and PCGrad side by side.

    .venv/bin/python benchmarks/synthetic.py --n-train 10000 --ps -0.5 0.9 --seeds 0 1 2 \
        --out benchmarks/results/synthetic.json

Model: the pipeline's ``MMoE`` top (``models.tops``; 8 experts of one 16-unit layer over the 512-d input, one
gate per task) under the DRGrad head (``models.drgrad.SplitTowerHead``; towers [8] -> 1). ``split: false`` is
plain MMoE (T1 on gate 1, T2 on gate 2). Gradients through ``models.gradients.build_gradient_method``.

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

from features.synthetic import make_synthetic
from models.gradients import GradientConfig, build_gradient_method, build_split_head
from models.tops import MMoE

TASKS = ["task1", "task2"]  # task1 is the primary (DRGrad's split tower)

#: method -> gradients section. ``split`` lives in drgrad (the head is built from it); baselines use split: false.
_EMA = {"updater": "ema", "ema_decay": 0.99}
METHODS: dict[str, dict[str, Any]] = {
    # baselines
    "mmoe": {"method": "equal", "drgrad": {"split": False}},
    "split_mmoe": {"method": "equal", "drgrad": {"split": True, "router": False, "updater": "none"}},
    "pcgrad": {"method": "pcgrad", "drgrad": {"split": False}},
    # DRGrad as printed: paper router + the three updaters; the authors' code (symmetric first-layer routing)
    "drgrad_paper_sum": {"method": "drgrad", "drgrad": {"updater": "sum"}},
    "drgrad_paper_mean": {"method": "drgrad", "drgrad": {"updater": "mean"}},
    "drgrad_paper_ema": {"method": "drgrad", "drgrad": _EMA},
    "drgrad_code": {"method": "drgrad", "drgrad": {"mode": "code", "split": False}},
    # variants aimed at the flaws (on the EMA updater, which does not collapse)
    "drgrad_tied": {"method": "drgrad", "drgrad": {**_EMA, "tied_init": True}},
    "split_mmoe_tied": {
        "method": "equal",
        "drgrad": {"split": True, "router": False, "updater": "none", "tied_init": True},
    },
    "drgrad_all_layers": {"method": "drgrad", "drgrad": {**_EMA, "router_scope": "all_layers"}},
    "drgrad_gamma0.5": {"method": "drgrad", "drgrad": {**_EMA, "gamma": 0.5}},
    "drgrad_gamma2": {"method": "drgrad", "drgrad": {**_EMA, "gamma": 2.0}},
    # our extension: per-sample router on d loss / d v_s (no parameter routing)
    "per_sample_pcgrad": {
        "method": "drgrad",
        "drgrad": {"router": False, "updater": "none", "per_sample": True, "per_sample_rule": "pcgrad"},
    },
    "per_sample_drgrad": {
        "method": "drgrad",
        "drgrad": {"router": False, "updater": "none", "per_sample": True, "per_sample_rule": "drgrad"},
    },
    "per_sample_project_aux": {
        "method": "drgrad",
        "drgrad": {"router": False, "updater": "none", "per_sample": True, "per_sample_rule": "project_aux"},
    },
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
    if cfg.drgrad.tied_init:
        model.head.tie_towers_()  # the copy above replaced the tied weights: tie again (T1' -> T1'', T2)
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


def _paired(runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per task: mean, standard error and wins of ``runs - base`` over the seeds both have."""
    by_seed = {b["seed"]: b for b in base}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    out: dict[str, dict[str, float | int]] = {}
    for t in TASKS:
        diff = np.array([r["test"][t] - b["test"][t] for r, b in pairs])
        if diff.size == 0:
            continue
        se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
        out[t] = {"mean_diff": float(diff.mean()), "se": se, "wins": int((diff > 0).sum()), "n": int(diff.size)}
    return out


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The checked-in JSON from per-run records: ``{p: {method: {task: {auc_mean, auc_std, n_seeds}}}}`` plus
    ``_ceiling``, ``_paired`` (each method minus ``mmoe`` and minus ``split_mmoe``, same seeds) and ``_diagnostics``."""
    by_p: dict[str, dict[str, list[dict[str, Any]]]] = {}
    ceiling: dict[str, dict[str, list[float]]] = {}
    for r in records:
        by_p.setdefault(r["p"], {}).setdefault(r["method"], []).append(r)
        ceiling.setdefault(r["p"], {}).setdefault(str(r["seed"]), r["ceiling"])
    results: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    for key in sorted(by_p, key=float):
        methods = {m: by_p[key][m] for m in METHODS if m in by_p[key]}
        results[key] = {
            m: {
                t: {
                    "auc_mean": float(np.mean([r["test"][t] for r in runs])),
                    "auc_std": float(np.std([r["test"][t] for r in runs], ddof=1)) if len(runs) > 1 else 0.0,
                    "n_seeds": len(runs),
                }
                for t in TASKS
            }
            for m, runs in methods.items()
        }
        paired[key] = {
            f"{m}-{b}": _paired(runs, methods[b])
            for b in ("mmoe", "split_mmoe")
            if b in methods
            for m, runs in methods.items()
            if m != b
        }
        diagnostics[key] = {
            m: {k: float(np.mean([r["diag"][k] for r in runs if k in r["diag"]])) for k in runs[0]["diag"]}
            for m, runs in methods.items()
            if runs[0]["diag"]
        }
    ceilings = {
        key: {t: float(np.mean([c[t] for c in per_seed.values()])) for t in TASKS} for key, per_seed in ceiling.items()
    }
    return {**results, "_ceiling": ceilings, "_paired": paired, "_diagnostics": diagnostics}


def markdown(out: dict[str, Any]) -> str:
    """Per p: AUC per task (mean ± std over seeds) and the paired difference against MMoE (mean ± standard error,
    wins / seeds), with the noiseless-score ceiling."""
    lines: list[str] = []
    for key in [k for k in out if not k.startswith("_")]:
        ceil = out["_ceiling"][key]
        lines += [
            f"p = {key} (ceiling: task1 {ceil['task1']:.4f}, task2 {ceil['task2']:.4f})",
            "",
            "| method | task1 AUC | task2 AUC | task1 − MMoE | task2 − MMoE |",
            "|---|---|---|---|---|",
        ]
        for m, row in out[key].items():
            cells = [f"{row[t]['auc_mean']:.4f} ± {row[t]['auc_std']:.4f}" for t in TASKS]
            pair = out["_paired"].get(key, {}).get(f"{m}-mmoe", {})
            diffs = [
                f"{d['mean_diff']:+.4f} ± {d['se']:.4f} ({d['wins']}/{d['n']})" if (d := pair.get(t)) else ""
                for t in TASKS
            ]
            lines.append(f"| {m} | {cells[0]} | {cells[1]} | {diffs[0]} | {diffs[1]} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-val", type=int, default=5_000)
    parser.add_argument("--n-test", type=int, default=20_000)
    parser.add_argument("--ps", type=float, nargs="+", default=[-0.5, 0.0, 0.5, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-units", type=int, default=16)
    parser.add_argument("--tower", type=int, nargs="+", default=[8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/synthetic.json"))
    parser.add_argument("--report", action="store_true", help="only rebuild OUT from the runs file and print tables")
    parser.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="per-run JSON lines (default: OUT with .runs.jsonl); runs already there are skipped, so several "
        "invocations (other ps / methods) add up and an interrupted one resumes",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs_path = args.runs or args.out.with_suffix(".runs.jsonl")
    records: list[dict[str, Any]] = []
    if runs_path.exists():
        records = [json.loads(line) for line in runs_path.read_text().splitlines() if line.strip()]
    done = {(r["p"], r["seed"], r["method"]) for r in records}
    if args.report:
        args.ps, args.seeds = [], []
    n = args.n_train + args.n_val + args.n_test
    split_idx = (
        slice(0, args.n_train),
        slice(args.n_train, args.n_train + args.n_val),
        slice(args.n_train + args.n_val, n),
    )
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    for p in args.ps:
        key = f"{p:g}"
        for seed in args.seeds:
            todo = [m for m in args.methods if (key, seed, m) not in done]
            if not todo:
                continue
            data = make_synthetic(n, p=p, seed=seed)
            te = split_idx[2]
            ceil = {"task1": _auc(data.y1[te], data.noiseless1[te]), "task2": _auc(data.y2[te], data.noiseless2[te])}
            for m in todo:
                t0 = time.perf_counter()
                r = run_one(METHODS[m], data, split_idx, seed, args)
                took = time.perf_counter() - t0
                rec = {"p": key, "seed": seed, "method": m, "ceiling": ceil, "seconds": took, **r}
                records.append(rec)
                with runs_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                aucs = " ".join(f"{t}={r['test'][t]:.4f}" for t in TASKS)
                print(f"p={key} seed={seed} {m:<18} {aucs} epoch={r['best_epoch']} ({took:.1f}s)", flush=True)
    out = aggregate(records)
    out["_meta"] = {
        "command": "python benchmarks/synthetic.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "sizes": {k: v for k, v in vars(args).items() if k not in ("out", "runs", "ps", "seeds", "methods")},
        "runs_file": str(runs_path),
        "wall_seconds_this_invocation": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(markdown(out))
    print(f"wrote {args.out} ({len(records)} runs) in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
