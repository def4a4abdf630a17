"""Models: every (bottom, top) combination's shapes and gradients, DTRN's masking and conditioning, TRM per task,
meta-device materialisation, the parameter report, configs, and the local trainer's determinism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from features.batch import Batch
from features.generator import GeneratorConfig, generate_logs
from features.spec import FeatureSpec, load_feature_spec, parse_feature_spec
from features.stats import DenseStats
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.dtrn import DTRNBottom, HyperNetwork
from models.embeddings import SparseOutput
from models.multitask import (
    MultiTaskLoss,
    MultiTaskModel,
    build_model,
    output_bias_priors,
    parameter_report,
    set_output_bias,
)
from models.net import PlainBottom
from models.tops import PLE, MMoE, SharedBottom
from pipeline.config import load_config
from pipeline.local import train_local

REPO = Path(__file__).resolve().parents[1]
BOTTOMS = ["plain", "dtrn"]
TOPS = ["shared_bottom", "mmoe", "cgc", "ple"]
COMBOS = [(b, t) for b in BOTTOMS for t in TOPS]
# Small but not degenerate: two layers and two heads exercise the per-layer LayerNorm slicing and head reshapes.
SMALL = {
    "bottom_mlp": [32, 16],
    "tower_mlp": [8],
    "mmoe": {"num_experts": 3, "expert_mlp": [16]},
    "ple": {"num_levels": 2, "task_experts": 1, "shared_experts": 2, "expert_mlp": [16]},
    "dtrn": {"num_layers": 2, "num_heads": 2, "ffn_dim": 16, "hyper_hidden": 8, "attention_mlp": [8], "trm_hidden": 4},
}


def small_spec() -> FeatureSpec:
    """The shipped spec with small tables (fast to build) and its tasks, sequences and fields unchanged."""
    data = yaml.safe_load((REPO / "configs/features/behaviour_logs.yaml").read_text())
    for t in data["tables"]:
        t["num_buckets"] = min(t["num_buckets"], 500)
    return parse_feature_spec(data)


def model_cfg(bottom: str, top: str, **dtrn: object) -> ModelConfig:
    data = {**SMALL, "bottom": bottom, "top": top}
    data["dtrn"] = {**SMALL["dtrn"], **dtrn}
    return ModelConfig.model_validate(data)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureSpec, DenseStats, pa.Table]:
    """Two days of generated logs with few users, so behaviour sequences range from empty to full."""
    out = tmp_path_factory.mktemp("logs")
    cfg = GeneratorConfig(seed=1, num_days=2, impressions_per_day=2000, num_users=60, num_items=400, conflict=1.0)
    result = generate_logs(cfg, out / "logs", out / "oracle.parquet")
    table = pa.concat_tables([pq.read_table(f) for f in result.files])
    spec = small_spec()
    stats = dense_stats_from_moments([compute_dense_moments(table, spec)], spec)
    return spec, stats, table


@pytest.fixture(scope="module")
def batch(data: tuple[FeatureSpec, DenseStats, pa.Table]) -> Batch:
    spec, stats, table = data
    return BatchTransform(spec, stats)(table.slice(table.num_rows - 256, 256))


def seeded_model(spec: FeatureSpec, cfg: ModelConfig, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model(spec, cfg)


def test_batch_has_empty_and_full_sequences(batch: Batch, data: tuple[FeatureSpec, DenseStats, pa.Table]) -> None:
    spec = data[0]
    lengths = batch.sparse.to_dict()
    for f in spec.sequences:
        n = lengths[f.name].lengths()
        assert int(n.min()) == 0, f.name  # the masking tests below need empty rows ...
    assert int(lengths["click_seq"].lengths().max()) >= 10  # ... and long ones


@pytest.mark.parametrize(("bottom", "top"), COMBOS)
def test_shapes_and_finite_gradients(
    bottom: str, top: str, batch: Batch, data: tuple[FeatureSpec, DenseStats, pa.Table]
) -> None:
    spec = data[0]
    model = seeded_model(spec, model_cfg(bottom, top))
    outputs = model(batch)
    assert model.task_names == ["ctr", "cvr", "dwell"]
    assert set(outputs) == set(model.task_names)
    for out in outputs.values():
        assert out.shape == (batch.batch_size,)
        assert torch.isfinite(out).all()
    total, losses = MultiTaskLoss(spec)(outputs, batch.labels)
    assert set(losses) == set(model.task_names)
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    dense = [p for n, p in model.named_parameters() if not n.startswith("sparse.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dense[:1])
    if bottom == "dtrn":
        hyper = model.bottom.tim.hyper  # type: ignore[union-attr]
        assert hyper.task_emb.grad is not None and hyper.task_emb.grad.abs().sum() > 0  # the hypernetwork learns
        assert hyper.type_emb.grad is not None and hyper.type_emb.grad.abs().sum() > 0


def _garbage_padding(out: SparseOutput, extra: int, seed: int) -> SparseOutput:
    """Same real positions, random values at every padded position, and ``extra`` more padded positions."""
    g = torch.Generator().manual_seed(seed)
    sequences = {}
    for name, (seq, mask) in out.sequences.items():
        b, length, d = seq.shape
        noisy = torch.randn(b, length + extra, d, generator=g) * 10
        full_mask = torch.cat([mask, torch.zeros(b, extra, dtype=torch.bool)], dim=1)
        noisy[:, :length][mask] = seq[mask]
        sequences[name] = (noisy, full_mask)
    return SparseOutput(fields=dict(out.fields), sequences=sequences)


@pytest.mark.parametrize("pooling", ["target_attention", "mean"])
def test_padding_does_not_change_outputs(
    pooling: str, batch: Batch, data: tuple[FeatureSpec, DenseStats, pa.Table]
) -> None:
    spec = data[0]
    model = seeded_model(spec, model_cfg("dtrn", "mmoe", pooling=pooling)).eval()
    bottom = model.bottom
    assert isinstance(bottom, DTRNBottom)
    with torch.no_grad():
        out = model.sparse(batch.sparse)
        reference = bottom(out, batch.dense)
        for seed, extra in [(0, 0), (1, 7)]:
            noisy = bottom(_garbage_padding(out, extra, seed), batch.dense)
            for a, b in zip(reference, noisy, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # Rows with an empty sequence get a zero interest vector for it, under every task.
        u = bottom.interests(out)
        for m, name in enumerate(bottom.sequences):
            empty = ~out.sequences[name][1].any(dim=1)
            assert empty.any()
            assert torch.all(u[:, m][:, empty] == 0)
            assert torch.all(u[:, m][:, ~empty].abs().sum(-1) > 0)


@pytest.mark.parametrize("pooling", ["target_attention", "sum", "mean"])
def test_plain_bottom_pooling_ignores_padding(
    pooling: str, batch: Batch, data: tuple[FeatureSpec, DenseStats, pa.Table]
) -> None:
    spec = data[0]
    cfg = ModelConfig.model_validate({**SMALL, "bottom": "plain", "top": "mmoe", "sequence_pooling": pooling})
    model = seeded_model(spec, cfg).eval()
    bottom = model.bottom
    assert isinstance(bottom, PlainBottom)
    assert set(bottom.attention) == ({f.name for f in spec.sequences} if pooling == "target_attention" else set())
    with torch.no_grad():
        out = model.sparse(batch.sparse)
        reference = bottom(out, batch.dense)[0]
        for seed, extra in [(0, 0), (1, 7)]:
            torch.testing.assert_close(
                bottom(_garbage_padding(out, extra, seed), batch.dense)[0], reference, rtol=1e-5, atol=1e-5
            )
        for name in bottom.sequences:  # an empty history pools to 0
            empty = ~out.sequences[name][1].any(dim=1)
            assert empty.any() and torch.all(bottom.pool(name, out)[empty] == 0)


def test_target_attention_reads_history_relative_to_the_candidate(
    batch: Batch, data: tuple[FeatureSpec, DenseStats, pa.Table]
) -> None:
    """Same history, another candidate: the attention-pooled history changes (with two or more distinct positions the
    weights depend on the query), the mean-pooled one cannot."""
    spec = data[0]
    cfg = ModelConfig.model_validate({**SMALL, "bottom": "plain", "sequence_pooling": "target_attention"})
    model = seeded_model(spec, cfg).eval()
    bottom = model.bottom
    assert isinstance(bottom, PlainBottom)
    with torch.no_grad():
        out = model.sparse(batch.sparse)
        query = torch.randn(out.fields["item_id"].shape, generator=torch.Generator().manual_seed(0))
        other = SparseOutput(fields={**out.fields, "item_id": query}, sequences=out.sequences)
        values, mask = out.sequences["click_seq"]
        distinct = ((values - values[:, :1]).abs().sum(-1) > 0) & mask  # a position unlike the newest one
        rows = distinct.any(dim=1)
        changed = (bottom.pool("click_seq", out) - bottom.pool("click_seq", other)).abs().sum(-1)
        assert rows.sum() > 10 and torch.all(changed[rows] > 0)
        assert torch.all(changed[~mask.any(dim=1)] == 0)


def test_per_sequence_pooling_from_the_spec_and_its_errors(data: tuple[FeatureSpec, DenseStats, pa.Table]) -> None:
    raw = yaml.safe_load((REPO / "configs/features/behaviour_logs.yaml").read_text())
    for t in raw["tables"]:
        t["num_buckets"] = min(t["num_buckets"], 500)
    raw["sequences"][0]["pooling"] = "target_attention"
    raw["sequences"][1]["pooling"] = "sum"
    bottom = build_model(parse_feature_spec(raw), model_cfg("plain", "mmoe")).bottom
    assert isinstance(bottom, PlainBottom)
    assert bottom.pooling == {"click_seq": "target_attention", "cart_seq": "sum", "purchase_seq": "mean"}
    raw["sparse"] = [f for f in raw["sparse"] if f["table"] != "item"]  # no candidate on the item table
    with pytest.raises(ValueError, match=r"sequence 'click_seq': pooling target_attention needs a single-valued"):
        build_model(parse_feature_spec(raw), model_cfg("plain", "mmoe"))


def test_dtrn_pools_each_sequence_as_its_spec_says(batch: Batch) -> None:
    """A sequence's own `pooling` overrides dtrn.pooling; a sequence with no candidate item on its table (a bag of
    the candidate's genres) can be mean-pooled, and asking target attention of it is an error that names it."""
    raw = yaml.safe_load((REPO / "configs/features/behaviour_logs.yaml").read_text())
    for t in raw["tables"]:
        t["num_buckets"] = min(t["num_buckets"], 500)
    raw["sequences"][1]["pooling"] = "sum"
    raw["sequences"][2]["pooling"] = "mean"
    summed = seeded_model(parse_feature_spec(raw), model_cfg("dtrn", "mmoe")).eval()
    assert isinstance(summed.bottom, DTRNBottom)
    assert summed.bottom.poolings == ["target_attention", "sum", "mean"]
    assert summed.bottom.candidates == ["item_id", None, None]
    raw["sequences"][1]["pooling"] = "mean"
    meaned = seeded_model(parse_feature_spec(raw), model_cfg("dtrn", "mmoe")).eval()
    assert isinstance(meaned.bottom, DTRNBottom)
    with torch.no_grad():
        u_sum = summed.bottom.interests(summed.sparse(batch.sparse))
        u_mean = meaned.bottom.interests(meaned.sparse(batch.sparse))
    count = batch.sparse.to_dict()["cart_seq"].lengths().clamp_min(1).to(u_sum.dtype)
    assert int(count.max()) > 1
    torch.testing.assert_close(u_sum[:, 1], u_mean[:, 1] * count[None, :, None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u_sum[:, [0, 2]], u_mean[:, [0, 2]])

    raw["sparse"] = [f for f in raw["sparse"] if f["table"] != "item"]  # no candidate for any sequence
    with pytest.raises(ValueError, match=r"bottom: dtrn pools \['click_seq'\] by target attention"):
        build_model(parse_feature_spec(raw), model_cfg("dtrn", "mmoe"))
    raw["sequences"][0]["pooling"] = "mean"
    assert isinstance(build_model(parse_feature_spec(raw), model_cfg("dtrn", "mmoe")).bottom, DTRNBottom)


def test_dtrn_builds_on_the_movielens_spec() -> None:
    """The MovieLens spec's bag of genres says `pooling: mean`, so bottom: dtrn attends only over the histories."""
    spec = load_feature_spec(REPO / "configs/features/movielens.yaml")
    bottom = build_model(spec, model_cfg("dtrn", "mmoe")).bottom
    assert isinstance(bottom, DTRNBottom)
    assert dict(zip(bottom.sequences, bottom.poolings, strict=True))["genres"] == "mean"
    assert bottom.candidates == ["movie_id", "movie_id", "movie_id", None]


def test_rows_are_independent_of_the_batch(batch: Batch, data: tuple[FeatureSpec, DenseStats, pa.Table]) -> None:
    """A row's prediction does not depend on the other rows (e.g. via the batch's longest sequence)."""
    spec, stats, table = data
    model = seeded_model(spec, model_cfg("dtrn", "ple")).eval()
    transform = BatchTransform(spec, stats)
    rows = table.slice(table.num_rows - 256, 256)
    lengths = np.array([len(x) for x in rows.column("click_seq").to_pylist()])
    short = np.flatnonzero(lengths == 0)[:4]
    with torch.no_grad():
        full = model(transform(rows))
        alone = model(transform(rows.take(pa.array(short))))
    for task in model.task_names:
        torch.testing.assert_close(full[task][torch.from_numpy(short)], alone[task], rtol=1e-5, atol=1e-5)


def test_hypernetwork_conditions_interest_vectors(batch: Batch, data: tuple[FeatureSpec, DenseStats, pa.Table]) -> None:
    spec = data[0]
    model = seeded_model(spec, model_cfg("dtrn", "mmoe"))
    bottom = model.bottom
    assert isinstance(bottom, DTRNBottom)
    with torch.no_grad():
        out = model.sparse(batch.sparse)
        u = bottom.interests(out)  # [K, M, B, d]
        assert u.shape == (3, 3, batch.batch_size, bottom.tim.d_model)
        rows = out.sequences["click_seq"][1].any(dim=1)
        diff = (u[0, 0, rows] - u[1, 0, rows]).abs().amax(dim=-1)
        assert torch.all(diff > 1e-4), "two tasks must give different interest vectors for the same sequence"
        # The difference comes from the hypernetwork alone: with its output zeroed every (task, type) pair gets the
        # same LayerNorms (gamma 1, beta 0) and the tasks agree.
        bottom.tim.hyper.out.weight.zero_()
        u0 = bottom.interests(out)
        torch.testing.assert_close(u0[0], u0[1])
        torch.testing.assert_close(u0[0], u0[2])


def test_trm_weights_differ_per_task(batch: Batch, data: tuple[FeatureSpec, DenseStats, pa.Table]) -> None:
    spec = data[0]
    model = seeded_model(spec, model_cfg("dtrn", "shared_bottom"))
    bottom = model.bottom
    assert isinstance(bottom, DTRNBottom)
    with torch.no_grad():
        out = model.sparse(batch.sparse)
        u = bottom.interests(out)
        fields = bottom.task_fields(out, batch.dense, u, 0)
        w = [bottom.trm.weights(k, fields) for k in range(3)]  # same fields, each task's excitation
        hs = bottom(out, batch.dense)
    assert w[0].shape == (batch.batch_size, len(spec.sparse) + 1 + len(spec.sequences))
    assert torch.all((w[0] > 0) & (w[0] < 2))  # two_sigmoid
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
    assert all(h.shape == (batch.batch_size, model.input_dim) for h in hs)
    assert not torch.allclose(hs[0], hs[1])


def test_tops_share_work_and_mix_experts() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 12)
    # Identical inputs: per_task and mean readings agree (shared layers run once on the one input).
    for top_cls in (MMoE, PLE):
        kwargs = {"num_experts": 3} if top_cls is MMoE else {"num_levels": 2, "task_experts": 1, "shared_experts": 2}
        torch.manual_seed(1)
        a = top_cls(12, 3, expert_mlp=[4], expert_input="per_task", **kwargs)  # type: ignore[arg-type]
        torch.manual_seed(1)
        b = top_cls(12, 3, expert_mlp=[4], expert_input="mean", **kwargs)  # type: ignore[arg-type]
        for ya, yb in zip(a([x] * 3), b([x] * 3), strict=True):
            torch.testing.assert_close(ya, yb)
    # MMoE is a convex mix of its experts.
    mmoe = MMoE(12, 2, num_experts=3, expert_mlp=[4])
    experts = torch.stack([e(x) for e in mmoe.experts], dim=1)
    gate = torch.softmax(mmoe.gates[1](x), dim=-1)
    torch.testing.assert_close(mmoe([x, x])[1], (gate.unsqueeze(-1) * experts).sum(1))
    # Distinct inputs (per_task): task k's gate mixes the experts run on its own input.
    xs = [x, torch.randn(5, 12)]
    for k, out in enumerate(mmoe(xs)):
        own = torch.stack([e(xs[k]) for e in mmoe.experts], dim=1)
        torch.testing.assert_close(out, (torch.softmax(mmoe.gates[k](xs[k]), dim=-1).unsqueeze(-1) * own).sum(1))
    # Distinct inputs: a shared-bottom task output depends on its own input only.
    sb = SharedBottom(12, [4], 2, 0.0)
    y = torch.randn(5, 12)
    torch.testing.assert_close(sb([x, y])[0], sb([x, x])[0])
    assert PLE(12, 3, 1, 1, 1, [4]).levels[0].shared_gate is None  # CGC: no shared gate at the last level


