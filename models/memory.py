"""What one worker may hold: the planner's memory capacities from the machine it runs on.

TorchRec's ``Topology`` assumes 32 GiB of GPU memory and 128 GiB of host memory per rank unless told otherwise; on an
H200 that wastes most of the device, and in a pod with a smaller memory limit it lets the planner pick a plan (or a
UVM-caching kernel) against host memory that is not there. These functions read the real figures instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_memory_limit(root: Path = CGROUP_ROOT) -> int | None:
    """The container's memory limit in bytes (cgroup v2 ``memory.max``, else v1 ``memory.limit_in_bytes``); None
    when there is no limit or no cgroup file."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{path}: expected a byte count or 'max', got {text!r}") from None
        # cgroup v1 reports "no limit" as a huge page-aligned number.
        return value if value < 1 << 60 else None
    return None


def host_memory_bytes(root: Path = CGROUP_ROOT) -> int:
    """Host memory this process may use: the machine's total, capped by the container's limit."""
    total = int(psutil.virtual_memory().total)
    limit = cgroup_memory_limit(root)
    return min(total, limit) if limit is not None else total


@dataclass(frozen=True)
class WorkerMemory:
    """Capacities in bytes for one rank: ``hbm`` (the GPU's memory, None on CPU) and ``ddr`` (its share of the host)."""

    hbm: int | None
    ddr: int


def worker_memory(
    device: torch.device, local_world_size: int, cap_bytes: int | None = None, root: Path = CGROUP_ROOT
) -> WorkerMemory:
    """The real capacities of one rank on ``device``: the device's total memory (``torch.cuda.mem_get_info``) and the
    host memory divided among the ranks of this machine. ``cap_bytes`` (``train.sharding.memory_per_worker_gb``)
    replaces the figure the tables live in: the GPU's on CUDA, the host share on CPU."""
    ddr = host_memory_bytes(root) // max(local_world_size, 1)
    if device.type == "cuda":
        hbm = int(torch.cuda.mem_get_info(device)[1])
        return WorkerMemory(hbm=cap_bytes or hbm, ddr=ddr)
    return WorkerMemory(hbm=None, ddr=cap_bytes or ddr)
