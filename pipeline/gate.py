"""The promotion gate as a pure function of two models' metrics and the config's rules, failing closed: a missing or
non-finite value fails its check, and a gate passes only when finite values were actually compared (against the
champion's metrics on the same rows, or, for a first champion, against the absolute ``promotion.bounds``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from pipeline.config import GATE_METRICS, Bound

T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """One gated metric. Against the champion: ``drop`` is the regression in the metric's units (positive = worse)
    and ``max_drop`` the allowed one. An absolute bound (``promotion.bounds``): ``bound_min``/``bound_max``.
    ``compared`` is true when finite values were actually compared; a gate passes only with such checks."""

    key: str  # <evaluation name>.<metric>
    challenger: float | None
    champion: float | None
    drop: float | None
    max_drop: float | None
    passed: bool
    note: str = ""
    bound_min: float | None = None
    bound_max: float | None = None
    compared: bool = False

    @property
    def is_bound(self) -> bool:
        return self.bound_min is not None or self.bound_max is not None

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        if self.note:
            return f"{self.key}: {self.note} {verdict}"
        assert self.challenger is not None
        if self.is_bound:
            lo = "-inf" if self.bound_min is None else f"{self.bound_min:.4f}"
            hi = "inf" if self.bound_max is None else f"{self.bound_max:.4f}"
            return f"{self.key} {self.challenger:.4f} within [{lo}, {hi}] {verdict}"
        assert self.champion is not None and self.drop is not None and self.max_drop is not None
        return (
            f"{self.key} {self.challenger:.4f} vs {self.champion:.4f}: drop {self.drop:+.4f} "
            f"(max {self.max_drop:.4f}) {verdict}"
        )


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: list[Check]
    with_champion: bool = True

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def compared(self) -> list[Check]:
        """Checks that compared finite values (against the champion when there is one, else against bounds)."""
        return [c for c in self.checks if c.compared and (c.is_bound != self.with_champion)]

    def reason(self) -> str:
        if self.failures:
            return "failed: " + "; ".join(c.describe() for c in self.failures)
        if not self.compared:
            if self.with_champion:
                return "nothing compared: no gated metric has a finite value in both models (promotion.thresholds)"
            return (
                "nothing checked: there is no champion to compare with and no absolute bound (promotion.bounds) "
                "applies; configure promotion.bounds, or pass --allow-first to accept a first champion unchecked"
            )
        what = "gated metrics within thresholds" if self.with_champion else "metrics within promotion.bounds"
        return f"all {len(self.checks)} {what}"

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
    return x is not None and math.isfinite(x)


def _expand(rules: dict[str, T], names: set[str], has: Callable[[str, str], bool]) -> dict[str, T]:
    """Explicit ``name.metric`` entries, plus ``*.metric`` for every name in ``names`` that ``has`` the metric."""
    out: dict[str, T] = {}
    for key, value in rules.items():
        name, _, metric = key.rpartition(".")
        if name == "*":
            for ev in sorted(names):
                if has(ev, metric):
                    out.setdefault(f"{ev}.{metric}", value)
    out.update({k: v for k, v in rules.items() if not k.startswith("*.")})
    return out


def _threshold_checks(
    challenger: dict[str, dict[str, float]], champion: dict[str, dict[str, float]], thresholds: dict[str, float]
) -> list[Check]:
    both = set(challenger) & set(champion)
    rules = _expand(thresholds, both, lambda ev, m: m in challenger[ev] or m in champion[ev])
    checks: list[Check] = []
    for key in sorted(rules):
        name, _, metric = key.rpartition(".")
        max_drop = rules[key]
        new = challenger.get(name, {}).get(metric)
        old = champion.get(name, {}).get(metric)
        if new is None or old is None:
            who = "challenger" if new is None else "champion"
            checks.append(Check(key, new, old, None, max_drop, False, f"missing in the {who}'s metrics"))
        elif not (_finite(new) and _finite(old)):
            who = " and ".join(w for w, v in (("challenger's", new), ("champion's", old)) if not _finite(v))
            checks.append(Check(key, new, old, None, max_drop, False, f"the {who} value is not finite"))
        else:
            drop = _regression(metric, new, old)
            checks.append(Check(key, new, old, drop, max_drop, drop <= max_drop + 1e-12, compared=True))
    return checks


def _bound_checks(challenger: dict[str, dict[str, float]], bounds: dict[str, Bound]) -> list[Check]:
    rules = _expand(bounds, set(challenger), lambda ev, m: m in challenger[ev])
    checks: list[Check] = []
    for key in sorted(rules):
        name, _, metric = key.rpartition(".")
        lo, hi = rules[key].min, rules[key].max
        value = challenger.get(name, {}).get(metric)
        if value is None:
            checks.append(Check(key, None, None, None, None, False, "missing in the challenger's metrics", lo, hi))
        elif not _finite(value):
            checks.append(Check(key, value, None, None, None, False, "the challenger's value is not finite", lo, hi))
        else:
            ok = (lo is None or value >= lo) and (hi is None or value <= hi)
            checks.append(Check(key, value, None, None, None, ok, "", lo, hi, compared=True))
    return checks


def gate(
    challenger: dict[str, dict[str, float]],
    champion: dict[str, dict[str, float]] | None,
    thresholds: dict[str, float],
    bounds: dict[str, Bound] | None = None,
) -> GateResult:
    """Fail-closed gate. Against a champion: the per-metric thresholds (see PromotionConfig), explicit
    ``name.metric`` entries, then ``*.metric`` for every evaluation name both models have; and the absolute
    ``bounds`` of the challenger. Without a champion (``None``): the bounds only.

    Any check fails on a missing or non-finite value (NaN vs NaN included). The gate passes only when every check
    passed and at least one compared finite values: against the champion when there is one, against a bound
    otherwise."""
    checks = _threshold_checks(challenger, champion, thresholds) if champion is not None else []
    checks += _bound_checks(challenger, bounds or {})
    judged = GateResult(passed=False, checks=checks, with_champion=champion is not None)
    passed = not judged.failures and bool(judged.compared)
    return GateResult(passed=passed, checks=checks, with_champion=judged.with_champion)
