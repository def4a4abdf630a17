"""Scale: 20.4M embedding rows across tables, trained by 1 worker (tables whole) and over 2 Ray Train workers with
the 12M-row item table row-wise sharded; peak memory per worker, samples/s, and end-to-end over model-only
throughput, all in one run.

    .venv/bin/python benchmarks/scale.py --rows-per-day 100000 --days 2

Writes benchmarks/results/scale.json:
{"rows_total": int, "workers": {"1": {"samples_per_s", "peak_rss_gb"}, "2": {...}}, "e2e_over_model_only": float}
(the ratio is the 2-worker one; both are in "detail").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from train_throughput import REPO, prepare, run_side  # sibling script: benchmarks/ is on sys.path when run

from pipeline.config import ExperimentConfig

SCALE_SPEC = REPO / "configs" / "features" / "behaviour_logs_scale.yaml"
# The item table (12M of the 20.4M rows) is pinned row-wise; on CPU this TorchRec build offers no row-wise kernel for
# the pooled (EmbeddingBagCollection) tables, so the planner places those.
ROW_WISE_TABLES = ("item",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-per-day", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    args = parser.parse_args()

    detail: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, ingested = prepare(
            Path(tmp),
            REPO / "configs" / "experiments" / "demo.yaml",
            [
                f"features={SCALE_SPEC}",
                f"generator.num_days={args.days + 1}",
                f"generator.impressions_per_day={args.rows_per_day}",
                f"train.batch_size={args.batch_size}",
            ],
        )
        row_wise = {t: ["row_wise"] for t in ROW_WISE_TABLES}
        rows_total = sum(t.num_buckets for t in cfg.feature_spec().tables)
        for workers in (1, 2):
            # Row-wise needs 2+ workers; one worker holds every table whole (the planner's choice).
            sharding = {"tables": row_wise} if workers > 1 else {}
            wcfg = ExperimentConfig.model_validate(
                {**cfg.model_dump(), "train": {**cfg.train.model_dump(), "num_workers": workers, "sharding": sharding}}
            )
            e2e = run_side(wcfg, ingested.train_files, ingested.stats, "e2e", args.warmup)
            model = run_side(wcfg, ingested.train_files, ingested.stats, "model", args.warmup)
            detail[str(workers)] = {"e2e": e2e, "model_only": model}

    result = {
        "rows_total": rows_total,
        "workers": {
            w: {"samples_per_s": d["e2e"]["samples_per_s"], "peak_rss_gb": d["e2e"]["peak_rss_gb"]}
            for w, d in detail.items()
        },
        "e2e_over_model_only": detail["2"]["e2e"]["samples_per_s"] / detail["2"]["model_only"]["samples_per_s"],
        "detail": detail,
        "settings": {"rows_per_day": args.rows_per_day, "train_days": args.days, "batch_size": args.batch_size},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{rows_total:,} embedding rows (row-wise), batch {args.batch_size}, gloo on CPU\n")
    print("| workers | e2e samples/s | model-only samples/s | e2e / model-only | peak RSS per worker (GB) |")
    print("|---:|---:|---:|---:|---:|")
    for w, d in detail.items():
        e, m = d["e2e"], d["model_only"]
        ratio = e["samples_per_s"] / m["samples_per_s"]
        print(f"| {w} | {e['samples_per_s']:,.0f} | {m['samples_per_s']:,.0f} | {ratio:.2f} | {e['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
