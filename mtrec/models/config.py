"""Model configuration (the ``model:`` section of an experiment YAML)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    architecture: Literal["shared_bottom"] = "shared_bottom"
    bottom_mlp: list[int] = [128, 64]
    tower_mlp: list[int] = [32]
    sequence_pooling: Literal["mean"] = "mean"
    dropout: float = Field(default=0.0, ge=0, lt=1)
