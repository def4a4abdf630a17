"""Tables the planner makes data-parallel are not updated by the fused kernels: they must still get the configured
embedding optimizer and rate (``train.embedding_optimizer``/``embedding_lr``), not the dense layers' Adam. Two gloo
processes, the real planner and DMP."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

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
from models.sharding import dense_optimizer, embedding_sharders, shard_model

REPO = Path(__file__).resolve().parents[1]
TABLE_LR = 0.5
DENSE_LR = 1e-4


def _spec() -> FeatureSpec:
    data = yaml.safe_load((REPO / "configs/features/behaviour_logs.yaml").read_text())
    for t in data["tables"]:
        t["num_buckets"] = min(t["num_buckets"], 200)  # small tables: the planner replicates them
    return parse_feature_spec(data)


def _worker(rank: int, port: int, data_path: str, out_dir: str) -> None:
    from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    result: dict[str, Any] = {}
    try:
        spec = _spec()
        table = pq.read_table(data_path)
        stats = dense_stats_from_moments([compute_dense_moments(table, spec)], spec)
        batch = BatchTransform(spec, stats)(table.slice(rank * 128, 128))
        model = build_model(spec, ModelConfig(), torch.device("meta"))
        dmp, _ = shard_model(model, torch.device("cpu"), embedding_sharders("rowwise_adagrad", 0.05))
        optimizer = dense_optimizer(dmp, DENSE_LR, table_optimizer="sgd", table_lr=TABLE_LR)
        tables = {n: p for n, p in dmp.named_parameters() if isinstance(p, TableBatchedEmbeddingSlice)}
        before = {n: p.detach().clone() for n, p in tables.items()}
        total, _ = MultiTaskLoss(spec)(dmp(batch), batch.labels)
        optimizer.zero_grad()
        total.backward()
        grads = {n: p.grad.detach().clone() for n, p in tables.items() if p.grad is not None}
        optimizer.step()
        result["data_parallel_tables"] = len(tables)
        result["with_grad"] = len(grads)
        result["max_error"] = max(
            (float((tables[n].detach() - (before[n] - TABLE_LR * g)).abs().max()) for n, g in grads.items()),
            default=float("nan"),
        )
    except Exception:
        result["error"] = traceback.format_exc()
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_tables_get_the_embedding_optimizer(tmp_path: Path) -> None:
    gen = GeneratorConfig(seed=2, num_days=2, impressions_per_day=1000, num_users=60, num_items=150)
    generated = generate_logs(gen, tmp_path / "logs", tmp_path / "oracle.parquet")
    data_path = tmp_path / "rows.parquet"
    pq.write_table(pq.read_table(generated.files[0]), data_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_worker, args=(port, str(data_path), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert "error" not in result, result.get("error")
    assert result["data_parallel_tables"] > 0, "precondition: the planner replicated some tables"
    assert result["with_grad"] > 0
    # SGD at the embedding rate: w <- w - lr * g, exactly (Adam at the dense rate would move each weight by ~1e-4).
    assert result["max_error"] < 1e-6, result
