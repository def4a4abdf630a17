"""Promotion gate: the ``challenger`` replaces the ``champion`` only when, on the challenger's evaluation window (the
same rows for both), no gated metric regresses by more than ``promotion.thresholds`` allows.

The champion's metrics on that window come from the challenger's run (``eval/champion_comparison.json``, written at
registration against the then champion) when the champion is still the same version, otherwise from scoring the
champion's weights on the evaluation files of ``<run_dir>/ingest.json``. Both models are scored by this code from
their safetensors weights, so nothing from the store is unpickled or executed.

The decision is recorded as tags on both versions; the ``champion`` alias moves only on a pass (the replaced
champion gets ``previous_champion``, for a one-command rollback). The first model becomes champion when there is none.
Deciding twice is harmless: a challenger already judged against the current champion gets the recorded decision.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import GATE_METRICS, ExperimentConfig
from pipeline.registry import (
    CHALLENGER,
    CHAMPION,
    MODEL_HASH_TAG,
    PREVIOUS_CHAMPION,
    call_with_retries,
    download_model_dir,
    http_settings,
    is_transient,
    registry_client,
    version_by_alias,
)

if TYPE_CHECKING:
    import polars as pl
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

Decision = Literal["promoted", "rejected", "unchanged"]
_TAG_LIMIT = 4500  # model version tag values are capped at 5000 characters


# ---------------------------------------------------------------------------------------------------------------------
# The gate (pure)


@dataclass(frozen=True)
class Check:
    """One gated metric: ``drop`` is the regression in the metric's units (positive = worse than the champion)."""

    key: str  # <evaluation name>.<metric>
    challenger: float | None
    champion: float | None
    drop: float | None
    max_drop: float
    passed: bool
    note: str = ""

    def describe(self) -> str:
        if self.note:
            return f"{self.key}: {self.note}"
        assert self.challenger is not None and self.champion is not None and self.drop is not None
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.key} {self.challenger:.4f} vs {self.champion:.4f}: drop {self.drop:+.4f} "
            f"(max {self.max_drop:.4f}) {verdict}"
        )


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: list[Check]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def reason(self) -> str:
        if not self.checks:
            return "no gated metric in common with the champion"
        if self.passed:
            return f"all {len(self.checks)} gated metrics within thresholds"
        return "regressed: " + "; ".join(c.describe() for c in self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason(), "checks": [asdict(c) for c in self.checks]}


def _regression(metric: str, challenger: float, champion: float) -> float:
    """How much worse the challenger is, in the metric's units (negative = better)."""
    direction = GATE_METRICS[metric]
    if direction == "higher":
        return champion - challenger
    if direction == "lower":
        return challenger - champion
    return abs(challenger - 1.0) - abs(champion - 1.0)


def _finite(x: float | None) -> bool:
    return x is not None and not math.isnan(x) and not math.isinf(x)


def gate(
    challenger: dict[str, dict[str, float]], champion: dict[str, dict[str, float]], thresholds: dict[str, float]
) -> GateResult:
    """Apply the per-metric thresholds (see PromotionConfig): explicit ``name.metric`` entries, then ``*.metric``
    for every evaluation name both models have. A named entry the models lack fails (the config and the model
    disagree, which a gate must not wave through); a metric the challenger cannot compute (NaN) fails too."""
    rules: dict[str, float] = {}
    for key, drop in thresholds.items():
        name, _, metric = key.rpartition(".")
        if name == "*":
            for ev in sorted(set(challenger) & set(champion)):
                if metric in challenger[ev] or metric in champion[ev]:
                    rules.setdefault(f"{ev}.{metric}", drop)
    rules.update({k: v for k, v in thresholds.items() if not k.startswith("*.")})

    checks: list[Check] = []
    for key in sorted(rules):
        name, _, metric = key.rpartition(".")
        max_drop = rules[key]
        new = challenger.get(name, {}).get(metric)
        old = champion.get(name, {}).get(metric)
        if new is None or old is None:
            who = "challenger" if new is None else "champion"
            checks.append(Check(key, new, old, None, max_drop, False, f"missing in the {who}'s metrics"))
        elif not _finite(new) and _finite(old):
            checks.append(Check(key, new, old, None, max_drop, False, "challenger's value is not finite"))
        elif not _finite(old):
            checks.append(Check(key, new, old, None, max_drop, True, "champion's value is not finite: not compared"))
        else:
            drop = _regression(metric, new, old)
            checks.append(Check(key, new, old, drop, max_drop, drop <= max_drop + 1e-12))
    return GateResult(passed=all(c.passed for c in checks), checks=checks)


# ---------------------------------------------------------------------------------------------------------------------
# The champion on the challenger's window


