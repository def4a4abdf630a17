"""What a reviewer reads before serving a model: the model card (markdown) and plots (PNG, matplotlib's Agg backend,
no display needed), logged with every registered version.

* ``calibration.png``: per evaluation name, mean label (y) against mean prediction (x) in prediction deciles
  (sklearn's ``calibration_curve``), on the task's own sample space (children of ``given``/ESMM parents on the
  parent's positives), champion beside when there is one. Points below the diagonal: the model over-predicts.
* ``metrics_vs_champion.png``: AUC/GAUC per evaluation name (and RMSE for regression tasks) for this model, the
  champion on the same rows, and the oracle (the generator's true probabilities) when known.
* ``training_curves.png``: the logged training losses by step.
* ``gradient_diagnostics.png``: only when training wrote diagnostics of a multi-task gradient method: a
  ``gradient_diagnostics.json`` file in the model folder (a list of ``{"step": int, "<method>/<name>": float, ...}``
  records), or ``<method>/<name>`` keys inside ``training_curve.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from features.spec import FeatureSpec, TaskKind

if TYPE_CHECKING:
    import polars as pl

    from pipeline.evaluate import EvalResult
    from pipeline.gate import GateResult
    from pipeline.promote import ChampionComparison
    from pipeline.train import TrainResult

GRADIENT_DIAGNOSTICS_FILE = "gradient_diagnostics.json"


@dataclass(frozen=True)
class CardInputs:
    model_name: str
    run_id: str
    model_hash: str
    config_hash: str
    code_revision: str
    config: dict[str, Any]  # as logged: without credentials
    train_dates: list[str]
    eval_dates: list[str]
    counts: dict[str, dict[str, Any]]  # split -> ValidationCounts as dict
    trained: TrainResult
    evaluated: EvalResult
    comparison: ChampionComparison | None
    comparison_note: str | None
    gate: GateResult | None
    plots: list[str] = field(default_factory=list)  # artifact paths
    tags: dict[str, str] = field(default_factory=dict)
    quarantine_sampled: int = 0  # quarantined rows uploaded with the run (data/quarantine_sample.parquet)
    quarantine_path: str = ""  # the full quarantine file, in the run directory only


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if float(x).is_integer() and abs(x) >= 100:
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def _window(dates: list[str]) -> str:
    if not dates:
        return "-"
    return f"{dates[0]} .. {dates[-1]} ({len(dates)} partition{'s' if len(dates) != 1 else ''})"


def _header(c: CardInputs) -> list[str]:
    rows = [
        ("registered model", f"`{c.model_name}`"),
        ("MLflow run", f"`{c.run_id}`"),
        ("model hash (weights)", f"`{c.model_hash}`"),
        ("config hash", f"`{c.config_hash}`"),
        ("code revision", f"`{c.code_revision}`"),
        ("training window", _window(c.train_dates)),
        ("evaluation window", _window(c.eval_dates)),
        *((k, f"`{v}`") for k, v in sorted(c.tags.items())),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _data_section(c: CardInputs) -> list[str]:
    lines = [
        "| split | rows read | rows used | rows quarantined | quarantine reasons |",
        "|---|---:|---:|---:|---|",
    ]
    for split, counts in c.counts.items():
        reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.get("by_reason", {}).items())) or "-"
        lines.append(
            f"| {split} | {counts['rows_read']:,} | {counts['rows_used']:,} | {counts['rows_quarantined']:,} "
            f"| {reasons} |"
        )
    return lines


def _training_section(c: CardInputs) -> list[str]:
    t = c.trained
    losses = ", ".join(f"{k} {v:.4f}" for k, v in t.final_losses.items()) or "-"
    lines = [
        f"- steps: {t.steps:,}; samples: {t.samples:,}; throughput: {t.samples_per_s:,.0f} samples/s "
        f"over {t.loop_seconds:.1f}s",
        f"- last logged losses: {losses}",
    ]
    r = t.rows
    if r:
        dropped = r["dropped_by_equal_split"] + r["dropped_by_drop_last"]
        lines.append(
            f"- rows used {r['rows_used']:,}, rows trained per epoch {r['rows_trained_per_epoch']:,} "
            f"({r['steps_per_epoch']:,} steps x global batch {r['global_batch']:,}); not trained per epoch: "
            f"{dropped:,} ({r['dropped_by_equal_split']:,} by the equal split over workers, "
            f"{r['dropped_by_drop_last']:,} by dropping each worker's last partial batch)"
        )
    if t.validation:
        watched = t.validation[-1]["watched"]
        curve = ", ".join(f"{p['epoch']}: {p['value']:.4f}" for p in t.validation)
        stopped = "stopped early" if t.stopped_early else "ran every epoch"
        lines.append(
            f"- weights of epoch {t.best_epoch} of {t.epochs} ({stopped}), the best on the validation window by "
            f"{watched}; per epoch: {curve}"
        )
    return lines


def _metrics_table(c: CardInputs) -> list[str]:
    champ = c.comparison.metrics if c.comparison else {}
    champ_col = f"champion v{c.comparison.champion_version}" if c.comparison else "champion"
    lines = [
        f"| evaluation | metric | this model | {champ_col} | change | oracle |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, values in c.evaluated.metrics.items():
        for metric, value in values.items():
            if metric == "rows":
                continue
            old = champ.get(name, {}).get(metric)
            delta = value - old if old is not None else None
            oracle = c.evaluated.oracle.get(name, {}).get(metric)
            change = f"{delta:+.4f}" if delta is not None and not math.isnan(delta) else "-"
            lines.append(f"| {name} | {metric} | {_fmt(value)} | {_fmt(old)} | {change} | {_fmt(oracle)} |")
    rows = {name: int(v.get("rows", 0)) for name, v in c.evaluated.metrics.items()}
    lines.append("")
    lines.append("Rows per evaluation name: " + ", ".join(f"{k} {v:,}" for k, v in rows.items()) + ".")
    lines += [f"Not reported: {note}." for note in c.evaluated.notes]
    return lines


def _gate_section(c: CardInputs) -> list[str]:
    if c.gate is None:
        return ["Not evaluated: there is no champion comparison (see above)."]
    verdict = "**would pass**" if c.gate.passed else "**would be rejected**"
    against = "against the current champion" if c.gate.with_champion else "as a first champion (absolute bounds only)"
    lines = [f"With the configured thresholds and bounds this model {verdict} {against}: {c.gate.reason()}.", ""]
    lines += [f"- {check.describe()}" for check in c.gate.checks]
    return lines


def _quarantine_note(c: CardInputs) -> str:
    quarantined = sum(int(v.get("rows_quarantined", 0)) for v in c.counts.values())
    where = f"`{c.quarantine_path}`" if c.quarantine_path else "the run directory"
    if c.quarantine_sampled:
        return (
            f"Rows that failed validation against the feature spec were quarantined: {quarantined:,} rows. A sample "
            f"of {c.quarantine_sampled:,} (spread over the reasons) is the run's `data/quarantine_sample.parquet`; "
            f"the full file stays in the run directory ({where}) and is not uploaded (raw user rows)."
        )
    return (
        f"Rows that failed validation against the feature spec were quarantined: {quarantined:,} rows, none uploaded "
        f"(mlflow.quarantine_sample_rows); the full file stays in the run directory ({where})."
    )


def summary_card(c: CardInputs) -> str:
    """The short form (header, metrics, gate preview): the registered version's description."""
    parts = [
        *_header(c),
        "",
        "### Evaluation (same rows for every column)",
        *_metrics_table(c),
        *([f"\nNo champion comparison: {c.comparison_note}."] if c.comparison is None and c.comparison_note else []),
        "",
        "### Promotion gate preview",
        *_gate_section(c),
        "",
        "Full model card, plots and configuration: the run's `card/model_card.md` and `plots/` artifacts.",
    ]
    return "\n".join(parts) + "\n"


