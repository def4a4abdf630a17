"""Real Ray nodes for the cluster tests: separate ``ray start`` processes on 127.0.0.1, each with its own resources,
free ports and temp dir (short: Ray's socket paths must stay under 108 characters), in its own process group so a
test can stop it, or SIGKILL it as a lost machine. Never ``ray stop``: that would stop every Ray on a shared box."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 240
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_ports() -> dict[str, int]:
    return {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }


def clean_env(path: str | None = None) -> dict[str, str]:
    """This process's environment without any Ray address (PYTHONPATH stays: the nodes run this checkout's code)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    if path is not None:
        env["PATH"] = path
    return env


@dataclass
class RayNode:
    proc: subprocess.Popen[bytes]
    temp_dir: Path
    log: IO[bytes]
    name: str
    extra: dict[str, str] = field(default_factory=dict)

    def started(self) -> bool:
        return b"Ray runtime started" in Path(self.log.name).read_bytes()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the node's whole process group (its raylet, workers, and for a head the GCS and dashboard)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait(timeout=10)
        time.sleep(1)
        self.kill(signal.SIGKILL)
        kill_by_marker(str(self.temp_dir))
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def kill_by_marker(marker: str) -> None:
    """Kill leftovers of a node started here: processes whose command line names its own temp dir."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if marker in " ".join(proc.info["cmdline"] or []):
                proc.kill()


def _start(args: list[str], name: str, log_dir: Path, env: dict[str, str]) -> RayNode:
    temp_dir = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    log = open(log_dir / f"{name}-{temp_dir.name}.log", "wb")  # noqa: SIM115 (open while the node runs)
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=temp_dir,  # not this checkout: a job's driver starts in the node's directory
        start_new_session=True,
    )
    return RayNode(proc, temp_dir, log, name)


def _attempts(start: Callable[[], T], tries: int = 5) -> T:
    """`ray start` gives a node 30 s to register, hard-coded: on a loaded machine it may give up. Try again."""
    for attempt in range(tries):
        try:
            return start()
        except NodeExitedError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


class NodeExitedError(RuntimeError):
    """`ray start` exited before its node was up."""


def start_head(log_dir: Path, num_cpus: int, env: dict[str, str]) -> tuple[RayNode, str, str]:
    """A head with the dashboard (the Jobs API lives there); returns (node, GCS address, Jobs API URL)."""
    return _attempts(lambda: _start_head(log_dir, num_cpus, env))


def _start_head(log_dir: Path, num_cpus: int, env: dict[str, str]) -> tuple[RayNode, str, str]:
    from ray.job_submission import JobSubmissionClient

    from jobs.submit import enable_ray_token_auth

    gcs_port, dashboard = free_port(), free_port()
    ports = {
        "--port": gcs_port,
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        **node_ports(),
    }
    node = _start(
        [
            "--head",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            *(f"{k}={v}" for k, v in ports.items()),
        ],
        "head",
        log_dir,
        env,
    )
    address = f"http://127.0.0.1:{dashboard}"
    enable_ray_token_auth()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if node.proc.poll() is not None:
            node.stop()
            raise NodeExitedError(f"ray start --head exited with {node.proc.returncode}; see {node.log.name}")
        try:
            if node.started():  # `ray start` is done (the dashboard alone answers before the node registers)
                JobSubmissionClient(address).list_jobs()  # the Jobs API answers (with the cluster's token)
                return node, f"127.0.0.1:{gcs_port}", address
        except Exception:
            pass
        if time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"the Ray Jobs API at {address} did not come up in {START_TIMEOUT_S}s")
        time.sleep(1)


def alive_node_count(gcs_address: str, dashboard: str) -> int:
    from ray.util.state import list_nodes

    return sum(1 for n in list_nodes(address=dashboard) if n.state == "ALIVE")


def start_worker(
    log_dir: Path, name: str, gcs_address: str, dashboard: str, num_cpus: int, env: dict[str, str]
) -> RayNode:
    """A worker node joining the head; returns once the cluster counts it alive."""
    return _attempts(lambda: _start_worker(log_dir, name, gcs_address, dashboard, num_cpus, env))


def _start_worker(
    log_dir: Path, name: str, gcs_address: str, dashboard: str, num_cpus: int, env: dict[str, str]
) -> RayNode:
    before = alive_node_count(gcs_address, dashboard)
    ports = node_ports()
    # The head turns token authentication on by default; a joining node sends the token (~/.ray/auth_token) only
    # in token mode.
    env = {"RAY_AUTH_MODE": "token", **env}
    node = _start(
        [
            f"--address={gcs_address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            *(f"{k}={v}" for k, v in ports.items()),
        ],
        name,
        log_dir,
        env,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not node.started() or alive_node_count(gcs_address, dashboard) <= before:
        if node.proc.poll() is not None:
            node.stop()
            raise NodeExitedError(f"ray start --address exited with {node.proc.returncode}; see {node.log.name}")
        if time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"worker node {name} did not join in {START_TIMEOUT_S}s; see {node.log.name}")
        time.sleep(1)
    return node