def _materialise_like_dmp(model: torch.nn.Module) -> None:
    """What DistributedModelParallel does to a meta model (torchrec ``_init_parameters``): allocate every meta
    parameter, then call ``reset_parameters`` on each module that holds one directly, children first."""

    @torch.no_grad()
    def init(module: torch.nn.Module) -> None:
        has_meta = False
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.full_like(p, float("nan"), device="cpu"))
                has_meta = True
        if has_meta and hasattr(module, "reset_parameters"):
            module.reset_parameters()

    model.apply(init)


@pytest.mark.parametrize(("bottom", "top"), COMBOS)
def test_meta_build_materialises_every_parameter(
    bottom: str, top: str, batch: Batch, data: tuple[FeatureSpec, DenseStats, pa.Table]
) -> None:
    spec = data[0]
    cfg = model_cfg(bottom, top)
    model = build_model(spec, cfg, torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())
    meta_report = parameter_report(model, spec, cfg)
    _materialise_like_dmp(model)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} was left uninitialised"  # NaN-filled above, so reset must run
    assert parameter_report(model, spec, cfg) == meta_report
    outputs = model(batch)
    assert all(torch.isfinite(o).all() for o in outputs.values())
    if bottom == "dtrn":
        gamma, beta = model.bottom.tim.hyper()  # type: ignore[union-attr,operator]
        # The custom init ran (not nn.Linear's default): LayerNorms start near the identity.
        assert float((gamma - 1).abs().mean()) < 0.3 and float(beta.abs().mean()) < 0.3


