"""Submit a command of this CLI to a Ray cluster as a Ray job (Jobs API at the head's dashboard address), then follow
its status and stream its logs until it ends.

    mtrec submit -c configs/experiments/demo.yaml --address http://head:8265 --command run -- --generate

runs ``python -m jobs.cli run --config configs/experiments/demo.yaml --generate`` on the cluster (``--remote-config``
when the config lives elsewhere there, e.g. in the image). The same ``--set`` overrides travel with the command. The
command is ``submit.entrypoint`` (the module through the head's ``python``, so no console script needs to be on the
head's PATH; an absolute interpreter path where ``python`` is another one). That Python must import this package (the
images under docker/ install it): when it cannot, the follower says what to install. The runtime environment
(``submit.runtime_env``) adds environment variables, or a ``working_dir`` for code that is not in the image.

With ``--submission-id`` a submission is idempotent: if a job of that id exists, it is followed instead of started
again (a scheduler retrying ``mtrec submit ... --submission-id daily-2026-01-03`` never runs the day twice at once).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.registry import redact

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """No address, or the cluster refused the job."""


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    status: str  # PENDING / RUNNING when not followed to the end
    address: str
    entrypoint: str  # credentials removed
    followed: bool
    hint: str | None = None  # what to change, when the job failed for a reason the follower recognises


# A Python that lacks this package or one of its requirements, or no such interpreter at all.
_MISSING_MODULE = re.compile(r"No module named '?[\w.]+'?")
_NOT_FOUND = re.compile(r"([\w./+-]+): (?:command )?not found")


def resolve_address(cfg: ExperimentConfig, address: str | None) -> str:
    """--address, then ``submit.address``, then RAY_API_SERVER_ADDRESS, then RAY_ADDRESS when it is an http URL
    (``ray job submit``'s own order, minus the GCS address, which the Jobs API does not speak)."""
    for candidate in (address, cfg.submit.address, os.environ.get("RAY_API_SERVER_ADDRESS")):
        if candidate:
            return candidate
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith(("http://", "https://")):
        return env
    raise SubmitError(
        "no Ray cluster address: pass --address http://<head>:8265, set submit.address, or RAY_API_SERVER_ADDRESS"
    )


def build_entrypoint(
    cfg: ExperimentConfig, command: str, config_path: str, overrides: list[str], extra_args: list[str]
) -> str:
    """The shell command the cluster runs: this CLI with the same config and overrides."""
    parts = [*shlex.split(cfg.submit.entrypoint), command, "--config", config_path]
    for o in overrides:
        parts += ["--set", o]
    parts += extra_args
    return shlex.join(parts)


def missing_package_hint(logs: str, entrypoint: str) -> str | None:
    """When the job's logs show that the cluster's Python could not run this CLI, say what to install or set."""
    interpreter = shlex.split(entrypoint)[0] if entrypoint.strip() else "python"
    missing = _MISSING_MODULE.search(logs)
    if missing:
        what = f"`{interpreter}` on the cluster cannot import this package and its requirements ({missing.group(0)})"
    elif any(m.group(1) == interpreter for m in _NOT_FOUND.finditer(logs)):
        what = f"the head node has no `{interpreter}` (not found)"
    else:
        return None
    return (
        f"{what}. The job's driver runs `{interpreter} -m jobs.cli` on the head node: install this package "
        "(mtrec-pipeline, with its requirements) into the Python that runs Ray on every node (the images under "
        "docker/ do), or ship the code with submit.runtime_env (working_dir: the project folder, pip: its "
        "requirements), or set submit.entrypoint to the Python that has it, e.g. "
        "`--set 'submit.entrypoint=/opt/venv/bin/python -m jobs.cli'`"
    )


def enable_ray_token_auth() -> None:
    """Send the cluster token the way ``ray start`` picks it up: when ``RAY_AUTH_MODE`` is unset and a token is
    available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), use token auth. Ray >= 2.5x
    heads enable token auth by default, and its Jobs client only sends the token in token mode."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth: nothing to send
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _status(client: Any, job_id: str) -> str:
    return str(client.get_job_status(job_id).value)


async def _tail(client: Any, job_id: str, sink: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sink(chunk)


def _stdout_sink(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def submit(
    cfg: ExperimentConfig,
    entrypoint: str,
    address: str | None = None,
    submission_id: str | None = None,
    env: dict[str, str] | None = None,
    follow: bool = True,
    sink: Callable[[str], None] = _stdout_sink,
    status_sink: Callable[[str], None] | None = None,
) -> SubmitResult:
    """Submit ``entrypoint`` (see :func:`build_entrypoint`) and, with ``follow``, stream its logs to ``sink`` until
    it ends (or ``submit.timeout_s`` passes: the job then keeps running)."""
    from ray.job_submission import JobSubmissionClient

    note = status_sink or (lambda line: print(line, flush=True))
    url = resolve_address(cfg, address)
    shown = redact(entrypoint)
    enable_ray_token_auth()
    try:
        client = JobSubmissionClient(url)
    except Exception as err:
        raise SubmitError(f"cannot reach the Ray Jobs API at {redact(url)}: {redact(str(err))}") from None

    runtime_env = dict(cfg.submit.runtime_env)
    if env:
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    job_id = None
    if submission_id is not None:
        try:
            info = client.get_job_info(submission_id)
            job_id = submission_id
            note(f"[submit] job {job_id} exists already ({info.status}): following it instead of submitting again")
        except Exception:  # the client raises a plain RuntimeError for an unknown id
            job_id = None
    if job_id is None:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                entrypoint_num_cpus=cfg.submit.entrypoint_num_cpus,
                metadata={"mtrec_config_hash": cfg.fingerprint(), "mtrec_experiment": cfg.name},
            )
        except Exception as err:
            raise SubmitError(f"the cluster at {redact(url)} refused the job: {redact(str(err))}") from None
        # Env var names only: their values may be secrets.
        names = sorted(runtime_env.get("env_vars", {}))
        note(f"[submit] job {job_id} submitted to {redact(url)}: {shown} (env: {', '.join(names) or '-'})")
    if not follow:
        return SubmitResult(job_id, _status(client, job_id), url, shown, followed=False)

    timeout = cfg.submit.timeout_s
    started = time.monotonic()
    tail: list[str] = []  # the end of the logs, to recognise a cluster that cannot run this CLI

    def keep(chunk: str) -> None:
        tail.append(chunk)
        del tail[:-50]
        sink(chunk)

    try:
        asyncio.run(asyncio.wait_for(_tail(client, job_id, keep), timeout=timeout))
    except TimeoutError:
        status = _status(client, job_id)
        note(
            f"[submit] stopped following after {timeout:.0f}s; job {job_id} is {status} and keeps running: "
            f"`ray job logs -f {job_id} --address {redact(url)}`"
        )
        return SubmitResult(job_id, status, url, shown, followed=False)
    # The log stream closes when the job ends; the status may take a moment to catch up.
    status = _status(client, job_id)
    while status not in TERMINAL and time.monotonic() - started < (timeout or float("inf")):
        time.sleep(1.0)
        status = _status(client, job_id)
    info = client.get_job_info(job_id)
    message = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    note(f"[submit] job {job_id} {status}{message}")
    hint = missing_package_hint("".join(tail), entrypoint) if status == "FAILED" else None
    if hint:
        note(f"[submit] {hint}")
    return SubmitResult(job_id, status, url, shown, followed=True, hint=hint)
