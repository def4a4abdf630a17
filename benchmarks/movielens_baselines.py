"""Count baselines on MovieLens 100K over the pipeline's split: what a model must beat on the evaluation window.

    .venv/bin/python -m features.movielens ../shared/data/movielens_100k runs/movielens/data   # once
    .venv/bin/python benchmarks/movielens_baselines.py

Split: the converter's daily partitions, cut as the ingest stage cuts them (``split_windows``): evaluation = the last
``--eval-days`` (28) partitions, train = every partition before (the pipeline's validation window included: these
baselines choose nothing, so nothing needs holding out). Scores are statistics of the training part only:

* item like-rate: the movie's share of liked ratings, smoothed toward the global like-rate,
  ``(likes + k * global) / (n + k)`` with ``k = --k`` (10); a movie absent from training gets the global rate.
  Scored as liked AUC over all evaluation rows.
* item love-rate: the same among the movie's liked ratings (share of 5s among its ratings >= 4, toward the global
  share among liked ratings). Scored as loved AUC among the liked evaluation rows (the ESMM child's sample space).
* item like-rate x love-rate: loved AUC over all evaluation rows (the ESMM product's).
* item mean rating (toward the global mean, same k) and the global mean: rating RMSE over all evaluation rows.
* user like-rate / love-rate: as the item rates, per user; the evaluation window's users are mostly cold (no
  training rating), so these sit near chance.

``variants`` in the JSON repeats the figures with the definitions one could also have meant: training only on the
partitions the pipeline trains on (before its 28-day validation window), and a love-rate smoothed toward the share of
5s among all training ratings instead of among liked ones. AUC: sklearn's ``roc_auc_score``.

Against the reference figures (measured outside the project): the definitions above give item like-rate 0.7024
(0.702), like x love 0.6946 (0.695), item mean rating 1.0237 (1.024), global mean 1.1209 (1.121); the love-rate on
liked rows gives 0.6112 (0.612; the prior over all ratings gives 0.6135, training without the validation window
0.6062, so neither variant rounds to it either) and the user like-rate 0.5072 (0.506). Nothing was tuned toward them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from pipeline.partitions import discover_partitions, split_windows

REPO = Path(__file__).resolve().parent.parent

#: Figures measured outside the project on the same window (k = 10); this script must reproduce them.
REFERENCE: dict[str, float] = {
    "item_like_rate.liked_auc": 0.702,
    "item_love_rate.loved_auc_on_liked": 0.612,
    "item_like_x_love.loved_auc": 0.695,
    "item_mean_rating.rating_rmse": 1.024,
    "global_mean.rating_rmse": 1.121,
    "user_like_rate.liked_auc": 0.506,
}


def read_window(
    data: Path, eval_days: int, skip_last_train: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, dict[str, Any]]]:
    """(train, evaluation) ratings with ``liked``/``loved``/``rating``; ``skip_last_train`` drops that many partitions
    from the end of the training part (the pipeline's validation window)."""
    partitions = discover_partitions(data, say=lambda _: None)
    train_dates, eval_dates = split_windows(list(partitions), None, eval_days)
    if skip_last_train:
        train_dates = train_dates[:-skip_last_train]
    cols = ["user_id", "movie_id", "liked", "loved", "rating"]

    def read(dates: list[str]) -> pl.DataFrame:
        return pl.read_parquet([p for d in dates for p in partitions[d]], columns=cols)

    train, evaluation = read(train_dates), read(eval_dates)
    split = {
        name: {"first": dates[0], "last": dates[-1], "partitions": len(dates), "rows": frame.height}
        for name, dates, frame in [("train", train_dates, train), ("eval", eval_dates, evaluation)]
    }
    return train, evaluation, split


def smoothed_rate(
    train: pl.DataFrame, key: str, value: str, k: float, prior: float | None = None
) -> tuple[pl.DataFrame, float]:
    """``key`` -> ``p = (sum(value) + k * prior) / (n + k)`` over ``train``, and the prior (default: the mean of value
    over ``train``)."""
    if prior is None:
        prior = float(train[value].mean())  # type: ignore[arg-type]
    table = train.group_by(key).agg(pl.col(value).sum().alias("_s"), pl.len().alias("_n"))
    return table.select(key, ((pl.col("_s") + k * prior) / (pl.col("_n") + k)).alias("p")), prior


def score(evaluation: pl.DataFrame, rates: tuple[pl.DataFrame, float], key: str) -> np.ndarray:
    """Each evaluation row's rate; keys unseen in training get the prior (what the smoothing gives at n = 0)."""
    table, prior = rates
    joined = evaluation.select(key).join(table, on=key, how="left", maintain_order="left")
    return joined["p"].fill_null(prior).to_numpy()


def baselines(train: pl.DataFrame, evaluation: pl.DataFrame, k: float, love_prior: str = "liked") -> dict[str, float]:
    """The figures of the module docstring. ``love_prior``: ``liked`` (share of 5s among liked training ratings) or
    ``all`` (among all training ratings) as the love-rate's prior."""
    liked_train = train.filter(pl.col("liked") == 1)
    like = smoothed_rate(train, "movie_id", "liked", k)
    prior = float(train["loved"].mean()) if love_prior == "all" else None  # type: ignore[arg-type]
    love = smoothed_rate(liked_train, "movie_id", "loved", k, prior)
    mean_rating = smoothed_rate(train, "movie_id", "rating", k)
    user_like = smoothed_rate(train, "user_id", "liked", k)
    user_love = smoothed_rate(train, "user_id", "loved", k)

    y_liked = evaluation["liked"].to_numpy()
    y_loved = evaluation["loved"].to_numpy()
    y_rating = evaluation["rating"].to_numpy().astype(np.float64)
    on_liked = y_liked == 1
    p_like = score(evaluation, like, "movie_id")
    p_love = score(evaluation, love, "movie_id")
    global_mean = float(train["rating"].mean())  # type: ignore[arg-type]

    def rmse(pred: np.ndarray | float) -> float:
        return math.sqrt(float(np.mean((y_rating - pred) ** 2)))

    return {
        "item_like_rate.liked_auc": float(roc_auc_score(y_liked, p_like)),
        "item_love_rate.loved_auc_on_liked": float(roc_auc_score(y_loved[on_liked], p_love[on_liked])),
        "item_like_x_love.loved_auc": float(roc_auc_score(y_loved, p_like * p_love)),
        "item_mean_rating.rating_rmse": rmse(score(evaluation, mean_rating, "movie_id")),
        "global_mean.rating_rmse": rmse(global_mean),
        "user_like_rate.liked_auc": float(roc_auc_score(y_liked, score(evaluation, user_like, "user_id"))),
        "user_love_rate.loved_auc": float(roc_auc_score(y_loved, score(evaluation, user_love, "user_id"))),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "runs" / "movielens" / "data", help="converter output")
    parser.add_argument("--eval-days", type=int, default=28)
    parser.add_argument("--validation-days", type=int, default=28, help="for the variant without them")
    parser.add_argument("--k", type=float, default=10.0, help="smoothing strength (pseudo-ratings at the prior)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "movielens_baselines.json")
    args = parser.parse_args(argv)

    train, evaluation, split = read_window(args.data, args.eval_days)
    ours = baselines(train, evaluation, args.k)
    pipeline_train, _, pipeline_split = read_window(args.data, args.eval_days, args.validation_days)
    variants = {
        "train_before_validation_window": baselines(pipeline_train, evaluation, args.k),
        "love_prior_all_ratings": baselines(train, evaluation, args.k, love_prior="all"),
    }

    for part in ("train", "eval"):
        w = split[part]
        print(f"{part:<5} {w['first']} .. {w['last']}: {w['partitions']} partitions, {w['rows']:,} rows")
    before, prior_all = variants["train_before_validation_window"], variants["love_prior_all_ratings"]
    print(f"{'baseline.metric':<36} {'ours':>7} {'reference':>9} {'train w/o val':>13} {'love prior all':>14}")
    for name, value in ours.items():
        ref = f"{REFERENCE[name]:.3f}" if name in REFERENCE else ""
        print(f"{name:<36} {value:>7.4f} {ref:>9} {before[name]:>13.4f} {prior_all[name]:>14.4f}")
    data = args.data.resolve()
    shown = data.relative_to(REPO) if data.is_relative_to(REPO) else data
    result = {"data": str(shown), "k": args.k, "split": split, "baselines": ours, "reference": REFERENCE}
    result["variants"] = {**variants, "train_before_validation_window_split": pipeline_split}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