def test_hypernetwork_init_scale() -> None:
    torch.manual_seed(0)
    hyper = HyperNetwork(6, 6, 4, 64, 8, 8, 32, init_std=0.1)
    gamma, beta = hyper()
    assert 0.05 < float((gamma - 1).std()) < 0.2 and 0.05 < float(beta.std()) < 0.2


def test_parameter_report(data: tuple[FeatureSpec, DenseStats, pa.Table]) -> None:
    spec = data[0]
    plain_cfg = model_cfg("plain", "shared_bottom")
    plain = parameter_report(build_model(spec, plain_cfg, torch.device("meta")), spec, plain_cfg)
    assert plain["total"] == plain["embeddings"] + plain["dense"]
    assert plain["dense"] == plain["bottom"] + plain["top"] + plain["towers"]
    assert plain["bottom"] == 0 and not any(k.startswith("dtrn.") for k in plain)
    assert plain["embeddings"] == sum(t.num_buckets * t.dim for t in spec.tables)
    cfg = model_cfg("dtrn", "ple")
    report = parameter_report(build_model(spec, cfg, torch.device("meta")), spec, cfg)
    assert report["dtrn.tasks_K"] == 3 and report["dtrn.behaviour_types_M"] == 3
    assert report["dtrn.separate_encoders_KxM"] == 9 * report["dtrn.one_encoder_with_layernorms"]
    assert report["dtrn.encoder_and_hypernetwork"] < report["dtrn.separate_encoders_KxM"]
    assert report["embeddings"] == plain["embeddings"]


