"""DRGrad's split-tower head inside the pipeline's model (``build_model(..., drgrad=...)``): wiring, the personalized
gate, output-bias priors, config errors, training steps with the router, and the saved-folder round trip."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from features.batch import Batch
from features.generator import GeneratorConfig, generate_logs
from features.spec import FeatureSpec
from features.stats import DenseStats
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.drgrad import SplitTowerHead
from models.gradients import GradientConfig, build_gradient_method, head_config
from models.io import MODEL_FILE, WEIGHTS_FILE, load_model
from models.multitask import MultiTaskLoss, build_model, parameter_report, set_output_bias
from tests.test_models import SMALL, small_spec

PAPER: dict[str, Any] = {
    "method": "drgrad",
    "diagnostics_every": 1,
    "drgrad": {"updater": "ema", "personalized_gate": ["user_id", "item_id", "seller_id"]},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureSpec, DenseStats, Batch]:
    out = tmp_path_factory.mktemp("logs")
    cfg = GeneratorConfig(seed=2, num_days=2, impressions_per_day=1500, num_users=80, num_items=400, conflict=1.0)
    result = generate_logs(cfg, out / "logs", out / "oracle.parquet")
    table = pa.concat_tables([pq.read_table(f) for f in result.files])
    spec = small_spec()
    stats = dense_stats_from_moments([compute_dense_moments(table, spec)], spec)
    return spec, stats, BatchTransform(spec, stats)(table.slice(0, 512))


def _model_cfg(top: str = "mmoe") -> ModelConfig:
    return ModelConfig.model_validate({**SMALL, "top": top})


def _grad_cfg(**drgrad: Any) -> GradientConfig:
    return GradientConfig.model_validate({**PAPER, "drgrad": {**PAPER["drgrad"], **drgrad}})


@pytest.mark.parametrize("top", ["shared_bottom", "mmoe", "ple"])
def test_head_replaces_towers_and_trains(data: tuple[FeatureSpec, DenseStats, Batch], top: str) -> None:
    spec, _, batch = data
    cfg = _grad_cfg()
    torch.manual_seed(0)
    model = build_model(spec, _model_cfg(top), drgrad=head_config(cfg))
    assert len(model.towers) == 0 and isinstance(model.head, SplitTowerHead)
    assert model.head.primary == "ctr" and model.head.aux_names == ["cvr", "dwell"]
    assert model.head.ppnet is not None and model.head.ppnet.weight.shape[1] == 16 + 16 + 8  # user, item, seller
    method = build_gradient_method(cfg, model, model.task_names)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = MultiTaskLoss(spec)
    diags = []
    for _ in range(3):
        out = model(batch)
        assert set(out) == {"ctr", "cvr", "dwell"} and all(v.shape == (512,) for v in out.values())
        opt.zero_grad()
        diags.append(method.backward(loss_fn.task_losses(out, batch.labels)))
        opt.step()
    assert {"drgrad/xi1", "drgrad/xi2", "drgrad/lam1", "drgrad/lam2", "drgrad/mu_own"} <= set(diags[-1])
    assert float(model.head.mu[0]) != 0.5  # the updater moved mu
    assert model.head.ppnet.weight.abs().sum() > 0  # the gate learns (it starts at the identity)


def test_no_gate_and_errors_name_the_field(data: tuple[FeatureSpec, DenseStats, Batch]) -> None:
    spec, _, _ = data
    plain = build_model(spec, _model_cfg(), drgrad=head_config(_grad_cfg(personalized_gate=[])))
    assert plain.head is not None and plain.head.ppnet is None
    with pytest.raises(ValueError, match=r"personalized_gate: \['shop_id'\]"):
        build_model(spec, _model_cfg(), drgrad=head_config(_grad_cfg(personalized_gate=["shop_id"])))
    with pytest.raises(ValueError, match="primary_task: 'clicks'"):
        build_model(spec, _model_cfg(), drgrad=head_config(_grad_cfg(primary_task="clicks")))
    with pytest.raises(ValueError, match="aux_input: shared"):
        build_model(spec, _model_cfg(), drgrad=head_config(_grad_cfg(per_sample=True, router=False)))
    # Other methods keep the ordinary towers.
    assert head_config(GradientConfig(method="pcgrad")) is None


def test_dwell_as_primary_and_per_sample_shared(data: tuple[FeatureSpec, DenseStats, Batch]) -> None:
    spec, _, batch = data
    cfg = _grad_cfg(primary_task="dwell", per_sample=True, aux_input="shared")
    model = build_model(spec, _model_cfg(), drgrad=head_config(cfg))
    assert model.head is not None and model.head.primary == "dwell"
    method = build_gradient_method(cfg, model, model.task_names)
    out = model(batch)
    diag = method.backward(MultiTaskLoss(spec).task_losses(out, batch.labels))
    assert "drgrad/sample_conflict" in diag


def test_output_bias_sets_both_primary_towers(data: tuple[FeatureSpec, DenseStats, Batch]) -> None:
    spec = data[0]
    model = build_model(spec, _model_cfg(), drgrad=head_config(_grad_cfg()))
    assert model.head is not None
    set_output_bias(model, {"ctr": -3.0, "cvr": -2.0, "dwell": 2.5})
    assert float(model.head.own[1].bias) == float(model.head.shared[1].bias) == -3.0  # type: ignore[index]
    assert float(model.head.aux["cvr"][1].bias) == -2.0 and float(model.head.aux["dwell"][1].bias) == 2.5
    report = parameter_report(model, spec, model.cfg)
    assert report["towers"] == sum(p.numel() for p in model.head.parameters())


def test_saved_folder_round_trip(data: tuple[FeatureSpec, DenseStats, Batch], tmp_path: Path) -> None:
    """A model folder written by the train stage (model.json carries the gradients section) reloads as the same
    DRGrad model, mu included (sigma is a buffer in the weights)."""
    spec, stats, batch = data
    cfg = _grad_cfg()
    model = build_model(spec, _model_cfg(), drgrad=head_config(cfg))
    assert model.head is not None
    with torch.no_grad():
        model.head.sigma.copy_(torch.tensor([0.3, -0.2]))
    model.eval()
    save_file(model.state_dict(), str(tmp_path / WEIGHTS_FILE))
    description = {
        "spec": spec.model_dump(mode="json"),
        "model": model.cfg.model_dump(mode="json"),
        "gradients": cfg.model_dump(mode="json"),
        "stats": asdict(stats),
    }
    (tmp_path / MODEL_FILE).write_text(json.dumps(description))
    loaded = load_model(tmp_path)
    assert loaded.model.head is not None
    torch.testing.assert_close(loaded.model.head.mu, model.head.mu)
    with torch.no_grad():
        a, b = model(batch), loaded.model(batch)
    for t in a:
        torch.testing.assert_close(a[t], b[t])
