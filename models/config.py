"""Model configuration (the ``model:`` section of an experiment YAML).

A model is a *bottom* (what each task's input is) under a *top* (how tasks share dense layers), then one tower per
task. Any bottom works with any top, chosen here with no code edits::

    model:
      bottom: dtrn          # plain | dtrn
      top: ple              # shared_bottom | mmoe | cgc | ple
      ple: {num_levels: 2, task_experts: 1, shared_experts: 2, expert_mlp: [64]}
      dtrn: {pooling: target_attention, trm_activation: two_sigmoid}

* ``bottom: plain``: every task reads the same vector, [field embeddings, mean-pooled sequences, dense features].
* ``bottom: dtrn``: every task reads its own vector (DTRN: task-specific interest vectors from a hypernetwork-
  conditioned Transformer, then SENet-style field reweighting per task); see ``models/dtrn.py``.

The defaults are the first shipped model (plain bottom, shared-bottom MLP [128, 64], towers [32]). The legacy key
``architecture: shared_bottom`` is still accepted (saved model folders carry it) and means ``top``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MMoEConfig(_Strict):
    """MMoE (Ma et al. 2018): shared experts, one softmax gate per task."""

    num_experts: int = Field(default=4, ge=1)
    expert_mlp: list[int] = Field(default=[64], min_length=1)


class PLEConfig(_Strict):
    """CGC / PLE (Tang et al. 2020): per-task plus shared experts. ``top: cgc`` is one level and ignores
    ``num_levels``; ``top: ple`` stacks ``num_levels`` levels."""

    num_levels: int = Field(default=2, ge=1)
    task_experts: int = Field(default=1, ge=1, description="experts owned by each task, per level")
    shared_experts: int = Field(default=2, ge=1, description="experts shared by every task, per level")
    expert_mlp: list[int] = Field(default=[64], min_length=1, description="every expert's MLP, every level")


class DTRNConfig(_Strict):
    """DTRN (Liu et al. 2023), TIM + TRM. Choices the paper leaves open ("our reading") are switches here."""

    d_model: int | None = Field(
        default=None, gt=0, description="encoder width; unset: the sequence tables' dim (no input projection)"
    )
    num_heads: int = Field(default=2, ge=1)
    num_layers: int = Field(default=1, ge=1)
    ffn_dim: int = Field(default=32, gt=0)
    positional: bool = Field(default=True, description="learned position embeddings (position 0 = newest)")
    task_emb_dim: int = Field(default=8, gt=0)
    type_emb_dim: int = Field(default=8, gt=0)
    hyper_hidden: int = Field(default=32, gt=0, description="hidden width of the LayerNorm hypernetwork")
    hyper_init_std: float = Field(
        default=0.1,
        ge=0,
        description="std of the generated gamma-1 and beta at initialisation: small, so training starts from plain "
        "LayerNorms, but not 0, so tasks differ from the first step",
    )
    pooling: Literal["target_attention", "mean"] = "target_attention"
    attention_mlp: list[int] = Field(default=[32], description="DIN target-attention scorer MLP")
    trm_hidden: int = Field(default=16, gt=0, description="SENet excitation bottleneck width")
    trm_activation: Literal["sigmoid", "two_sigmoid"] = Field(
        default="two_sigmoid", description="excitation: sigmoid (0, 1) or 2*sigmoid (0, 2), centred at 1"
    )
    trm_dense_field: bool = Field(
        default=True, description="reweight the dense features as one more field (else pass them through)"
    )
    expert_input: Literal["per_task", "mean"] = Field(
        default="per_task",
        description="(our reading) experts shared by tasks read each task's h_k (per_task: an expert runs once per "
        "task) or the mean of the h_k (mean: once); gates always read h_k",
    )


class ModelConfig(_Strict):
    bottom: Literal["plain", "dtrn"] = "plain"
    top: Literal["shared_bottom", "mmoe", "cgc", "ple"] = "shared_bottom"
    bottom_mlp: list[int] = Field(default=[128, 64], description="top: shared_bottom's MLP ([] = towers read inputs)")
    tower_mlp: list[int] = [32]
    sequence_pooling: Literal["mean", "sum", "target_attention"] = Field(
        default="mean",
        description="bottom: plain's pooling of sequences that set none in the feature spec (target_attention: a "
        "DIN-style scorer against the candidate item)",
    )
    attention_mlp: list[int] = Field(default=[32], description="hidden layers of the plain bottom's attention scorer")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    mmoe: MMoEConfig = MMoEConfig()
    ple: PLEConfig = PLEConfig()
    dtrn: DTRNConfig = DTRNConfig()

    @model_validator(mode="before")
    @classmethod
    def _legacy_architecture(cls, data: Any) -> Any:
        """``architecture: X`` (the older key, stored in saved model folders) is ``top: X``."""
        if isinstance(data, dict) and "architecture" in data:
            data = dict(data)
            arch = data.pop("architecture")
            if "top" in data and data["top"] != arch:
                raise ValueError(f"'architecture' ({arch}) and 'top' ({data['top']}) disagree; set only 'top'")
            data["top"] = arch
        return data

    @property
    def name(self) -> str:
        """Short architecture name for tables and logs: ``mmoe``, ``dtrn+ple``, ..."""
        return self.top if self.bottom == "plain" else f"dtrn+{self.top}"
