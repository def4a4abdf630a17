"""scripts/install.sh switching a venv between the CPU and the GPU stack, checked without installing anything:
``DRY_RUN=1`` prints the switch's decisions and what ``pip install --dry-run`` would bring (metadata only, so no
CUDA wheel is ever downloaded here). The dev venv running the tests (CPU) is only read."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install.sh"
VENV = Path(sys.prefix)  # the venv running these tests (the dev venv), only read


def _switch() -> ModuleType:
    spec = importlib.util.spec_from_file_location("venv_switch", REPO / "scripts" / "venv_switch.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/fbgemm-gpu/", timeout=10).close()
        return True
    except OSError:
        return False


needs_pypi = pytest.mark.skipif(not _pypi_reachable(), reason="pypi.org is not reachable: pip cannot resolve")


def dry_run(
    target: str, venv: Path, env: dict[str, str] | None = None, base: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """install.sh DRY_RUN=1 in the environment ``base`` (default: this one) plus ``env``."""
    run_env = {**(os.environ if base is None else base), "PIP_DEFAULT_TIMEOUT": "20", "PIP_RETRIES": "0", **(env or {})}
    run_env.update({"DRY_RUN": "1", "TARGET": target, "VENV": str(venv)})
    return subprocess.run(["bash", str(INSTALL)], env=run_env, capture_output=True, text=True, timeout=600)


def pypi_only_env() -> dict[str, str]:
    """pip as on a CUDA machine: PyPI only, without this machine's local CPU-torch wheels and indexes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


# ---- the decisions, as functions ------------------------------------------------------------------------------------
def test_torch_build_is_read_from_version_and_requirements() -> None:
    vs = _switch()
    assert vs.torch_build("2.13.0+cpu", []) == "cpu"
    assert vs.torch_build("2.13.0+cu126", []) == "gpu"
    assert vs.torch_build("2.13.0", ["nvidia-cublas==13.0.1; platform_system == 'Linux'", "filelock"]) == "gpu"
    assert vs.torch_build("2.13.0", ["filelock", "sympy>=1.13"]) == "cpu"  # e.g. macOS wheels


def test_uninstall_decisions_in_both_directions() -> None:
    vs = _switch()
    cpu = {"torch": "2.13.0+cpu", "torch_build": "cpu", "fbgemm": {"fbgemm-gpu-cpu": "1.8.0"}}
    gpu = {"torch": "2.13.0", "torch_build": "gpu", "fbgemm": {"fbgemm-gpu": "1.8.0"}}
    mixed = {"torch": "2.13.0+cpu", "torch_build": "cpu", "fbgemm": {"fbgemm-gpu": "1.8.0", "fbgemm-gpu-cpu": "1.8.0"}}
    empty = {"torch": None, "torch_build": None, "fbgemm": {}}
    assert vs.to_uninstall("gpu", cpu) == ["torch", "fbgemm-gpu-cpu"]
    assert vs.to_uninstall("cpu", gpu) == ["torch", "fbgemm-gpu"]
    assert vs.to_uninstall("cpu", cpu) == [] and vs.to_uninstall("gpu", gpu) == []
    # The broken venv the old script left (one fbgemm laid over the other): both go, the wanted one comes back.
    assert vs.to_uninstall("cpu", mixed) == ["fbgemm-gpu", "fbgemm-gpu-cpu"]
    assert vs.to_uninstall("gpu", empty) == []


def test_report_check_refuses_the_wrong_torch_build() -> None:
    vs = _switch()
    cpu_torch = {"metadata": {"name": "torch", "version": "2.13.0+cpu"}, "download_info": {"url": "file:///w.whl"}}
    with pytest.raises(SystemExit, match="TORCH_INDEX_URL"):
        vs.check_report("gpu", {"install": [cpu_torch]})
    assert vs.check_report("cpu", {"install": [cpu_torch]}) == ["would install torch 2.13.0+cpu (cpu build)"]
    with pytest.raises(SystemExit, match="expected fbgemm-gpu-cpu"):
        vs.check_report("cpu", {"install": [{"metadata": {"name": "fbgemm_gpu", "version": "1.8.0"}}]})
    assert vs.check_report("gpu", {"install": []}) == ["nothing to install"]


# ---- install.sh DRY_RUN=1 against real venvs and pip's real resolver -----------------------------------------------
@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not running in a venv")
def test_cpu_venv_stays_as_it_is_for_cpu() -> None:
    out = dry_run("cpu", VENV, {"TORCH_INDEX_URL": ""})
    assert out.returncode == 0, out.stderr
    assert "would uninstall: nothing" in out.stdout
    assert out.stdout.count("nothing to install") == 2


@pytest.mark.slow
@needs_pypi
@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not running in a venv")
def test_cpu_venv_switches_to_gpu() -> None:
    """The defect: ``torch==2.13.0`` is satisfied by the installed ``2.13.0+cpu``, and fbgemm-gpu would be laid over
    fbgemm-gpu-cpu. The switch removes both and pip then brings torch's CUDA build and the CUDA fbgemm."""
    out = dry_run("gpu", VENV, base=pypi_only_env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "would uninstall: torch fbgemm-gpu-cpu" in out.stdout
    assert "would install torch 2.13.0 (gpu build)" in out.stdout
    assert "would install fbgemm-gpu 1.8.0" in out.stdout


def _fake_gpu_venv(path: Path) -> Path:
    """A venv whose metadata says: torch's CUDA build and the CUDA fbgemm (no files: pip only reads metadata here)."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    site = next(path.glob("lib/python3*/site-packages"))
    for name, dist, version, requires in [
        ("torch", "torch", "2.13.0", ["nvidia-cublas==13.0.1", "filelock"]),
        ("fbgemm-gpu", "fbgemm_gpu", "1.8.0", []),
    ]:
        info = site / f"{dist}-{version}.dist-info"
        info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(lines) + "\n")
        (info / "RECORD").write_text("")
        (info / "INSTALLER").write_text("pip\n")
    return path


@pytest.mark.slow
@needs_pypi
def test_gpu_venv_switches_back_to_cpu(tmp_path: Path) -> None:
    venv = _fake_gpu_venv(tmp_path / "gpu-venv")
    out = dry_run("cpu", venv, {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"})
    assert '"torch_build": "gpu"' in out.stdout
    assert "would uninstall: torch fbgemm-gpu" in out.stdout
    # pip brings the CPU torch (from the CPU index or a local wheel), or the script refuses the CUDA one by name.
    assert "would install torch 2.13.0+cpu (cpu build)" in out.stdout or "TORCH_INDEX_URL" in out.stderr
    if out.returncode == 0:
        assert "would install fbgemm-gpu-cpu 1.8.0" in out.stdout


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not running in a venv")
def test_gpu_install_refuses_a_cpu_torch(tmp_path: Path) -> None:
    """Where pip can only see the CPU build (a CPU index or local CPU wheels), a GPU install stops with the reason
    instead of leaving a CPU torch under the CUDA fbgemm."""
    wheels = [p for p in (os.environ.get("PIP_FIND_LINKS") or "").split() if Path(p).is_dir()]
    if not any(Path(w).glob("torch-2.13.0+cpu-*.whl") for w in wheels):
        pytest.skip("no local CPU torch wheel to offer pip here")
    out = dry_run("gpu", VENV, {"PIP_INDEX_URL": Path(wheels[0]).as_uri(), "PIP_EXTRA_INDEX_URL": ""})
    assert out.returncode != 0
    assert "pip would install torch 2.13.0+cpu (cpu build) for TARGET=gpu" in out.stderr