@dataclass(frozen=True)
class ChampionComparison:
    """The champion's metrics on a challenger's evaluation window (same rows)."""

    champion_version: str
    champion_run_id: str
    champion_hash: str
    eval_dates: list[str]
    metrics: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_model(
    model_dir: Path, eval_files: list[str], batch_size: int
) -> tuple[dict[str, dict[str, float]], pl.DataFrame]:
    """Metrics of the model in ``model_dir`` on ``eval_files`` and its predictions (evaluate stage's code path)."""
    from features.transform import BatchTransform
    from models.io import load_model
    from pipeline.evaluate import score_files, task_metrics

    loaded = load_model(model_dir)
    frame = score_files(eval_files, loaded.model, BatchTransform(loaded.spec, loaded.stats), loaded.spec, batch_size)
    pred_cols = {c.removeprefix("pred:"): c for c in frame.columns if c.startswith("pred:")}
    return task_metrics(loaded.spec, frame, pred_cols), frame


def compare_with_champion(
    client: MlflowClient,
    cfg: ExperimentConfig,
    eval_files: list[str],
    eval_dates: list[str],
    exclude_hash: str | None = None,
) -> tuple[ChampionComparison | None, pl.DataFrame | None, str | None]:
    """Score the current champion on ``eval_files``. Returns (comparison, its predictions, note); the note says why
    there is no comparison (no champion yet, or it cannot be scored by this code)."""
    champion = version_by_alias(client, cfg.mlflow.model_name, CHAMPION)
    if champion is None:
        return None, None, "no champion yet: this model is compared with nothing"
    if exclude_hash is not None and champion.tags.get(MODEL_HASH_TAG) == exclude_hash:
        return None, None, f"this model is the champion (version {champion.version})"
    try:
        metrics, frame = score_model(download_model_dir(client, cfg, champion), eval_files, cfg.eval.batch_size)
    except Exception as err:  # a champion this code cannot read must not block registering a new model
        if is_transient(err):
            raise
        return None, None, f"champion version {champion.version} cannot be scored by this code: {err}"
    comparison = ChampionComparison(
        champion_version=str(champion.version),
        champion_run_id=str(champion.run_id),
        champion_hash=champion.tags.get(MODEL_HASH_TAG, ""),
        eval_dates=list(eval_dates),
        metrics=metrics,
    )
    return comparison, frame, None


# ---------------------------------------------------------------------------------------------------------------------
# Promote


@dataclass(frozen=True)
class PromotionResult:
    model_name: str
    challenger_version: str
    champion_before: str | None
    champion_after: str
    decision: Decision
    reason: str
    eval_dates: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


class PromotionError(RuntimeError):
    """The gate cannot be evaluated (no challenger, no comparable evaluation data)."""


def promote(cfg: ExperimentConfig, version: str | None = None, force: bool = False) -> PromotionResult:
    """Judge ``version`` (default: the ``challenger`` alias) against the champion; see the module docstring.
    ``force`` moves the champion alias whatever the gate says (recorded as forced)."""
    with http_settings(cfg):
        result = call_with_retries(
            lambda: _promote_once(cfg, version, force),
            cfg,
            "run the promotion gate",
            "Nothing was changed in the registry by this attempt's failure; run `mtrec promote` again later.",
        )
    result.save(cfg.run_dir.resolve() / "promote.json")
    return result


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _promote_once(cfg: ExperimentConfig, version: str | None, force: bool) -> PromotionResult:
    client = registry_client(cfg)
    name = cfg.mlflow.model_name
    if version is None:
        challenger = version_by_alias(client, name, CHALLENGER)
        if challenger is None:
            raise PromotionError(f"model '{name}' has no '{CHALLENGER}' version: run `mtrec register` first")
    else:
        challenger = client.get_model_version(name, version)
    number = str(challenger.version)
    champion = version_by_alias(client, name, CHAMPION)

    if champion is None:
        reason = "first model: there was no champion"
        _move_champion(client, name, number, None)
        _tag_challenger(client, challenger, "promoted", reason, None, [], [], _rules(cfg))
        return PromotionResult(name, number, None, number, "promoted", reason)
    champ = str(champion.version)
    if champ == number:
        return PromotionResult(name, number, champ, champ, "unchanged", f"version {number} is already the champion")

    eval_dates, challenger_metrics = _challenger_evaluation(client, challenger)
    recorded = challenger.tags.get("promotion.decision")
    same_rules = challenger.tags.get("promotion.thresholds") == _rules(cfg)
    if not force and recorded == "rejected" and challenger.tags.get("promotion.compared_with") == champ and same_rules:
        # Judged against this very champion before: the same inputs give the same decision, so don't redo it.
        return PromotionResult(
            name,
            number,
            champ,
            champ,
            "rejected",
            challenger.tags.get("promotion.reason", "rejected earlier"),
            eval_dates,
            json.loads(challenger.tags.get("promotion.checks", "[]")),
        )

    champion_metrics = _champion_metrics(client, cfg, challenger, champion, eval_dates)
    result = gate(challenger_metrics, champion_metrics, cfg.promotion.thresholds)
    checks = [asdict(c) for c in result.checks]
    if result.passed or force:
        reason = result.reason() if result.passed else f"forced by operator despite: {result.reason()}"
        _move_champion(client, name, number, champ)
        _tag_challenger(client, challenger, "promoted", reason, champ, eval_dates, checks, _rules(cfg))
        client.set_model_version_tag(name, champ, f"promotion.challenger.v{number}", f"replaced: {reason}"[:_TAG_LIMIT])
        client.set_model_version_tag(name, champ, "promotion.replaced_by", number)
        return PromotionResult(name, number, champ, number, "promoted", reason, eval_dates, checks)
    reason = result.reason()
    _tag_challenger(client, challenger, "rejected", reason, champ, eval_dates, checks, _rules(cfg))
    client.set_model_version_tag(
        name, champ, f"promotion.challenger.v{number}", f"kept over v{number}: {reason}"[:_TAG_LIMIT]
    )
    return PromotionResult(name, number, champ, champ, "rejected", reason, eval_dates, checks)


