"""What ``generator.repeat`` does to the demo's world: the oracle's AUCs and the "item in click history" heuristic.

    .venv/bin/python benchmarks/repeat_knob.py --repeat 0 0.5

Generates the world of ``configs/experiments/demo.yaml`` (its ``generator:`` section, ``repeat`` replaced) under
``runs/repeat_knob/r<repeat>`` and prints, over the last day: the share of rows whose item is in the user's click
history, the CTR on those rows, the oracle's ctr / cvr (clicked rows) / ctr_cvr AUCs, and the ctr AUC of the 0/1
heuristic alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from sklearn.metrics import roc_auc_score

from features.generator import GeneratorConfig, generate_logs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", nargs="+", type=float, default=[0.0, 0.5])
    args = parser.parse_args()
    base = yaml.safe_load((ROOT / "configs/experiments/demo.yaml").read_text())["generator"]
    header = ["repeat", "in click history", "CTR there", "oracle ctr AUC", "oracle cvr AUC", "oracle ctr_cvr AUC"]
    print("| " + " | ".join([*header, "heuristic"]) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for repeat in args.repeat:
        out = ROOT / "runs" / "repeat_knob" / f"r{repeat}"
        result = generate_logs(GeneratorConfig(**{**base, "repeat": repeat}), out / "data", out / "oracle.parquet")
        logs = pa.concat_tables([pq.read_table(f) for f in result.files])
        oracle = pq.read_table(result.oracle_path)
        click = logs["click"].to_numpy().astype(bool)
        conv = logs["conversion"].to_numpy().astype(bool)
        items, seqs = logs["item_id"].to_pylist(), logs["click_seq"].to_pylist()
        hit = np.array([i in (s or []) for i, s in zip(items, seqs, strict=True)])
        last = logs["ts"].to_numpy() >= np.datetime64(result.dates[-1])
        p_click, p_conv = oracle["p_click"].to_numpy(), oracle["p_conversion"].to_numpy()
        clicked = last & click
        print(
            f"| {repeat:g} | {hit[last].mean():.1%} | {click[last & hit].mean():.1%} "
            f"| {roc_auc_score(click[last], p_click[last]):.4f} | {roc_auc_score(conv[clicked], p_conv[clicked]):.4f} "
            f"| {roc_auc_score(conv[last], (p_click * p_conv)[last]):.4f} "
            f"| {roc_auc_score(click[last], hit[last]):.3f} |"
        )


if __name__ == "__main__":
    main()