def model_card(c: CardInputs) -> str:
    parts = [
        f"# Model card: {c.model_name}",
        "",
        *_header(c),
        "",
        "## Data",
        "",
        _quarantine_note(c),
        "",
        *_data_section(c),
        "",
        "## Training",
        "",
        *_training_section(c),
        "",
        "## Evaluation",
        "",
        "Every column is computed on the same rows: this model's evaluation window. The champion is the version "
        "holding the `champion` alias at registration time; the oracle scores with the true probabilities (known "
        "for generated data only).",
        "",
        *_metrics_table(c),
    ]
    if c.comparison is None and c.comparison_note:
        parts += ["", f"No champion comparison: {c.comparison_note}."]
    parts += ["", "## Promotion gate preview", "", *_gate_section(c)]
    if c.plots:
        parts += ["", "## Plots", ""]
        parts += [f"- [{Path(p).stem}](../{p})" for p in c.plots]
    parts += [
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(c.config, sort_keys=False).rstrip(),
        "```",
    ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # batch jobs have no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _sample(spec: FeatureSpec, frame: pl.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, predictions) of one evaluation name on its own sample space, as the evaluate stage scores it."""
    col = f"pred:{name}"
    if col not in frame.columns:
        return None
    pred = frame[col].to_numpy()
    tasks = {t.name: t for t in spec.tasks}
    if name in tasks:
        task = tasks[name]
        y = frame[f"label:{name}"].to_numpy()
        cond = task.given or task.esmm_parent
        rows = frame[f"label:{cond}"].to_numpy() > 0.5 if cond else np.ones(len(y), dtype=bool)
        return y[rows], pred[rows]
    for task in spec.tasks:  # an ESMM product: parent label x child label over all rows
        if task.esmm_parent and f"{task.esmm_parent}_{task.name}" == name:
            y = frame[f"label:{task.esmm_parent}"].to_numpy() * frame[f"label:{task.name}"].to_numpy()
            return y, pred
    return None


def calibration_series(
    spec: FeatureSpec, frame: pl.DataFrame, name: str, bins: int = 10
) -> tuple[np.ndarray, np.ndarray] | None:
    """The calibration plot's points of one evaluation name: (mean prediction, mean label) per prediction-quantile
    bin, on the name's own sample space. sklearn's ``calibration_curve`` for probabilities; the same quantile
    binning by hand for regression outputs (label space), which it does not take."""
    from sklearn.calibration import calibration_curve

    got = _sample(spec, frame, name)
    if got is None:
        return None
    labels, preds = got
    if len(preds) == 0:
        return np.array([]), np.array([])
    regression = {t.name for t in spec.tasks if t.kind != TaskKind.binary}
    if name not in regression and len(np.unique(labels)) == 2:
        label_mean, pred_mean = calibration_curve(labels, preds, n_bins=bins, strategy="quantile")
        return pred_mean, label_mean
    order = np.argsort(preds, kind="stable")
    chunks = np.array_split(order, min(bins, len(preds)))
    return np.array([preds[c].mean() for c in chunks]), np.array([labels[c].mean() for c in chunks])


def plot_calibration(
    spec: FeatureSpec, frame: pl.DataFrame, champion: pl.DataFrame | None, champion_label: str, out: Path
) -> Path:
    plt = _pyplot()
    names = [c.removeprefix("pred:") for c in frame.columns if c.startswith("pred:")]
    regression = {t.name for t in spec.tasks if t.kind != TaskKind.binary}
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for data, label, style in ((frame, "this model", "o-"), (champion, champion_label, "s--")):
            points = calibration_series(spec, data, name) if data is not None else None
            if points is None:
                continue
            ax.plot(points[0], points[1], style, markersize=4, label=label)
        lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
        hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, label="ideal")
        unit = " (label space)" if name in regression else ""
        ax.set_title(name)
        ax.set_xlabel(f"mean prediction{unit}")
        ax.set_ylabel("mean label")
        ax.legend(fontsize=7)
    fig.suptitle("Calibration by prediction decile (below the diagonal: over-predicts)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_metrics_vs_champion(
    metrics: dict[str, dict[str, float]],
    champion: dict[str, dict[str, float]] | None,
    champion_label: str,
    oracle: dict[str, dict[str, float]],
    out: Path,
) -> Path:
    plt = _pyplot()
    panels = [
        ("auc", "AUC (higher is better)"),
        ("gauc", "GAUC (higher is better)"),
        ("rmse", "RMSE (lower is better)"),
    ]
    panels = [(m, title) for m, title in panels if any(m in v for v in metrics.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels, strict=True):
        names = [n for n, v in metrics.items() if metric in v]
        series = [("this model", metrics), (champion_label, champion or {}), ("oracle", oracle)]
        series = [(label, data) for label, data in series if any(metric in data.get(n, {}) for n in names)]
        width = 0.8 / max(len(series), 1)
        x = np.arange(len(names))
        for i, (label, data) in enumerate(series):
            values = [data.get(n, {}).get(metric, float("nan")) for n in names]
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(x, names)
        ax.set_title(title)
        if metric in ("auc", "gauc"):
            shown = [data.get(n, {}).get(metric, 1.0) for _, data in series for n in names]
            lowest = min((v for v in shown if v == v), default=0.5)  # v == v drops NaN
            ax.set_ylim(min(0.4, lowest - 0.05), 1.0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _plot_series(records: list[dict[str, float]], keys: list[str], title: str, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    steps = [r["step"] for r in records]
    for key in keys:
        ax.plot(steps, [r.get(key, float("nan")) for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _diagnostics(model_dir: Path, curve: list[dict[str, float]]) -> list[dict[str, float]]:
    path = model_dir / GRADIENT_DIAGNOSTICS_FILE
    if path.exists():
        records: list[dict[str, float]] = json.loads(path.read_text())
        return records
    return [{"step": r["step"], **{k: v for k, v in r.items() if "/" in k}} for r in curve if any("/" in k for k in r)]


def write_plots(
    out_dir: Path,
    spec: FeatureSpec,
    predictions_path: Path,
    champion_frame: pl.DataFrame | None,
    metrics: dict[str, dict[str, float]],
    champion_metrics: dict[str, dict[str, float]] | None,
    champion_label: str | None,
    oracle: dict[str, dict[str, float]],
    model_dir: Path,
) -> list[Path]:
    """Every plot that applies; returns their paths."""
    import polars as pl

    out_dir.mkdir(parents=True, exist_ok=True)
    label = champion_label or "champion"
    frame = pl.read_parquet(predictions_path)
    if champion_frame is not None:
        # Same rows by construction (same files, same order); align on the request id all the same.
        key = spec.row_key
        champ_preds = champion_frame.select([key, *(c for c in champion_frame.columns if c.startswith("pred:"))])
        champion_frame = frame.select([key, *(c for c in frame.columns if c.startswith("label:"))]).join(
            champ_preds, on=key, how="inner"
        )
    plots = [
        plot_calibration(spec, frame, champion_frame, label, out_dir / "calibration.png"),
        plot_metrics_vs_champion(metrics, champion_metrics, label, oracle, out_dir / "metrics_vs_champion.png"),
    ]
    curve_path = model_dir / "training_curve.json"
    curve: list[dict[str, float]] = json.loads(curve_path.read_text()) if curve_path.exists() else []
    loss_keys = sorted({k for r in curve for k in r if k not in ("step", "epoch") and "/" not in k})
    if curve and loss_keys:
        plots.append(_plot_series(curve, loss_keys, "Training losses", out_dir / "training_curves.png"))
    diag = _diagnostics(model_dir, curve)
    diag_keys = sorted({k for r in diag for k in r if k not in ("step", "epoch")})
    if diag and diag_keys:
        plots.append(_plot_series(diag, diag_keys, "Gradient-method diagnostics", out_dir / "gradient_diagnostics.png"))
    return plots
