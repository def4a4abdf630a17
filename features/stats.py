"""Statistics of the training window that the transform needs (dense standardisation)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class DenseStats:
    """Per dense feature: mean and std of the value after its transform, over the training window's clean rows."""

    mean: dict[str, float]
    std: dict[str, float]
    count: int = 0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> DenseStats:
        data = json.loads(Path(path).read_text())
        return cls(mean=dict(data["mean"]), std=dict(data["std"]), count=int(data.get("count", 0)))

    @classmethod
    def identity(cls, names: list[str]) -> DenseStats:
        """No standardisation (mean 0, std 1); for tests and specs without dense features."""
        return cls(mean=dict.fromkeys(names, 0.0), std=dict.fromkeys(names, 1.0))