def test_model_config_defaults_and_legacy_key() -> None:
    default = ModelConfig()
    assert (default.bottom, default.top) == ("plain", "shared_bottom")
    assert (default.bottom_mlp, default.tower_mlp) == ([128, 64], [32])
    legacy = ModelConfig.model_validate({"architecture": "shared_bottom", "sequence_pooling": "mean"})
    assert legacy == default  # model.json of models saved by earlier versions still loads
    with pytest.raises(ValueError, match="disagree"):
        ModelConfig.model_validate({"architecture": "shared_bottom", "top": "mmoe"})
    with pytest.raises(ValueError):
        ModelConfig.model_validate({"top": "mmoe", "mmoe": {"num_experts": 0}})


def test_default_model_keeps_the_slice_state_dict_keys() -> None:
    spec = load_feature_spec(REPO / "configs/features/behaviour_logs.yaml")
    keys = build_model(spec, ModelConfig(), torch.device("meta")).state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"sparse", "top", "towers"}
    assert "top.bottom.0.weight" in keys


@pytest.mark.parametrize(
    ("name", "bottom", "top"),
    [("demo", "plain", "shared_bottom"), ("mmoe", "plain", "mmoe"), ("ple", "plain", "ple"),
     ("dtrn_mmoe", "dtrn", "mmoe"), ("dtrn_ple", "dtrn", "ple")],
)  # fmt: skip
def test_experiment_configs_choose_the_architecture(name: str, bottom: str, top: str) -> None:
    cfg = load_config(REPO / "configs/experiments" / f"{name}.yaml")
    assert (cfg.model.bottom, cfg.model.top) == (bottom, top)
    build_model(cfg.feature_spec(), cfg.model, torch.device("meta"))


