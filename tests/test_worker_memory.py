"""The planner's capacities come from the worker's real memory (host share, container limit, GPU), not TorchRec's
defaults: a table that cannot fit this machine is refused at planning time instead of being materialised."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from models.memory import cgroup_memory_limit, host_memory_bytes, worker_memory
from models.sharding import ShardingPlanError, embedding_sharders, planner_topology, shard_model

GIB = 1024**3
CPU = torch.device("cpu")
DIM = 64


def test_cgroup_limits_are_read_in_both_layouts(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8589934592\n")
    assert cgroup_memory_limit(v2) == 8 * GIB
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(4 * GIB))
    assert cgroup_memory_limit(v1) == 4 * GIB
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(0x7FFFFFFFFFFFF000))  # v1's "unlimited"
    assert cgroup_memory_limit(v1) is None
    assert cgroup_memory_limit(tmp_path / "none") is None
    (v2 / "memory.max").write_text("lots")
    with pytest.raises(ValueError, match=r"memory\.max"):
        cgroup_memory_limit(v2)


def test_host_memory_is_capped_by_the_container(tmp_path: Path) -> None:
    import psutil

    total = int(psutil.virtual_memory().total)
    (tmp_path / "memory.max").write_text(str(total // 4))
    assert host_memory_bytes(tmp_path) == total // 4
    (tmp_path / "memory.max").write_text("max")
    assert host_memory_bytes(tmp_path) == total
    # On CPU each of the machine's local ranks gets its share; a configured cap replaces it.
    assert worker_memory(CPU, 2, root=tmp_path).ddr == total // 2
    assert worker_memory(CPU, 2, root=tmp_path).hbm is None
    assert worker_memory(CPU, 2, cap_bytes=3 * GIB, root=tmp_path).ddr == 3 * GIB


def _big_table_model() -> tuple[EmbeddingBagCollection, int]:
    """One table 1.5x this machine's memory (weights alone), built on meta (nothing is allocated)."""
    host = host_memory_bytes()
    rows = int(1.5 * host) // (DIM * 4)
    if rows * DIM * 4 * 1.1 > 100 * GIB:
        pytest.skip("this machine has more memory than TorchRec's default host capacity: nothing to show")
    table = EmbeddingBagConfig(name="huge", embedding_dim=DIM, num_embeddings=rows, feature_names=["f"])
    return EmbeddingBagCollection(tables=[table], device=torch.device("meta")), rows


def test_planner_refuses_a_table_larger_than_this_machine() -> None:
    model, _ = _big_table_model()
    sharders = embedding_sharders("sgd", 0.1)
    # TorchRec's default capacities (128 GiB of host memory per rank) accept it ...
    EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu")).plan(model, sharders)
    # ... the machine's real memory does not.
    topology = planner_topology(CPU, 1, 1, worker_memory(CPU, 1))
    with pytest.raises(PlannerError):
        EmbeddingShardingPlanner(topology=topology).plan(model, sharders)


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shard_model_names_the_table_and_this_workers_memory(one_rank_group: None) -> None:
    model, rows = _big_table_model()
    with pytest.raises(ShardingPlanError, match=r"(?s)this worker's memory.*table 'huge'"):
        shard_model(model, CPU, embedding_sharders("sgd", 0.1), table_sizes={"huge": (rows, DIM)}, optimizer="sgd")
