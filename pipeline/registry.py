"""The model registry as the stages use it: a client for the config's store, aliases and tags, retries with backoff
on connection errors (credentials never printed), downloading a version's model folder, resolving a warm start.

The register stage, the promotion gate and the daily job all build on this module; it imports none of them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from models.gradients import head_config
from models.io import MODEL_FILE, WEIGHTS_FILE
from pipeline.config import ExperimentConfig, redact
from pipeline.pyfunc import MODEL_DIR_ARTIFACT

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
MODEL_HASH_TAG = "model_hash"  # idempotency key, on the run and on the version

T = TypeVar("T")


class RegistryUnavailableError(RuntimeError):
    """The tracking server could not be reached after all retries; the message says what is safe on disk."""


# ---------------------------------------------------------------------------------------------------------------------
# Credentials, retries, client


def _cause_chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        yield node
        node = node.__cause__ or node.__context__


def is_transient(err: BaseException) -> bool:
    """Connection-level failures worth retrying: refused/reset connections, timeouts, 5xx/429 after MLflow's own
    retries, a locked SQLite file. Not: bad requests, missing resources, bugs."""
    import requests

    for e in _cause_chain(err):
        if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
            return True
        if isinstance(e, TimeoutError):
            return True
        if isinstance(e, MlflowException):
            msg = str(e)
            if msg.startswith("API request to") and (" failed with exception" in msg or "timeout" in msg):
                return True
            status = e.get_http_status_code()
            if status in (429, 502, 503, 504):
                return True
            if "failed with error code 5" in msg or "database is locked" in msg:
                return True
        if type(e).__name__ == "OperationalError" and "database is locked" in str(e):
            return True
    return False


@contextmanager
def http_settings(cfg: ExperimentConfig) -> Iterator[None]:
    """MLflow's per-request retries and timeout from ``registry``, unless the user set the variables themselves.
    Without this a dead server costs minutes per request (7 retries, doubling) inside each of our attempts."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(cfg.registry.http_request_retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(cfg.registry.http_timeout_s),
    }
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def call_with_retries(fn: Callable[[], T], cfg: ExperimentConfig, action: str, on_failure: str) -> T:
    """Run ``fn`` (which must be idempotent), retrying transient registry errors with exponential backoff.

    ``on_failure`` is appended to the final error: what the user has on disk and how to finish later.
    """
    attempts = cfg.registry.retries + 1
    uri = redact(cfg.tracking_uri())
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise
            first_line = redact(str(err)).splitlines()[0][:300] if str(err) else type(err).__name__
            if attempt == attempts:
                raise RegistryUnavailableError(
                    f"could not {action}: the MLflow tracking server {uri} is unreachable after {attempts} attempt(s) "
                    f"over {time.monotonic() - started:.0f}s (last error: {first_line}). {on_failure}"
                ) from None
            delay = min(cfg.registry.backoff_s * 2 ** (attempt - 1), cfg.registry.max_backoff_s)
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1fs", action, attempt, attempts, first_line, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def registry_client(cfg: ExperimentConfig) -> MlflowClient:
    """A client for the config's tracking store and registry (also set as the fluent API's URIs)."""
    uri = cfg.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``, or None when the alias (or the registered model) does not exist. Any other
    error (no permission, a bad request, a server fault) raises: it must never read as "there is no such alias"."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if alias_not_found(err, alias) or not _registered_model_exists(client, name, err):
            return None
        raise