def test_repeat_config_matches_the_candidate_against_every_history(tmp_path: Path) -> None:
    """configs/experiments/repeat.yaml (the repeat knob on, match features, attention) on a small world of its kind:
    every match feature finds candidates in its history, and its model builds and runs on the batch."""
    cfg = load_config(REPO / "configs/experiments/repeat.yaml")
    assert cfg.generator is not None and cfg.generator.repeat > 0
    small = cfg.generator.model_copy(update={"impressions_per_day": 3000, "num_users": 200, "num_items": 600})
    result = generate_logs(small, tmp_path / "logs", tmp_path / "oracle.parquet")
    table = pa.concat_tables([pq.read_table(f) for f in result.files])
    spec = cfg.feature_spec()
    stats = dense_stats_from_moments([compute_dense_moments(table, spec)], spec)
    batch = BatchTransform(spec, stats)(table)
    counts = batch.dense[:, len(spec.dense) :: 2]  # each match feature's log1p(count), then its recency
    assert counts.shape[1] == len(spec.match) == 4
    assert torch.all((counts > 0).sum(dim=0) > 10), [m.name for m in spec.match]
    model = seeded_model(spec, cfg.model).eval()
    with torch.no_grad():
        assert all(torch.isfinite(v).all() for v in model(batch).values())


