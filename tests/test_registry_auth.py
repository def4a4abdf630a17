"""The tracking server with MLflow's basic-auth app (as docker/Dockerfile.mlflow runs it): a request without
credentials, or with a wrong password, is refused; the pipeline registers as an ordinary user whose credentials come
from MLflow's environment variables, and nothing of them lands in the run."""

from __future__ import annotations

import base64
import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_registry import MlflowServer, client_for, http_config, stage_run_dir, stages

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test to use it trains the small pipeline

ADMIN = "admin"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowServer, str]]:
    """(server, admin password): ``mlflow server --app-name basic-auth`` on 127.0.0.1 with its own user store."""
    root = tmp_path_factory.mktemp("mlflow_auth_server")
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    password = secrets.token_hex(16)
    server = MlflowServer(
        root,
        extra_args=("--app-name", "basic-auth"),
        extra_env={
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        },
    )
    server.start()
    try:
        yield server, password
    finally:
        server.stop()


def call(url: str, user: str | None = None, password: str | None = None, body: dict | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_requests_without_valid_credentials_are_refused(auth_server: tuple[MlflowServer, str]) -> None:
    server, password = auth_server
    search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert call(search)[0] == 401
    assert call(search, ADMIN, "not-the-password")[0] == 401
    alias = {"name": "any-model", "alias": "champion", "version": "1"}
    assert call(f"{server.uri}/api/2.0/mlflow/registered-models/alias", body=alias)[0] == 401
    assert call(search, ADMIN, password)[0] == 200


def test_pipeline_registers_with_credentials_from_the_environment(
    pipeline_run: Any, auth_server: tuple[MlflowServer, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.promote import promote
    from pipeline.register import register

    server, admin_password = auth_server
    user, password = "mtrec-pipeline", secrets.token_hex(16)
    status, text = call(
        f"{server.uri}/api/2.0/mlflow/users/create", ADMIN, admin_password, {"username": user, "password": password}
    )
    assert status == 200, text

    run_dir = tmp_path / "run"
    stage_run_dir(pipeline_run, run_dir)
    cfg = http_config(pipeline_run, run_dir, server, "reg-auth")  # type: ignore[arg-type]
    assert "@" not in cfg.tracking_uri(), "the credentials are not in the tracking URI"
    with monkeypatch.context() as env:
        env.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        env.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(Exception, match=r"401|[Uu]nauthori[sz]ed|not authenticated"):
            register(cfg, *stages(run_dir))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    registered = register(cfg, *stages(run_dir))

    client = client_for(cfg)
    version = client.get_model_version_by_alias(cfg.mlflow.model_name, "challenger")
    assert version.version == registered.version
    decision = promote(cfg)  # the same user moves champion (first champion: the config's absolute bounds)
    assert decision.champion_after == registered.version, decision
    assert client.get_model_version_by_alias(cfg.mlflow.model_name, "champion").version == registered.version
    run = client.get_run(registered.run_id)
    logged = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert password not in logged and admin_password not in logged
