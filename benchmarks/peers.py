"""Peers side by side on the same Census split: our MMoE / PLE against torch-rechub's MMOE / PLE, AUC and training
samples/s in one run.

    .venv/bin/pip install --no-deps -r requirements/bench.txt   # once: torch-rechub (benchmark only)
    .venv/bin/python benchmarks/peers.py --seeds 0 1 2 --epochs 4 --batch-size 1024

Data: the converter's Parquet (``python -m features.census``): ``runs/census/data/dt=1994-01-01`` trains,
``dt=1994-01-02`` validates, ``dt=1994-01-03`` tests. Both sides read the same inputs: every categorical column
hashed into its spec table exactly as our ``BatchTransform`` does (so the peer's ``SparseFeature`` vocabulary is the
table's ``num_buckets`` and its ``embed_dim`` the table's ``dim``), and the dense features transformed and
standardised with our train-split stats.

Models (all built under ``torch.manual_seed(seed)``):

* ``mtrec_mmoe``: the ``model:`` section of ``configs/experiments/census.yaml`` (MMoE, 8 experts [64], towers [32]),
  trained with ``pipeline.local.train_local`` (Adam on dense layers at ``--lr``, Adagrad on the tables at
  ``--embedding-lr``: the pipeline's split).
* ``mtrec_ple``: the same with ``top: ple`` and the ``ple:`` section of ``configs/experiments/ple.yaml``
  (2 levels, 1 task expert + 2 shared experts per level, experts [64]).
* ``rechub_mmoe`` / ``rechub_ple``: ``torch_rechub.models.multi_task.MMOE`` / ``PLE`` with the same expert, level
  and tower sizes, trained by ``torch_rechub.trainers.MTLTrainer.train_one_epoch`` (its own loop: one Adam at
  ``--lr`` over every parameter, weight decay 1e-5 as its default; mean of the task BCE losses) on its own
  ``TorchDataset`` + shuffled ``DataLoader``. One workaround: torch-rechub's ``EmbeddingLayer`` concatenates the
  [B, 1, dim] field embeddings before flattening, so it needs one ``embed_dim`` for every field (its own TODO);
  Census's spec mixes 4 and 8, so the models' embedding layer is swapped for a subclass that flattens each field
  first (same tables, same vector when the dims agree).
* ``mtrec_mmoe_adam``: a control, ``mtrec_mmoe`` with Adam at ``--lr`` on the tables too (the peer's optimizer, less
  its weight decay), to separate the optimizer split from the models.

For the peers, one more untimed pass over their DataLoader after training says how much of an epoch is its
per-sample collation (``loader_s_per_epoch``).

Per seed the models run interleaved (ours, theirs, ours, theirs, control). After every epoch each model scores
validation and test; a model's test AUC (sklearn ``roc_auc_score``) is taken at the epoch with the best mean
validation AUC over the two tasks. samples/s counts training-loop time only (evaluation excluded; for ours
``train_local``'s wall time minus the evaluation callback, which leaves in its model build and output-bias
initialisation, a few ms). Everything runs on one thread (``--threads``).

Writes ``--out`` (default ``benchmarks/results/peers.json``)::

    {"<model>": {"income": {"auc_mean", "auc_std", "n_seeds"}, "never_married": {...},
                 "samples_per_s_mean", "samples_per_s_std", "params": {"embeddings", "dense", "total"}},
     "_meta": {"command", "settings", "versions", "wall_s", "runs": [per-seed values]}}

and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader
from torch_rechub.basic.features import DenseFeature, SparseFeature
from torch_rechub.basic.layers import EmbeddingLayer
from torch_rechub.models.multi_task import MMOE, PLE
from torch_rechub.trainers import MTLTrainer
from torch_rechub.utils.data import TorchDataset

from features.batch import Batch
from features.spec import FeatureSpec, load_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.multitask import MultiTaskModel, parameter_report
from pipeline.local import train_local

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs/features/census.yaml"
EXPERIMENTS = REPO / "configs/experiments"
LOGS = REPO / "runs/census/data"
SPLITS = {"train": "dt=1994-01-01", "validation": "dt=1994-01-02", "test": "dt=1994-01-03"}
MODELS = ["mtrec_mmoe", "rechub_mmoe", "mtrec_ple", "rechub_ple", "mtrec_mmoe_adam"]
EVAL_CHUNK = 8192


@dataclass
class Split:
    """One split in both libraries' input formats."""

    ids: np.ndarray  # [K, n] int64: hashed ids, spec.sparse order
    dense: np.ndarray  # [n, D] float32: transformed and standardised
    labels: np.ndarray  # [n, T] float32: spec.tasks order
    batches: list[Batch]  # our eval batches (chunks of EVAL_CHUNK rows)

    @property
    def rows(self) -> int:
        return self.labels.shape[0]

    def rechub_x(self, spec: FeatureSpec) -> dict[str, np.ndarray]:
        x = {f.name: self.ids[k] for k, f in enumerate(spec.sparse)}
        x.update({f.name: self.dense[:, j] for j, f in enumerate(spec.dense)})
        return x


