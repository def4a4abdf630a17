"""Against a real ``mlflow server``: metrics bound to the weights they describe (train, evaluate, train again,
register: refused), a first champion only with bounds or ``--allow-first``, and two promotion processes racing for
the ``champion`` alias (compare-and-set: the one whose comparison went stale is refused).

Uses the shared test run's trained model (``pipeline_run``) and the functions of ``test_registry``; one server
for the module.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_registry import MlflowServer, client_for, http_config, stage_run_dir, stages, variant

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_register_refuses_metrics_of_earlier_weights(pipeline_run: Any, server: MlflowServer, tmp_path: Path) -> None:
    """Train (the shared test run), evaluate (its eval.json), train again (here, for real), register: refused, naming
    the stage to re-run; nothing reaches the registry."""
    from mlflow.exceptions import MlflowException

    from pipeline.lineage import StageMismatchError
    from pipeline.register import register
    from pipeline.train import train

    run_dir = tmp_path / "retrain"
    stage_run_dir(pipeline_run, run_dir)
    cfg = http_config(
        pipeline_run,
        run_dir,
        server,
        "reg-stale",
        "train.max_steps=3",
        "train.seed=11",
    )
    ingested, first, evaluated = stages(run_dir)
    assert evaluated.model_hash == first.model_hash
    retrained = train(cfg, ingested)
    assert retrained.model_hash != first.model_hash and retrained.steps == 3

    with pytest.raises(StageMismatchError) as info:
        register(cfg, *stages(run_dir))
    message = str(info.value)
    assert "eval.json scored the weights" in message and "`mtrec evaluate`" in message
    assert "nothing was registered" in message
    with pytest.raises(MlflowException):  # not even the registered model was created
        client_for(cfg).get_registered_model("reg-stale")


@pytest.mark.slow
def test_a_first_champion_needs_bounds_or_allow_first(pipeline_run: Any, server: MlflowServer, tmp_path: Path) -> None:
    from pipeline.promote import promote
    from pipeline.register import register

    run_dir = tmp_path / "first"
    stage_run_dir(pipeline_run, run_dir)
    unbounded = http_config(pipeline_run, run_dir, server, "reg-first", "promotion.bounds={}")
    register(unbounded, *stages(run_dir))
    client = client_for(unbounded)

    refused = promote(unbounded)
    assert refused.decision == "rejected" and refused.champion_after is None
    assert "promotion.bounds" in refused.reason and "--allow-first" in refused.reason
    assert client.get_registered_model("reg-first").aliases.get("champion") is None

    ctr_auc = stages(run_dir)[2].metrics["ctr"]["auc"]
    too_high = f"promotion.bounds={{ctr.auc: {{min: {min(ctr_auc + 0.05, 1.0)}}}}}"
    strict = http_config(pipeline_run, run_dir, server, "reg-first", too_high)
    below = promote(strict, allow_first=True)  # configured bounds always apply
    assert below.decision == "rejected" and "ctr.auc" in below.reason
    assert client.get_registered_model("reg-first").aliases.get("champion") is None

    accepted = promote(unbounded, allow_first=True)
    assert accepted.decision == "promoted" and accepted.champion_after == "1"
    assert "--allow-first" in client.get_model_version("reg-first", "1").tags["promotion.reason"]


RACER = """
import json, sys, time
from pathlib import Path

import pipeline.promote as promotion
from pipeline.config import ExperimentConfig

cfg = ExperimentConfig.model_validate(json.loads(Path(sys.argv[1]).read_text()))
version, barrier = sys.argv[2], (Path(sys.argv[3]) if len(sys.argv) > 3 else None)
if barrier is not None:
    judge = promotion.gate

    def judge_then_wait(*args, **kwargs):
        # Hold this promotion between its comparison and its move until the test says go.
        result = judge(*args, **kwargs)
        barrier.with_suffix(".ready").touch()
        while not barrier.with_suffix(".go").exists():
            time.sleep(0.05)
        return result

    promotion.gate = judge_then_wait
try:
    result = promotion.promote(cfg, version=version)
    print(json.dumps({"decision": result.decision, "champion_after": result.champion_after}))
except promotion.PromotionError as err:
    print(json.dumps({"error": type(err).__name__, "message": str(err)}))