def _rules(cfg: ExperimentConfig) -> str:
    return json.dumps(cfg.promotion.thresholds, sort_keys=True)[:_TAG_LIMIT]


def _move_champion(client: MlflowClient, name: str, number: str, previous: str | None) -> None:
    if previous is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
    client.set_registered_model_alias(name, CHAMPION, number)


def _tag_challenger(
    client: MlflowClient,
    challenger: ModelVersion,
    decision: Decision,
    reason: str,
    champion: str | None,
    eval_dates: list[str],
    checks: list[dict[str, Any]],
    rules: str,
) -> None:
    tags = {
        "promotion.decision": decision,
        "promotion.reason": reason[:_TAG_LIMIT],
        "promotion.compared_with": champion or "none",
        "promotion.eval_window": ",".join(eval_dates),
        "promotion.checks": _compact_checks(checks),
        "promotion.thresholds": rules,
        "promotion.decided_at": _now(),
    }
    for key, value in tags.items():
        client.set_model_version_tag(challenger.name, str(challenger.version), key, value)


def _compact_checks(checks: list[dict[str, Any]]) -> str:
    """Checks as JSON within the tag limit (failures kept first when it has to shrink)."""
    ordered = sorted(checks, key=lambda c: c["passed"])
    while ordered:
        text = json.dumps(ordered, separators=(",", ":"))
        if len(text) <= _TAG_LIMIT:
            return text
        ordered = ordered[:-1]
    return "[]"


def _run_json(client: MlflowClient, run_id: str, path: str) -> dict[str, Any] | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    except MlflowException as err:
        if is_transient(err):
            raise
        return None
    data: dict[str, Any] = json.loads(Path(local).read_text())
    return data


def _challenger_evaluation(client: MlflowClient, challenger: ModelVersion) -> tuple[list[str], dict[str, Any]]:
    """The challenger's evaluation window and metrics, as logged by its register stage."""
    evaluated = _run_json(client, str(challenger.run_id), "eval/metrics.json")
    if evaluated is None:
        raise PromotionError(
            f"version {challenger.version} has no eval/metrics.json in run {challenger.run_id}: it was not registered "
            "by `mtrec register`, so there is nothing to compare"
        )
    return list(evaluated["eval_dates"]), dict(evaluated["metrics"])


def _champion_metrics(
    client: MlflowClient,
    cfg: ExperimentConfig,
    challenger: ModelVersion,
    champion: ModelVersion,
    eval_dates: list[str],
) -> dict[str, dict[str, float]]:
    """The champion's metrics on the challenger's evaluation window: recorded at registration if the champion has
    not changed since, else scored now on the locally ingested window (which must be that window)."""
    recorded = _run_json(client, str(challenger.run_id), "eval/champion_comparison.json")
    if recorded and str(recorded["champion_version"]) == str(champion.version) and recorded["eval_dates"] == eval_dates:
        return dict(recorded["metrics"])

    from pipeline.ingest import IngestResult

    ingest_path = cfg.run_dir.resolve() / "ingest.json"
    ingested = IngestResult.load(ingest_path) if ingest_path.exists() else None
    if ingested is None or ingested.eval_dates != eval_dates:
        have = ingested.eval_dates if ingested else "nothing"
        raise PromotionError(
            f"cannot compare version {challenger.version} with champion version {champion.version} on the same "
            f"evaluation window {eval_dates}: {ingest_path} holds {have}. Run `mtrec ingest` for that window (the "
            "challenger's data.path) with this config, then promote again"
        )
    try:
        metrics, _ = score_model(download_model_dir(client, cfg, champion), ingested.eval_files, cfg.eval.batch_size)
    except Exception as err:
        if is_transient(err):
            raise
        raise PromotionError(
            f"champion version {champion.version} cannot be scored by this code ({err}); compare by hand and use "
            "`mtrec promote --force` to replace it"
        ) from err
    return metrics
