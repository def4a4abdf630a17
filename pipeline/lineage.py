"""Binding results to what they describe. Stages run one by one from the run directory, so any of them can be re-run
after the others: a re-trained model next to the old ``eval.json`` would be registered with metrics of other weights.

Every stage result records what it was computed from: the ingest's ``data_hash`` (ingest.json, train.json,
eval.json), the trained weights' ``model_hash`` (train.json, eval.json) and the data window (train dates in
train.json, evaluation dates in eval.json). :func:`check_stage_results` compares them with each other and with the
weights on disk before anything is registered, and names the stage to re-run on a mismatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from models.io import model_hash

if TYPE_CHECKING:
    from pipeline.evaluate import EvalResult
    from pipeline.ingest import IngestResult
    from pipeline.train import TrainResult


class StageMismatchError(ValueError):
    """Stage results that do not describe the same data and weights; the message names the stage to re-run."""


def check_stage_results(ingested: IngestResult, trained: TrainResult, evaluated: EvalResult) -> str:
    """The weights' hash when ingest.json, train.json, eval.json and the weights on disk belong together; otherwise
    :class:`StageMismatchError` naming the first stage (in pipeline order) to re-run."""
    problems: list[tuple[str, str]] = []  # (stage to re-run, why)
    if not ingested.data_hash:
        problems.append(("ingest", "ingest.json records no data hash (written by an older version)"))
    if trained.steps <= 0:
        problems.append(("train", f"train.json records {trained.steps} training steps: the model is untrained"))
    weights = Path(trained.model_dir)
    on_disk = model_hash(weights) if (weights / "weights.safetensors").exists() else None
    if on_disk is None:
        problems.append(("train", f"the trained weights in {weights} are missing"))
    elif trained.model_hash != on_disk:
        problems.append(
            (
                "train",
                f"the weights in {weights} (hash {on_disk}) are not those train.json describes "
                f"({trained.model_hash or 'no hash recorded'})",
            )
        )
    if trained.data_hash != ingested.data_hash or list(trained.train_dates) != list(ingested.train_dates):
        problems.append(
            (
                "train",
                f"the model was trained on data {trained.data_hash or '?'} ({_dates(trained.train_dates)}), "
                f"but ingest.json now holds {ingested.data_hash or '?'} ({_dates(ingested.train_dates)})",
            )
        )
    if on_disk is not None and evaluated.model_hash != on_disk:
        problems.append(
            (
                "evaluate",
                f"eval.json scored the weights {evaluated.model_hash or '(no hash recorded)'}, but the "
                f"trained model is {on_disk}",
            )
        )
    if evaluated.data_hash != ingested.data_hash or list(evaluated.eval_dates) != list(ingested.eval_dates):
        problems.append(
            (
                "evaluate",
                f"eval.json scored data {evaluated.data_hash or '?'} ({_dates(evaluated.eval_dates)}), but "
                f"ingest.json now holds {ingested.data_hash or '?'} ({_dates(ingested.eval_dates)})",
            )
        )
    if problems:
        order = ("ingest", "train", "evaluate")
        first = min((stage for stage, _ in problems), key=order.index)
        later = " and ".join(f"`mtrec {s}`" for s in order[order.index(first) :])
        raise StageMismatchError(
            "the stage results do not describe the same model: "
            + "; ".join(why for _, why in problems)
            + f". Re-run {later} (stage `{first}` first), then register; nothing was registered."
        )
    assert on_disk is not None
    return on_disk


def _dates(dates: list[str]) -> str:
    if not dates:
        return "no dates"
    return dates[0] if len(dates) == 1 else f"{dates[0]}..{dates[-1]}"
