"""A registered version installs and scores from its own metadata: a fresh virtualenv gets the version's
``requirements.txt`` with plain pip, then loads it with ``mlflow.pyfunc.load_model`` and serves it with
``mlflow models serve --env-manager local``, with no project checkout on the path (the code travels with the model).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_registry import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a fresh virtualenv installs torch and mlflow

PYTHON = "python3.11"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything pointing at this checkout or its virtualenv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return {**env, **extra}


@pytest.fixture(scope="module")
def serving_venv(pipeline_run: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, str]]:
    """(virtualenv, model URI, environment): a fresh virtualenv with the registered version's requirements."""
    import mlflow

    cfg, result = pipeline_run
    model_uri = result.registered.model_uri
    mlflow.set_tracking_uri(cfg.tracking_uri())
    mlflow.set_registry_uri(cfg.tracking_uri())  # earlier tests may have pointed the registry at their server
    requirements = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text()
    root = tmp_path_factory.mktemp("serving_env")
    (root / "requirements.txt").write_text(requirements)
    for forbidden in ("mtrec", "torchrec", "fbgemm"):
        assert forbidden not in requirements, f"the served model must not require {forbidden}:\n{requirements}"
    for pinned in ("torch==", "numpy==", "pandas==", "pyarrow==", "safetensors==", "mlflow=="):
        assert pinned in requirements, f"{pinned} missing from\n{requirements}"
    venv = root / "venv"
    env = clean_env(MLFLOW_TRACKING_URI=cfg.tracking_uri())
    subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True, cwd=root, env=env, timeout=300)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-r", str(root / "requirements.txt")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv, model_uri, env


def test_fresh_virtualenv_loads_and_scores_the_input_example(serving_venv: tuple[Path, str, dict[str, str]]) -> None:
    venv, model_uri, env = serving_venv
    script = f"""
import importlib.util, json, sys
import mlflow
for name in ("torchrec", "fbgemm_gpu", "ray", "features", "models", "pipeline"):
    assert importlib.util.find_spec(name) is None, f"{{name}} is importable before loading"
model = mlflow.pyfunc.load_model({model_uri!r})
example = model.input_example
out = model.predict(example)
assert "torchrec" not in sys.modules and "fbgemm_gpu" not in sys.modules
print(json.dumps({{"rows": len(example), "columns": list(out.columns), "finite": bool(out.notna().all().all())}}))
"""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script],
        cwd=venv.parent,  # no checkout on the path: the project's packages come from the model's code folder
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] > 0 and report["finite"]
    assert {"ctr", "cvr", "ctr_cvr", "dwell"} <= set(report["columns"])


@contextlib.contextmanager
def serving(venv: Path, model_uri: str, env: dict[str, str], log: Path) -> Iterator[str]:
    port = free_port()
    command = [str(venv / "bin" / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    # As from an activated virtualenv: the scoring server starts `uvicorn` from PATH.
    activated = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(venv)}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=venv.parent,
            env=activated,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer /ping: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_mlflow_models_serve_from_the_virtualenv_answers(
    serving_venv: tuple[Path, str, dict[str, str]], tmp_path: Path
) -> None:
    import mlflow

    venv, model_uri, env = serving_venv
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    body = (local / "serving_input_example.json").read_bytes()  # the input example as MLflow's scoring server takes it
    with serving(venv, model_uri, env, tmp_path / "serve.log") as url:
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{err.code}: {err.read()[:2000]!r}") from None
    rows = answer["predictions"]
    example_rows = len(json.loads(body)["dataframe_split"]["data"])
    assert len(rows) == example_rows
    assert {"ctr", "cvr", "ctr_cvr", "dwell"} <= set(rows[0])
    assert all(0.0 <= row["ctr"] <= 1.0 for row in rows)
