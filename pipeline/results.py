"""What every stage result shares: it is saved as JSON in the run folder, so the stages can run as separate commands,
and loading a missing one says which stage to run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Self


class StageResult:
    """Mixin for a stage's (frozen) result dataclass; ``STAGE`` names the stage that writes it."""

    STAGE: ClassVar[str]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))  # type: ignore[call-overload]

    @classmethod
    def load(cls, path: Path) -> Self:
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the {cls.STAGE} stage first")
        data: dict[str, Any] = json.loads(path.read_text())
        return cls(**data)
