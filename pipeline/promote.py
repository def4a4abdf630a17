"""Promotion: the ``challenger`` replaces the ``champion`` only when the gate (``pipeline/gate.py``) passes: on the
challenger's evaluation window (the same rows for both), no gated metric regresses by more than
``promotion.thresholds`` allows, and every absolute bound of ``promotion.bounds`` holds.

The champion's metrics on that window come from the challenger's run (``eval/champion_comparison.json``, written at
registration against the then champion) when the champion is still the same version, otherwise from scoring the
champion's weights on the evaluation files of ``<run_dir>/ingest.json``. Both models are scored by this code from
their safetensors weights, so nothing from the store is unpickled or executed.

The decision is recorded as tags on both versions; the ``champion`` alias moves only on a pass, compare-and-set: it
is re-read just before the move and the promotion is refused if it changed since the comparison (the replaced
champion gets ``previous_champion``, for a one-command rollback). A first model becomes champion only when it meets
``promotion.bounds``, or with ``--allow-first`` when none is configured. Only "alias not found" means "no champion":
any other error reading an alias fails the promotion. Deciding twice is harmless: a challenger already judged
against the current champion gets the recorded decision.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import ExperimentConfig
from pipeline.gate import gate
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
    from pipeline.evaluate import score_files
    from pipeline.metrics import task_metrics

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
    champion_after: str | None  # None: still no champion (a first model refused)
    decision: Decision
    reason: str
    eval_dates: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


class PromotionError(RuntimeError):
    """The gate cannot be evaluated (no challenger, no comparable evaluation data)."""


class ChampionChangedError(PromotionError):
    """The champion alias moved between the comparison and the move (another promotion ran at the same time)."""


def promote(
    cfg: ExperimentConfig, version: str | None = None, force: bool = False, allow_first: bool = False
) -> PromotionResult:
    """Judge ``version`` (default: the ``challenger`` alias) against the champion; see the module docstring.
    ``force`` moves the champion alias whatever the gate says (recorded as forced); ``allow_first`` accepts a first
    champion when no absolute bound (``promotion.bounds``) is configured to check it against."""
    with http_settings(cfg):
        result = call_with_retries(
            lambda: _promote_once(cfg, version, force, allow_first),
            cfg,
            "run the promotion gate",
            "Nothing was changed in the registry by this attempt's failure; run `mtrec promote` again later.",
        )
    result.save(cfg.run_dir.resolve() / "promote.json")
    return result


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _promote_once(cfg: ExperimentConfig, version: str | None, force: bool, allow_first: bool) -> PromotionResult:
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
        return _first_champion(client, cfg, challenger, force, allow_first)
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
    result = gate(challenger_metrics, champion_metrics, cfg.promotion.thresholds, cfg.promotion.bounds)
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


def _first_champion(
    client: MlflowClient, cfg: ExperimentConfig, challenger: ModelVersion, force: bool, allow_first: bool
) -> PromotionResult:
    """No champion yet: the challenger must meet the absolute bounds, or the operator accepts it explicitly."""
    name, number = challenger.name, str(challenger.version)
    eval_dates, metrics = _challenger_evaluation(client, challenger)
    result = gate(metrics, None, cfg.promotion.thresholds, cfg.promotion.bounds)
    checks = [asdict(c) for c in result.checks]
    if result.passed:
        reason = f"first champion: {result.reason()}"
    elif allow_first and not cfg.promotion.bounds:
        reason = "first champion accepted by the operator (--allow-first); no promotion.bounds configured"
    elif force:
        reason = f"first champion forced by operator despite: {result.reason()}"
    else:
        reason = f"first champion refused: {result.reason()}"
        _tag_challenger(client, challenger, "rejected", reason, None, eval_dates, checks, _rules(cfg))
        return PromotionResult(name, number, None, None, "rejected", reason, eval_dates, checks)
    _move_champion(client, name, number, None)
    _tag_challenger(client, challenger, "promoted", reason, None, eval_dates, checks, _rules(cfg))
    return PromotionResult(name, number, None, number, "promoted", reason, eval_dates, checks)


def _rules(cfg: ExperimentConfig) -> str:
    rules = {"thresholds": cfg.promotion.thresholds, "bounds": cfg.promotion.model_dump(mode="json")["bounds"]}
    return json.dumps(rules, sort_keys=True)[:_TAG_LIMIT]


def _move_champion(client: MlflowClient, name: str, number: str, expected: str | None) -> None:
    """Compare-and-set: move ``champion`` to ``number`` only if it still is ``expected`` (the version the gate
    compared with; None: there was none), re-read just before the move; then read it back.

    MLflow has no atomic alias update, so two promotions that both re-read before either writes can still both
    write; the read-back catches the one that lost (its own move was overwritten) and the tags on both versions
    record who replaced whom. The replaced champion keeps the ``previous_champion`` alias (one-command rollback)
    and its ``promotion.replaced_by`` tag."""
    current = version_by_alias(client, name, CHAMPION)
    now = None if current is None else str(current.version)
    if now != expected:
        raise ChampionChangedError(
            f"the champion of '{name}' changed from {_v(expected)} to {_v(now)} after version {number} was compared "
            f"with it (another promotion ran at the same time): nothing was changed. Run `mtrec promote --version "
            f"{number}` again to compare it with the new champion"
        )
    if expected is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, expected)
    client.set_registered_model_alias(name, CHAMPION, number)
    after = version_by_alias(client, name, CHAMPION)
    if after is None or str(after.version) != number:
        raise ChampionChangedError(
            f"version {number} was made champion of '{name}', but a concurrent promotion moved the alias to "
            f"{_v(None if after is None else str(after.version))} at the same moment; check its tags and promote again "
            "if needed"
        )


def _v(number: str | None) -> str:
    return "no champion" if number is None else f"version {number}"


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
