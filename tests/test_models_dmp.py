"""Every (bottom, top) combination under TorchRec's DistributedModelParallel, as the Ray workers run it: built on the
meta device, planned and sharded over 2 gloo processes, materialised by DMP (which must run our custom inits),
trained two steps with the fused embedding optimizer and Adam, then checked against the unsharded model loaded with
the gathered weights."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from features.generator import GeneratorConfig, generate_logs
from features.spec import FeatureSpec, parse_feature_spec
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.multitask import MultiTaskLoss, build_model
from models.sharding import dense_optimizer, embedding_sharders, gather_state_dict, shard_model

REPO = Path(__file__).resolve().parents[1]
COMBOS = [(b, t) for b in ("plain", "dtrn") for t in ("shared_bottom", "mmoe", "cgc", "ple")]
WORLD = 2
BATCH = 128
SMALL: dict[str, Any] = {
    "bottom_mlp": [32, 16],
    "tower_mlp": [8],
    "sequence_pooling": "target_attention",  # the plain bottom's scorer must materialise from meta under DMP too
    "mmoe": {"num_experts": 3, "expert_mlp": [16]},
    "ple": {"num_levels": 2, "task_experts": 1, "shared_experts": 2, "expert_mlp": [16]},
    "dtrn": {"num_layers": 2, "ffn_dim": 16, "hyper_hidden": 8, "attention_mlp": [8], "trm_hidden": 4},
}


def _spec() -> FeatureSpec:
    data = yaml.safe_load((REPO / "configs/features/behaviour_logs.yaml").read_text())
    for t in data["tables"]:
        t["num_buckets"] = min(t["num_buckets"], 500)
    # A multi-valued id feature: its table is mean-pooled by the sharded EmbeddingBagCollection.
    data["tables"].append({"name": "cart_bag", "num_buckets": 300, "dim": 8})
    data["sparse"].append({"name": "cart_bag", "column": "cart_seq", "table": "cart_bag", "max_values": 10})
    return parse_feature_spec(data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_combo(rank: int, spec: FeatureSpec, table: pa.Table, cfg: ModelConfig) -> dict[str, float]:
    stats = dense_stats_from_moments([compute_dense_moments(table, spec)], spec)
    batch = BatchTransform(spec, stats)(table.slice(rank * BATCH, BATCH))
    torch.manual_seed(rank)  # ranks initialise differently: DDP must broadcast rank 0's dense weights
    model = build_model(spec, cfg, torch.device("meta"))
    dmp, _ = shard_model(model, torch.device("cpu"), embedding_sharders("rowwise_adagrad", 0.05))
    weights = gather_state_dict(dmp)
    if rank == 0:
        for name, value in weights.items():
            assert torch.isfinite(value).all(), f"{name} not finite after DMP materialisation"
        if cfg.bottom == "dtrn":
            # The hypernetwork's own init ran (nn.Linear's default would give a non-zero bias).
            assert torch.count_nonzero(weights["bottom.tim.hyper.out.bias"]) == 0
    optimizer = dense_optimizer(dmp, 1e-3)
    loss_fn = MultiTaskLoss(spec)
    dmp.train()
    for _ in range(2):  # a second step: DDP fails there when a parameter got no gradient in the first
        outputs = dmp(batch)
        total, _ = loss_fn(outputs, batch.labels)
        optimizer.zero_grad()
        total.backward()
        for name, p in dmp.named_parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), name
        optimizer.step()
    with torch.no_grad():
        sharded = dmp(batch)
    weights = gather_state_dict(dmp)
    result: dict[str, float] = {}
    if rank == 0:
        reference = build_model(spec, cfg, torch.device("cpu"))
        reference.load_state_dict(weights, strict=True)
        with torch.no_grad():
            unsharded = reference(batch)
        for task, out in sharded.items():
            assert out.shape == (BATCH,) and torch.isfinite(out).all()
            result[task] = float((out - unsharded[task]).abs().max())
    return result


def _worker(rank: int, port: int, data_path: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict[str, Any] = {}
    try:
        spec = _spec()
        table = pq.read_table(data_path)
        for bottom, top in COMBOS:
            cfg = ModelConfig.model_validate({**SMALL, "bottom": bottom, "top": top})
            results[f"{bottom}+{top}"] = _check_combo(rank, spec, table, cfg)
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_combination_trains_under_dmp(tmp_path: Path) -> None:
    gen = GeneratorConfig(seed=2, num_days=2, impressions_per_day=1500, num_users=60, num_items=400, conflict=1.0)
    result = generate_logs(gen, tmp_path / "logs", tmp_path / "oracle.parquet")
    data_path = tmp_path / "rows.parquet"
    pq.write_table(pa.concat_tables([pq.read_table(f) for f in result.files]).slice(1500, WORLD * BATCH), data_path)
    mp.spawn(_worker, args=(_free_port(), str(data_path), str(tmp_path)), nprocs=WORLD, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert "error" not in rank0, rank0.get("error")
    assert set(rank0) == {f"{b}+{t}" for b, t in COMBOS}
    for combo, diffs in rank0.items():
        assert set(diffs) == {"ctr", "cvr", "dwell"}, combo
        assert max(diffs.values()) < 1e-4, f"{combo}: sharded and unsharded outputs differ by {diffs}"