def load_split(path: Path, transform: BatchTransform, spec: FeatureSpec) -> tuple[Any, Split]:
    table = pq.read_table(path, columns=transform.required_columns())
    kjt = transform.sparse(table)
    if not bool((kjt.lengths() == 1).all()):
        raise ValueError(f"{path}: every categorical feature should have exactly one id per row")
    ids = kjt.values().numpy().astype(np.int64).reshape(len(spec.sparse), table.num_rows)
    labels = transform.labels_numpy(table)
    split = Split(
        ids=ids,
        dense=transform.dense_numpy(table),
        labels=np.stack([labels[t.name] for t in spec.tasks], axis=1),
        batches=[transform(table.slice(s, EVAL_CHUNK)) for s in range(0, table.num_rows, EVAL_CHUNK)],
    )
    return table, split


def aucs(spec: FeatureSpec, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {t.name: float(roc_auc_score(labels[:, i], scores[:, i])) for i, t in enumerate(spec.tasks)}


# ---- ours ----------------------------------------------------------------------------------------------------------
def our_configs() -> dict[str, ModelConfig]:
    census = yaml.safe_load((EXPERIMENTS / "census.yaml").read_text())["model"]
    ple = {k: v for k, v in census.items() if k != "mmoe"}
    ple.update(top="ple", ple=yaml.safe_load((EXPERIMENTS / "ple.yaml").read_text())["model"]["ple"])
    return {"mtrec_mmoe": ModelConfig.model_validate(census), "mtrec_ple": ModelConfig.model_validate(ple)}


def our_scores(model: MultiTaskModel, split: Split) -> np.ndarray:
    with torch.no_grad():
        parts = [torch.stack([torch.sigmoid(model(b)[n]) for n in model.task_names], dim=1) for b in split.batches]
    return torch.cat(parts).numpy()


def run_ours(
    cfg: ModelConfig,
    spec: FeatureSpec,
    stats: Any,
    train: Any,
    data: dict[str, Split],
    args: argparse.Namespace,
    seed: int,
    embedding_optimizer: Literal["adagrad", "adam"] = "adagrad",
) -> dict[str, Any]:
    epochs: list[dict[str, Any]] = []
    eval_s = 0.0

    def on_epoch(epoch: int, model: MultiTaskModel) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        epochs.append(
            {split: aucs(spec, data[split].labels, our_scores(model, data[split])) for split in ("validation", "test")}
        )
        eval_s += time.perf_counter() - t

    t0 = time.perf_counter()
    model = train_local(
        spec,
        cfg,
        stats,
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        dense_lr=args.lr,
        embedding_lr=args.embedding_lr if embedding_optimizer == "adagrad" else args.lr,
        seed=seed,
        embedding_optimizer=embedding_optimizer,
        max_steps=args.max_steps,
        on_epoch=on_epoch,
    )
    train_s = time.perf_counter() - t0 - eval_s
    steps = train.num_rows // args.batch_size * len(epochs)
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    report = parameter_report(model, spec, cfg)
    params = {"embeddings": int(report["embeddings"]), "dense": int(report["dense"]), "total": int(report["total"])}
    return finish(epochs, steps * args.batch_size, train_s, params)


# ---- torch-rechub --------------------------------------------------------------------------------------------------
class FlatEmbeddingLayer(EmbeddingLayer):
    """torch-rechub's ``EmbeddingLayer`` with mixed ``embed_dim``s: flattens each field's embedding before the
    concatenation (the library concatenates [B, 1, dim] along the field axis first, which needs one dim for all).
    Same tables (the features' cached ``nn.Embedding``s), same output as the library's when the dims agree."""

    def forward(self, x: dict[str, torch.Tensor], features: list[Any], squeeze_dim: bool = False) -> torch.Tensor:
        if not squeeze_dim:
            return super().forward(x, features, squeeze_dim)
        sparse, dense = [], []
        for fea in features:
            if isinstance(fea, SparseFeature):
                sparse.append(self.embed_dict[fea.shared_with or fea.name](x[fea.name].long()))
            elif isinstance(fea, DenseFeature):
                dense.append(x[fea.name].float().reshape(x[fea.name].shape[0], -1))
            else:
                raise TypeError(f"FlatEmbeddingLayer: unsupported feature {fea!r}")
        return torch.cat(sparse + dense, dim=1)


def rechub_model(name: str, spec: FeatureSpec, cfg: ModelConfig) -> nn.Module:
    """The peer model with our config's sizes (built under the caller's seed)."""
    features: list[Any] = [
        SparseFeature(f.name, vocab_size=spec.table(f.table).num_buckets, embed_dim=spec.table(f.table).dim)
        for f in spec.sparse
    ] + [DenseFeature(f.name) for f in spec.dense]
    task_types = ["classification"] * len(spec.tasks)
    towers = [{"dims": list(cfg.tower_mlp)} for _ in spec.tasks]
    model: nn.Module
    if name == "rechub_mmoe":
        expert = {"dims": list(cfg.mmoe.expert_mlp)}
        model = MMOE(features, task_types, cfg.mmoe.num_experts, expert_params=expert, tower_params_list=towers)
    else:
        p = cfg.ple
        model = PLE(
            features,
            task_types,
            n_level=p.num_levels,
            n_expert_specific=p.task_experts,
            n_expert_shared=p.shared_experts,
            expert_params={"dims": list(p.expert_mlp)},
            tower_params_list=towers,
        )
    if len({fea.embed_dim for fea in features if isinstance(fea, SparseFeature)}) > 1:
        model.embedding = FlatEmbeddingLayer(features)  # reuses the tables the model just built
    return model


def rechub_scores(model: nn.Module, x: dict[str, torch.Tensor], rows: int) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        parts = [model({k: v[s : s + EVAL_CHUNK] for k, v in x.items()}) for s in range(0, rows, EVAL_CHUNK)]
    return torch.cat(parts).numpy()


def run_rechub(
    name: str, cfg: ModelConfig, spec: FeatureSpec, data: dict[str, Split], args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = rechub_model(name, spec, cfg)
    train = data["train"]
    dataset = TorchDataset(train.rechub_x(spec), train.labels)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    evals = {s: {k: torch.from_numpy(v) for k, v in data[s].rechub_x(spec).items()} for s in ("validation", "test")}
    with tempfile.TemporaryDirectory(prefix="peers-rechub-") as tmp:
        trainer = MTLTrainer(
            model,
            task_types=["classification"] * len(spec.tasks),
            optimizer_params={"lr": args.lr, "weight_decay": 1e-5},
            n_epoch=args.epochs,
            device="cpu",
            model_path=tmp,
        )
    epochs: list[dict[str, Any]] = []
    train_s = 0.0
    samples = 0
    remaining = len(loader) * args.epochs if args.max_steps is None else args.max_steps
    for _ in range(args.epochs):
        steps = min(remaining, len(loader))  # --max-steps counts steps over all epochs, as train_local does
        t = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            trainer.train_one_epoch(itertools.islice(loader, steps))  # tqdm bar and loss print silenced
        train_s += time.perf_counter() - t
        samples += min(steps * args.batch_size, len(dataset))
        remaining -= steps
        epochs.append({s: aucs(spec, data[s].labels, rechub_scores(model, evals[s], data[s].rows)) for s in evals})
        if remaining == 0:
            break
    t = time.perf_counter()
    for _ in loader:  # after training, not timed in it: how much of an epoch is the DataLoader's collation
        pass
    loader_s = time.perf_counter() - t
    embeddings = sum(p.numel() for p in model.embedding.parameters())
    total = sum(p.numel() for p in model.parameters())
    params = {"embeddings": embeddings, "dense": total - embeddings, "total": total}
    return {**finish(epochs, samples, train_s, params), "loader_s_per_epoch": loader_s}


# ---- common --------------------------------------------------------------------------------------------------------
def finish(epochs: list[dict[str, Any]], samples: int, train_s: float, params: dict[str, int]) -> dict[str, Any]:
    best = max(range(len(epochs)), key=lambda e: statistics.fmean(epochs[e]["validation"].values()))
    return {
        "best_epoch": best + 1,
        "validation": epochs[best]["validation"],
        "test": epochs[best]["test"],
        "validation_mean_by_epoch": [round(statistics.fmean(e["validation"].values()), 5) for e in epochs],
        "train_samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / train_s,
        "params": params,
    }


def summarise(runs: list[dict[str, Any]], spec: FeatureSpec, models: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in models:
        out[m] = {}
        for t in spec.tasks:
            v = [r["models"][m]["test"][t.name] for r in runs]
            out[m][t.name] = {
                "auc_mean": statistics.fmean(v),
                "auc_std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "n_seeds": len(v),
            }
        sps = [r["models"][m]["samples_per_s"] for r in runs]
        out[m]["samples_per_s_mean"] = statistics.fmean(sps)
        out[m]["samples_per_s_std"] = statistics.stdev(sps) if len(sps) > 1 else 0.0
        out[m]["params"] = runs[0]["models"][m]["params"]
        if "loader_s_per_epoch" in runs[0]["models"][m]:
            loader = statistics.fmean(r["models"][m]["loader_s_per_epoch"] for r in runs)
            epoch = statistics.fmean(
                r["models"][m]["train_s"] / len(r["models"][m]["validation_mean_by_epoch"]) for r in runs
            )
            out[m]["loader_s_per_epoch_mean"] = loader
            out[m]["train_s_per_epoch_mean"] = epoch
    return out


def markdown(summary: dict[str, Any], spec: FeatureSpec, models: list[str]) -> str:
    tasks = [t.name for t in spec.tasks]
    lines = [
        "| model | " + " | ".join(f"{t} test AUC" for t in tasks) + " | train samples/s | params dense | params emb |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for m in models:
        s = summary[m]
        cells = [f"{s[t]['auc_mean']:.4f} ± {s[t]['auc_std']:.4f}" for t in tasks]
        sps = f"{s['samples_per_s_mean']:,.0f} ± {s['samples_per_s_std']:,.0f}"
        p = s["params"]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {sps} | {p['dense']:,} | {p['embeddings']:,} |")
    for m in models:
        if "loader_s_per_epoch_mean" in summary[m]:
            s = summary[m]
            lines.append(
                f"\n{m}: {s['train_s_per_epoch_mean']:.1f} s per training epoch, of which iterating its DataLoader "
                f"alone (per-sample TorchDataset + default collate) takes {s['loader_s_per_epoch_mean']:.1f} s"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, both sides (ours: dense layers)")
    parser.add_argument("--embedding-lr", type=float, default=0.05, help="ours: Adagrad on the tables")
    parser.add_argument("--max-steps", type=int, default=None, help="smoke test: stop every model after N steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/peers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = load_feature_spec(SPEC)
    train_table = pq.read_table(LOGS / SPLITS["train"])
    stats = dense_stats_from_moments([compute_dense_moments(train_table, spec)], spec)
    transform = BatchTransform(spec, stats)
    data: dict[str, Split] = {}
    for name, part in SPLITS.items():
        table, data[name] = load_split(LOGS / part, transform, spec)
        if name == "train":
            train_table = table
    print(f"rows: {', '.join(f'{k} {v.rows:,}' for k, v in data.items())} ({time.perf_counter() - started:.0f} s)")
    configs = our_configs()
    runners: dict[str, Callable[[int], dict[str, Any]]] = {
        "mtrec_mmoe": lambda s: run_ours(configs["mtrec_mmoe"], spec, stats, train_table, data, args, s),
        "mtrec_ple": lambda s: run_ours(configs["mtrec_ple"], spec, stats, train_table, data, args, s),
        "mtrec_mmoe_adam": lambda s: run_ours(
            configs["mtrec_mmoe"], spec, stats, train_table, data, args, s, embedding_optimizer="adam"
        ),
        "rechub_mmoe": lambda s: run_rechub("rechub_mmoe", configs["mtrec_mmoe"], spec, data, args, s),
        "rechub_ple": lambda s: run_rechub("rechub_ple", configs["mtrec_ple"], spec, data, args, s),
    }
    runs = []
    for seed in args.seeds:
        run: dict[str, Any] = {"seed": seed, "models": {}}
        for m in args.models:
            r = runners[m](seed)
            run["models"][m] = r
            test = " ".join(f"{k} {v:.4f}" for k, v in r["test"].items())
            print(
                f"[seed {seed}] {m:<12} test {test} (epoch {r['best_epoch']}) {r['samples_per_s']:,.0f} samples/s "
                f"train {r['train_s']:.1f} s",
                flush=True,
            )
        runs.append(run)
    summary = summarise(runs, spec, args.models)
    wall = time.perf_counter() - started
    summary["_meta"] = {
        "command": " ".join([".venv/bin/python", "benchmarks/peers.py", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "configs": {k: v.model_dump() for k, v in configs.items()},
        "splits": {k: {"partition": SPLITS[k], "rows": v.rows} for k, v in data.items()},
        "versions": {"torch": torch.__version__, "torch-rechub": version("torch-rechub")},
        "wall_s": round(wall, 1),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(markdown(summary, spec, args.models))
    print(f"\nwall time {wall:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