def test_train_local_is_deterministic_and_takes_a_custom_backward(
    data: tuple[FeatureSpec, DenseStats, pa.Table],
) -> None:
    spec, stats, table = data
    cfg = model_cfg("dtrn", "mmoe")

    def train(seed: int, **extra: Any) -> MultiTaskModel:
        return train_local(
            spec, cfg, stats, table, epochs=1, batch_size=128, dense_lr=1e-3, embedding_lr=0.05, seed=seed,
            max_steps=4, **extra,
        )  # fmt: skip

    sa, sb, sc = train(3).state_dict(), train(3).state_dict(), train(4).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)

    steps: list[dict[str, float]] = []

    def ctr_only(losses: dict[str, torch.Tensor], model: MultiTaskModel) -> None:
        losses["ctr"].backward()

    init = seeded_model(spec, cfg, seed=5).state_dict()
    sd = train(5, backward=ctr_only, on_step=lambda s, v: steps.append(v), init_output_bias=False).state_dict()
    assert len(steps) == 4 and set(steps[0]) == {"ctr", "cvr", "dwell", "total"}
    assert all(torch.equal(sd[k], init[k]) for k in sd if k.startswith("towers.cvr"))  # no gradient, no step
    assert not all(torch.equal(sd[k], init[k]) for k in sd if k.startswith("towers.ctr"))


def test_output_bias_priors(data: tuple[FeatureSpec, DenseStats, pa.Table]) -> None:
    spec, stats, table = data
    labels = BatchTransform(spec, stats).labels_numpy(table)
    priors = output_bias_priors(spec, labels)
    click = labels["ctr"] > 0.5
    assert priors["ctr"] == pytest.approx(float(np.log(click.mean() / (1 - click.mean()))))
    cvr = labels["cvr"][click].mean()  # ESMM child: p(conversion | click)
    assert priors["cvr"] == pytest.approx(float(np.log(cvr / (1 - cvr))))
    assert priors["dwell"] == pytest.approx(float(labels["dwell"][click].mean()), rel=1e-6)  # given: ctr
    model = seeded_model(spec, model_cfg("plain", "mmoe"))
    set_output_bias(model, priors)
    assert float(model.towers["dwell"][1].bias) == pytest.approx(priors["dwell"])
    wrapped = torch.nn.ModuleDict({"module": model})  # names as under a wrapper (DMP: _dmp_wrapped_module.module.)
    set_output_bias(wrapped, {"ctr": -1.0})
    assert float(model.towers["ctr"][1].bias) == -1.0
    with pytest.raises(KeyError):
        set_output_bias(model, {"nope": 0.0})
