"""scripts/gpu_check.sh runs its CPU part anywhere: the install switch's decisions (pip --dry-run) and the device
hygiene checks on meta, ending with its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_part_of_the_gpu_check_runs_and_reports(tmp_path: Path) -> None:
    env = {**os.environ, "DEV_PY": sys.executable, "OUT": str(tmp_path)}
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-only"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert out.returncode == 0, out.stdout + out.stderr
    assert any("install switch decisions" in r and "| PASS |" in r for r in rows), rows
    assert any("device hygiene on meta" in r and "| PASS |" in r for r in rows), rows
    assert any("GPU part" in r and "| SKIP |" in r for r in rows), rows
    assert "passed" in (tmp_path / "hygiene.log").read_text()