def _registered_model_exists(client: MlflowClient, name: str, alias_error: MlflowException) -> bool:
    """MLflow's basic-auth app answers an alias lookup on a registered model that does not exist yet with 403 (it
    cannot resolve a permission for it), before the store could say 404: ask for the model itself, which it does
    answer with 404. Any error of that second call raises the alias lookup's own error."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise alias_error from err
    return True


def alias_not_found(err: MlflowException, alias: str) -> bool:
    """MLflow's answers for a missing registered model (RESOURCE_DOES_NOT_EXIST) and for a missing alias of an
    existing one (INVALID_PARAMETER_VALUE, "Registered model alias <alias> not found")."""
    if err.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return err.error_code == "INVALID_PARAMETER_VALUE" and f"alias {alias} not found" in str(err)


def versions_with_tag(client: MlflowClient, name: str, key: str, value: str) -> list[ModelVersion]:
    """Versions of ``name`` tagged ``key=value``, oldest first."""
    found = client.search_model_versions(filter_string=f"name='{_q(name)}' and tag.`{key}`='{_q(value)}'")
    return sorted(found, key=lambda v: int(v.version))


def _q(value: str) -> str:
    return value.replace("'", "\\'")


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def download_model_dir(client: MlflowClient, cfg: ExperimentConfig, version: ModelVersion) -> Path:
    """The unsharded model folder of a registered version (weights + description), cached under the run directory.

    Read through MLflow's artifact API, as files: weights are safetensors, the description JSON, so nothing from the
    store is unpickled or executed."""
    dest = cfg.run_dir.resolve() / "registry_cache" / _safe_name(version.name) / f"v{version.version}"
    marker = dest / ".complete"
    if marker.exists():
        return dest / "model_dir"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    base = f"models:/{version.name}/{version.version}"
    mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=str(dest / "meta")))
    spec = yaml.safe_load(mlmodel.read_text())
    rel = spec["flavors"]["python_function"]["artifacts"][MODEL_DIR_ARTIFACT]["path"]
    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{rel}", dst_path=str(dest / "dl")))
    shutil.move(str(got), str(dest / "model_dir"))
    shutil.rmtree(dest / "dl", ignore_errors=True)
    marker.write_text(str(version.version))
    return dest / "model_dir"


# ---------------------------------------------------------------------------------------------------------------------
# Warm start


@dataclass(frozen=True)
class WarmStart:
    """Where training starts from: ``model_dir`` holds ``weights.safetensors`` + ``model.json``."""

    source: str  # as given: models:/<name>@<alias>, models:/<name>/<version>, or a folder
    model_dir: Path
    version: str | None  # the registry version, when resolved from the registry


def warm_start_incompatibility(model_dir: Path, cfg: ExperimentConfig) -> str | None:
    """Why the model in ``model_dir`` cannot initialise this config's model, or None when it can: the same feature
    spec (ids hash alike) and, tensor for tensor, the same names and shapes as the model this code builds from the
    config (so a change of architecture, or of the code, is caught here rather than inside the training workers)."""
    import torch
    from safetensors import safe_open

    from features.spec import FeatureSpec
    from models.multitask import build_model

    if not (model_dir / WEIGHTS_FILE).exists() or not (model_dir / MODEL_FILE).exists():
        return f"{model_dir} lacks {WEIGHTS_FILE} or {MODEL_FILE}"
    description = json.loads((model_dir / MODEL_FILE).read_text())
    spec = cfg.feature_spec()
    if FeatureSpec.model_validate(description["spec"]).fingerprint() != spec.fingerprint():
        return "the feature spec differs"
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as fh:  # reads the header only
        theirs = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    model = build_model(spec, cfg.model, torch.device("meta"), head_config(cfg.gradients))  # shapes only
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(ours) - set(theirs))
    reshaped = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    if missing or reshaped:
        parts = []
        if missing:
            parts.append(f"no weights for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} tensor(s) of another shape, e.g. {k} {theirs[k]} vs {ours[k]}")
        return "the model differs: " + "; ".join(parts)
    return None


def resolve_warm_start(cfg: ExperimentConfig, source: str, strict: bool = True) -> WarmStart | None:
    """Resolve ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a folder to a local model folder.

    Registry sources are downloaded (cached) under ``<run_dir>/registry_cache``. Returns None when an alias does not
    exist yet (nothing to start from), or, with ``strict=False``, when the model is incompatible (logged); with
    ``strict=True`` an incompatible model raises ValueError naming the difference."""
    if source.startswith("models:/"):
        ref = source.removeprefix("models:/")

        def fetch() -> tuple[Path, str] | None:
            client = registry_client(cfg)
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = version_by_alias(client, name, alias)
                if version is None:
                    return None
            else:
                name, number = ref.rsplit("/", 1)
                version = client.get_model_version(name, number)
            return download_model_dir(client, cfg, version), str(version.version)

        with http_settings(cfg):
            got = call_with_retries(fetch, cfg, "resolve the warm start", "Training did not start.")
        if got is None:
            return None
        model_dir, number = got
    else:
        model_dir, number = Path(source).resolve(), None
    reason = warm_start_incompatibility(model_dir, cfg)
    if reason is not None:
        message = f"cannot warm-start from {source}: {reason}"
        if strict:
            raise ValueError(message)
        log.warning("%s; training from scratch", message)
        return None
    return WarmStart(source=source, model_dir=model_dir, version=number)