"""


def _racer(cfg: Any, version: str, folder: Path, barrier: Path | None = None) -> subprocess.Popen[str]:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    args = [sys.executable, "-c", RACER, str(config), version, *([str(barrier)] if barrier else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _outcome(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_two_promotions_racing_move_the_champion_once(pipeline_run: Any, server: MlflowServer, tmp_path: Path) -> None:
    """v2 and v3 both pass against champion v1. Process B judges v3 and is held before its move; process A promotes
    v2 meanwhile; released, B finds the champion changed since its comparison and refuses. Without the re-read
    B would replace v2 with v3, which was never compared with v2."""
    from pipeline.promote import promote
    from pipeline.register import register

    name = "reg-race"
    base = tmp_path / "v1"
    stage_run_dir(pipeline_run, base)
    cfg1 = http_config(pipeline_run, base, server, name)
    register(cfg1, *stages(base))
    assert promote(cfg1).champion_after == "1"
    configs = {}
    for number, kind in (("2", "nudge"), ("3", "nudge2")):
        folder = tmp_path / f"v{number}"
        cfg = http_config(pipeline_run, folder, server, name)
        assert register(cfg, *variant(pipeline_run, folder, cfg, kind)).version == number
        configs[number] = cfg

    barrier = tmp_path / "hold_b"
    racer_b = _racer(configs["3"], "3", tmp_path / "proc_b", barrier)
    deadline = time.monotonic() + 600
    while not barrier.with_suffix(".ready").exists():
        assert racer_b.poll() is None, racer_b.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "process B never reached its move"
        time.sleep(0.2)
    outcome_a = _outcome(_racer(configs["2"], "2", tmp_path / "proc_a"))
    assert outcome_a == {"decision": "promoted", "champion_after": "2"}
    barrier.with_suffix(".go").touch()
    outcome_b = _outcome(racer_b)
    assert outcome_b.get("error") == "ChampionChangedError", outcome_b
    assert "changed from version 1 to version 2" in outcome_b["message"]

    client = client_for(cfg1)
    aliases = client.get_registered_model(name).aliases
    assert aliases["champion"] == "2" and aliases["previous_champion"] == "1"
    assert client.get_model_version(name, "1").tags["promotion.replaced_by"] == "2"
    assert "promotion.decision" not in client.get_model_version(name, "3").tags, "a refused move records nothing"
    # Run again, B's challenger is judged against the new champion.
    again = promote(configs["3"], version="3")
    assert again.champion_before == "2"


@pytest.mark.slow
def test_an_unreadable_champion_alias_fails_the_promotion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's basic-auth app: a user without permission on the model gets PERMISSION_DENIED reading its aliases.
    That is an error, not "there is no champion": promoting fails instead of making a first champion."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
    import mlflow.server
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.promote import promote
    from pipeline.registry import version_by_alias
    from tests.conftest import small_config

    admin_password = "admin-password-0123456789"
    (tmp_path / "auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{tmp_path / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "auth.ini"))
    srv = MlflowServer(
        tmp_path,
        extra_args=("--app-name", "basic-auth"),
        extra_env={"MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)},  # the auth app's CSRF key
    )
    srv.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
        MlflowClient(tracking_uri=srv.uri, registry_uri=srv.uri).create_registered_model("guarded")
        mlflow.server.get_app_client("basic-auth", tracking_uri=srv.uri).create_user("bob", "bob-password-0123456789")

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bob-password-0123456789")
        bob = MlflowClient(tracking_uri=srv.uri, registry_uri=srv.uri)
        with pytest.raises(MlflowException) as info:
            version_by_alias(bob, "guarded", "champion")
        assert info.value.error_code == "PERMISSION_DENIED"
        cfg = small_config(
            tmp_path / "run",
            f"mlflow.tracking_uri={srv.uri}",
            "mlflow.model_name=guarded",
            "registry.retries=0",
        )
        (tmp_path / "run").mkdir()
        with pytest.raises(MlflowException) as denied:  # before: "no challenger", or a first champion
            promote(cfg, allow_first=True)
        assert denied.value.error_code == "PERMISSION_DENIED"
    finally:
        srv.stop()
