"""Deployment files (docker/, infra/) against the project's own pins and CLI. Fast, no Docker or Kubernetes.

The pins are read from the repository at test time -- requirements/base.txt (ray, mlflow), scripts/install.sh
(torch, torchrec, fbgemm), pyproject.toml (Python) -- and every version mentioned in docker/ and infra/ must equal
them, so bumping a pin makes this file list everything else to bump. The checks take a repository root, and the
mutation tests run them on a temporary copy with one pin changed, to show that a drift is actually caught.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SRC = "/opt/mtrec/"  # where the training images keep the repository (docker/Dockerfile.cpu, WORKDIR)

# The `mtrec` subcommands the deployment files may call: the CLI contract. `daily` (used by infra/cron) and `promote`
# are planned: test_job_commands_are_registered_in_the_cli xfails while the CLI lacks one of them that a manifest
# calls, and enforces it as soon as jobs/cli.py registers it. Any other missing command fails.
CLI_CONTRACT = {"generate", "ingest", "train", "evaluate", "register", "promote", "run", "daily"}
PLANNED_COMMANDS = {"daily", "promote"}

EXPECTED_KINDS = {
    "infra/kuberay/shared.yaml": ["ConfigMap", "PersistentVolumeClaim"],
    "infra/kuberay/secret.example.yaml": ["Secret"],
    "infra/kuberay/raycluster.yaml": ["RayCluster"],
    "infra/kuberay/rayjob.yaml": ["RayJob"],
    "infra/kuberay/rayjob-gpu.yaml": ["RayJob"],
    "infra/mlflow/configmap.yaml": ["ConfigMap"],
    "infra/mlflow/secret.example.yaml": ["Secret"],
    "infra/mlflow/postgres.yaml": ["Service", "StatefulSet"],
    "infra/mlflow/minio.yaml": ["Service", "StatefulSet", "Job"],
    "infra/mlflow/deployment.yaml": ["Deployment", "PersistentVolumeClaim", "Service"],
    "infra/networkpolicy.yaml": ["NetworkPolicy"] * 10,
    "infra/cron/cronjob.yaml": ["CronJob"],
}


# ---------------------------------------------------------------------------------------------------------------
# The repository's pins
# ---------------------------------------------------------------------------------------------------------------


def requirement_pins(text: str) -> dict[str, str]:
    """`name[extras]==version` lines of a requirements file -> {name: version} (extras dropped, names lowercased)."""
    pins = {}
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def install_script_pins(text: str) -> dict[str, str]:
    """The quoted `"pkg==version"` arguments in scripts/install.sh (torch, torchrec, fbgemm-gpu[-cpu])."""
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([^"\s]+)"', text)}


def python_minor(pyproject_text: str) -> str:
    m = re.search(r'requires-python\s*=\s*"[^"]*>=\s*(\d+\.\d+)', pyproject_text)
    assert m, "pyproject.toml has no requires-python lower bound"
    return m.group(1)


def repo_pins(root: Path) -> dict[str, str]:
    req = requirement_pins((root / "requirements/base.txt").read_text())
    inst = install_script_pins((root / "scripts/install.sh").read_text())
    pins = {"ray": req["ray"], "mlflow": req["mlflow"], "python": python_minor((root / "pyproject.toml").read_text())}
    pins.update({k: v for k, v in inst.items() if k in {"torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu"}})
    return pins


# ---------------------------------------------------------------------------------------------------------------
# Dockerfiles: a small line parser (FROM, ARG, ENV, RUN, ...) and ${ARG} substitution
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    cmd: str
    value: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined; comment lines (also inside continuations) dropped."""
    out: list[Instruction] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        full = (buf + line).strip()
        buf = ""
        if full:
            cmd, _, value = full.partition(" ")
            out.append(Instruction(cmd.upper(), value.strip()))
    return out


def dockerfile_args(instrs: list[Instruction]) -> dict[str, str]:
    """ARG defaults (first declaration with a default wins: re-declarations after FROM inherit it)."""
    args: dict[str, str] = {}
    for ins in instrs:
        if ins.cmd == "ARG" and "=" in ins.value:
            name, default = ins.value.split("=", 1)
            args.setdefault(name.strip(), default.strip().strip('"'))
    return args


def substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value)


def dockerfile_text_resolved(path: Path) -> str:
    """The Dockerfile's instructions with ARG defaults filled in, one instruction per line."""
    instrs = parse_dockerfile(path.read_text())
    args = dockerfile_args(instrs)
    return "\n".join(f"{i.cmd} {substitute(i.value, args)}" for i in instrs)


def from_images(path: Path) -> list[str]:
    instrs = parse_dockerfile(path.read_text())
    args = dockerfile_args(instrs)
    return [substitute(i.value.split()[0], args) for i in instrs if i.cmd == "FROM"]


# ---------------------------------------------------------------------------------------------------------------
# Version mentions in docker/ and infra/, and their comparison with the pins
# ---------------------------------------------------------------------------------------------------------------

PACKAGES = ("ray", "mlflow", "torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "boto3", "psycopg2-binary")


@dataclass(frozen=True)
class Mention:
    where: str
    package: str
    version: str


def walk(node: Any, path: tuple = ()):
    """(path, key, value) for every mapping entry of a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, i))


def text_mentions(text: str, where: str) -> list[Mention]:
    found = []
    names = "|".join(re.escape(p) for p in sorted(PACKAGES, key=len, reverse=True))
    for m in re.finditer(rf"(?<![\w.-])({names})(?:\[[^\]]*\])?==([0-9][\w.+-]*)", text):
        found.append(Mention(where, m.group(1), m.group(2)))
    # Runtime checks such as `assert ray.__version__ == '2.60.0'` (infra/ray/cluster.yaml)
    for m in re.finditer(r"\b(ray|mlflow|torch|torchrec)\.__version__(?:\.split\('\+'\)\[0\])?\s*==\s*'([^']+)'", text):
        found.append(Mention(where, m.group(1), m.group(2)))
    for m in re.finditer(r"rayproject/ray:(\d+\.\d+\.\d+)", text):
        found.append(Mention(where, "ray", m.group(1)))
    for m in re.finditer(r"mtrec-mlflow:(\d[\w.]*)", text):
        found.append(Mention(where, "mlflow", m.group(1)))
    for m in re.finditer(r"python:(\d+\.\d+)[\w.-]*", text):
        found.append(Mention(where, "python", m.group(1)))
    return found


def deployment_files(root: Path) -> list[Path]:
    files = [p for p in sorted((root / "infra").rglob("*")) if p.is_file()]
    files += [p for p in sorted((root / "docker").iterdir()) if p.is_file()]
    return files


def yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def collect_mentions(root: Path) -> list[Mention]:
    mentions: list[Mention] = []
    for path in deployment_files(root):
        rel = str(path.relative_to(root))
        if path.name.startswith("Dockerfile.") and not path.name.endswith(".dockerignore"):
            instrs = parse_dockerfile(path.read_text())
            # resolved instructions (ARG defaults filled in) and the raw text, so comments cannot go stale either
            found = text_mentions(dockerfile_text_resolved(path), rel) + text_mentions(path.read_text(), rel)
            mentions += list(dict.fromkeys(found))  # without duplicates, in order
            if "PYTHON_VERSION" in dockerfile_args(instrs):
                mentions.append(Mention(rel, "python", dockerfile_args(instrs)["PYTHON_VERSION"]))
        elif path.suffix in {".yaml", ".yml"}:
            mentions += text_mentions(path.read_text(), rel)
            for doc in yaml_docs(path):
                mentions += [Mention(rel, "ray", str(v)) for _, k, v in walk(doc) if k == "rayVersion"]
        elif path.suffix in {".md", ".sh", ".cron"} or path.name.endswith(".example"):
            mentions += text_mentions(path.read_text(), rel)
    return mentions


def pin_problems(mentions: list[Mention], pins: dict[str, str]) -> list[str]:
    """One message per mention whose version differs from the repository's pin; packages without a repository
    pin (boto3, psycopg2-binary) must at least agree with each other."""
    problems = []
    for m in mentions:
        want = pins.get(m.package)
        if want is not None and m.version != want:
            problems.append(f"{m.where}: {m.package} {m.version}, but the repository pins {want}")
    for package in {m.package for m in mentions} - set(pins):
        versions = {m.version for m in mentions if m.package == package}
        if len(versions) > 1:
            problems.append(f"{package} is pinned to different versions: {sorted(versions)}")
    return problems


def version_problems(root: Path) -> list[str]:
    return pin_problems(collect_mentions(root), repo_pins(root))


# ---------------------------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------------------------

SECRETISH = re.compile(r"pass(word)?|secret|token|api[_-]?key|access[_-]?key|credential", re.IGNORECASE)
# $(VAR) (Kubernetes), ${VAR} (shell/compose), REPLACE_ME and <placeholder> (documentation) are not secrets.
REFERENCE = re.compile(r"^\$\(\w+\)$|^\$\{\w+(:[?-][^}]*)?\}$|^REPLACE_ME|^<[\w-]+>$")


def is_placeholder_or_reference(value: str) -> bool:
    return bool(REFERENCE.match(value.strip())) or value.strip() == ""


def uri_password_problems(text: str, where: str) -> list[str]:
    """scheme://user:PASSWORD@host where PASSWORD is a literal rather than a $(VAR)/${VAR} reference."""
    problems = []
    for m in re.finditer(r"[a-z][a-z0-9+.-]*://([^:/@\s\"']+):([^@/\s\"']+)@", text):
        if not is_placeholder_or_reference(m.group(2)):
            problems.append(f"{where}: literal credentials in URI {m.group(0)}")
    return problems


def secret_problems_in_doc(doc: Any, where: str, example: bool) -> list[str]:
    problems = []
    is_secret_object = isinstance(doc, dict) and doc.get("kind") == "Secret"
    if is_secret_object and not example:
        problems.append(f"{where}: a Secret object outside a *.example.yaml file")
    for path, key, value in walk(doc):
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            continue
        value = str(value)
        # env entries: {name: SOME_PASSWORD, value: literal} -- must be valueFrom/secretKeyRef or a reference
        if key == "value" and path and isinstance(name := _env_name(doc, path), str) and SECRETISH.search(name):
            if not is_placeholder_or_reference(value):
                problems.append(f"{where}: env {name} has a literal value; use valueFrom.secretKeyRef")
        # mapping keys such as `password: hunter2`, MINIO_ROOT_PASSWORD: ..., stringData of a Secret
        elif (
            isinstance(key, str)
            and SECRETISH.search(key)
            and key not in {"secretKeyRef", "secretName"}
            and not is_placeholder_or_reference(value)
        ):
            problems.append(f"{where}: {'.'.join(map(str, (*path, key)))} is a literal secret")
    return problems


def _env_name(doc: Any, path: tuple) -> str | None:
    node = doc
    for p in path:
        node = node[p]
    return node.get("name") if isinstance(node, dict) else None


def secret_problems(root: Path) -> list[str]:
    problems = []
    for path in deployment_files(root):
        rel = str(path.relative_to(root))
        text = path.read_text()
        problems += uri_password_problems(text, rel)
        if re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            problems.append(f"{rel}: looks like an AWS access key id or a private key")
        if path.suffix in {".yaml", ".yml"}:
            for doc in yaml_docs(path):
                problems += secret_problems_in_doc(doc, rel, example=".example." in path.name)
        elif path.name.endswith(".example") or path.suffix == ".cron":
            for line in text.splitlines():
                m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
                if m and SECRETISH.search(m.group(1)) and not is_placeholder_or_reference(m.group(2)):
                    problems.append(f"{rel}: {m.group(1)} has a literal value")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# mtrec command lines in the Kubernetes manifests and the crontab
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MtrecCall:
    where: str
    command: str
    config: str | None
    overrides: list[str]


def _neutralise_shell(text: str) -> str:
    """Replace shell/Kubernetes variable references by sample values so shlex can split the line."""
    text = text.replace("$$(", "$(")
    sample = {"MLFLOW_TRACKING_URI": "http://mlflow.test:5000"}
    text = re.sub(r"\$\{(\w+)(?::[?-][^}]*)?\}", lambda m: sample.get(m.group(1), "X"), text)
    return re.sub(r"\$(\w+)", lambda m: sample.get(m.group(1), "X"), text)


def _is_cli(tokens: list[str], i: int) -> int:
    """How many tokens at ``i`` invoke the CLI (``mtrec``, ``.../bin/mtrec``, ``python -m jobs.cli``); 0 if none."""
    tok = tokens[i]
    if tok == "mtrec" or tok.endswith("/bin/mtrec"):
        return 1
    if re.fullmatch(r"(.*/)?python(3[.\d]*)?", tok) and tokens[i + 1 : i + 3] == ["-m", "jobs.cli"]:
        return 3
    return 0


def mtrec_calls_in_command(command: str, where: str) -> list[MtrecCall]:
    tokens = shlex.split(_neutralise_shell(command), comments=False)
    calls = []
    for i in range(len(tokens)):
        width = _is_cli(tokens, i)
        if not width or i + width >= len(tokens):
            continue
        call = MtrecCall(where, tokens[i + width], None, [])
        j = i + width + 1
        while j < len(tokens) and tokens[j] not in {";", "&&", "||", ">>", ">", "|"} and not tokens[j].endswith(";"):
            if tokens[j] in {"--config", "-c"}:
                call.config = tokens[j + 1]
                j += 1
            elif tokens[j] in {"--set", "-s"}:
                call.overrides.append(tokens[j + 1])
                j += 1
            j += 1
        calls.append(call)
    return calls


def mtrec_calls(root: Path) -> list[MtrecCall]:
    calls: list[MtrecCall] = []
    for path in sorted((root / "infra").rglob("*.yaml")):
        rel = str(path.relative_to(root))
        for doc in yaml_docs(path):
            if doc.get("kind") == "RayJob":
                calls += mtrec_calls_in_command(doc["spec"]["entrypoint"], rel)
            for _, key, value in walk(doc):
                if key in {"command", "args"} and isinstance(value, list):
                    # exec form (["mtrec", "run", ...]) and shell scripts (["bash", "-c"] + ["... mtrec run ..."])
                    calls += mtrec_calls_in_command(" ".join(shlex.quote(str(v)) for v in value), rel)
                    for v in value:
                        calls += mtrec_calls_in_command(str(v), rel)
    for path in sorted((root / "infra").rglob("*.cron")):
        for line in path.read_text().splitlines():
            fields = line.split(None, 6)
            if len(fields) == 7 and not line.lstrip().startswith("#") and "=" not in fields[0]:
                calls += mtrec_calls_in_command(fields[6], str(path.relative_to(root)))
    return calls


def cli_commands() -> set[str] | None:
    """The subcommands jobs/cli.py registers, or None while it cannot be imported."""
    try:
        import typer.main

        from jobs.cli import app
    except ImportError:
        return None
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# Tests: the repository as it is
# ---------------------------------------------------------------------------------------------------------------


def test_pins_are_read_from_the_repository():
    pins = repo_pins(ROOT)
    assert set(pins) >= {"ray", "mlflow", "python", "torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu"}
    assert all(re.fullmatch(r"\d+(\.\d+)+", v) for v in pins.values()), pins


def test_versions_in_docker_and_infra_match_the_pins():
    problems = version_problems(ROOT)
    assert not problems, "versions drifted from requirements/base.txt, install.sh, pyproject:\n" + "\n".join(problems)


def test_version_scan_covers_the_files_that_pin_something():
    """Guard against a scanner that silently finds nothing (the check above would then pass vacuously)."""
    seen = {(m.where, m.package) for m in collect_mentions(ROOT)}
    expected = {
        ("infra/kuberay/raycluster.yaml", "ray"),
        ("infra/kuberay/rayjob.yaml", "ray"),
        ("infra/kuberay/rayjob-gpu.yaml", "ray"),
        ("infra/ray/cluster.yaml", "ray"),
        ("infra/ray/cluster.yaml", "torch"),
        ("infra/ray/cluster.yaml", "mlflow"),
        ("docker/Dockerfile.mlflow", "mlflow"),
        ("infra/mlflow/deployment.yaml", "mlflow"),
        ("infra/mlflow/docker-compose.yaml", "mlflow"),
        ("docker/Dockerfile.cpu", "python"),
        ("docker/Dockerfile.cuda", "python"),
        ("docker/Dockerfile.mlflow", "python"),
    }
    assert expected <= seen, f"not found: {sorted(expected - seen)}"


def test_training_dockerfiles_install_through_the_install_script():
    for name, target in [("Dockerfile.cpu", "cpu"), ("Dockerfile.cuda", "gpu")]:
        path = ROOT / "docker" / name
        runs = [i.value for i in parse_dockerfile(path.read_text()) if i.cmd == "RUN"]
        install = [r for r in runs if "scripts/install.sh" in r]
        assert len(install) == 1, f"{name}: expected one RUN with scripts/install.sh"
        assert re.search(rf"\bTARGET={target}\b", install[0]), f"{name}: install.sh must run with TARGET={target}"
        # The stack's versions come from install.sh/requirements only, never a second pin in an instruction.
        for m in text_mentions(dockerfile_text_resolved(path), name):
            assert m.package not in {"torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "ray", "mlflow"}, m
        copies = " ".join(i.value for i in parse_dockerfile(path.read_text()) if i.cmd == "COPY")
        for needed in ("scripts/", "requirements/", "pyproject.toml", "features/", "models/", "pipeline/", "jobs/"):
            assert needed in copies, f"{name}: install.sh needs {needed} in the image"


def test_dockerfiles_run_as_non_root():
    for name in ("Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"):
        instrs = parse_dockerfile((ROOT / "docker" / name).read_text())
        users = [i.value for i in instrs if i.cmd == "USER"]
        assert users, f"{name}: no USER"
        user = substitute(users[-1], dockerfile_args(instrs)).split(":")[0]
        assert user not in {"root", "0"}, f"{name}: runs as root"
        # numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd
        assert user.isdigit(), f"{name}: USER {user} should be numeric"


def test_cuda_dockerfile_base_and_torch_index_agree():
    path = ROOT / "docker/Dockerfile.cuda"
    args = dockerfile_args(parse_dockerfile(path.read_text()))
    base = from_images(path)[-1]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+", base)
    assert m, f"unexpected CUDA base image {base}"
    index = args.get("TORCH_EXTRA_INDEX_URL", "")
    if index:  # an explicit CUDA wheel index must be the base image's CUDA version
        assert index.rstrip("/").endswith(f"/cu{m.group(1)}{m.group(2)}"), (base, index)
    else:  # no index: PyPI's torch/fbgemm-gpu, which are CUDA 13.0 builds
        assert (m.group(1), m.group(2)) == ("13", "0"), f"{base}: PyPI's torch 2.13 wheels are CUDA 13.0 builds"


def test_mlflow_dockerfile_serves_on_all_interfaces_without_baked_secrets():
    path = ROOT / "docker/Dockerfile.mlflow"
    instrs = parse_dockerfile(path.read_text())
    resolved = dockerfile_text_resolved(path)
    entry = next(i.value for i in reversed(instrs) if i.cmd == "ENTRYPOINT")
    assert entry.startswith('["mlflow", "server"') and '"0.0.0.0"' in entry and "--serve-artifacts" in entry
    assert "--backend-store-uri" not in entry, "the backend store must come from MLFLOW_BACKEND_STORE_URI"
    for needed in ("psycopg2-binary==", "boto3=="):
        assert needed in resolved
    env = " ".join(i.value for i in instrs if i.cmd in {"ENV", "ARG"})
    assert not re.search(r"BACKEND_STORE_URI|AWS_SECRET|PASSWORD", env), "secrets or store URIs baked into the image"


def test_entrypoint_sends_subcommands_to_mtrec_and_runs_programs(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "mtrec"
    fake.write_text('#!/bin/sh\necho "mtrec $*"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}

    def run(*args: str) -> str:
        cmd = ["sh", str(ROOT / "docker/entrypoint.sh"), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()

    assert run("run", "--config", "c.yaml") == "mtrec run --config c.yaml"
    assert run("--help") == "mtrec --help"
    assert run() == "mtrec --help"
    assert run("echo", "hello") == "hello"  # `ray up` starts the container with `bash`, KubeRay with `ray start`


def test_manifests_are_valid_yaml_with_the_expected_kinds():
    for rel, kinds in EXPECTED_KINDS.items():
        docs = yaml_docs(ROOT / rel)
        assert [d.get("kind") for d in docs] == kinds, rel
        for d in docs:
            assert d.get("apiVersion") and d.get("metadata", {}).get("name"), f"{rel}: {d.get('kind')}"
    listed = {str(p.relative_to(ROOT)) for p in (ROOT / "infra").rglob("*.yaml")}
    unlisted = listed - set(EXPECTED_KINDS) - {"infra/ray/cluster.yaml", "infra/mlflow/docker-compose.yaml"}
    assert not unlisted, f"add the new manifests to EXPECTED_KINDS: {sorted(unlisted)}"


def test_no_inline_secrets():
    problems = secret_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_job_commands_are_part_of_the_cli_contract():
    calls = mtrec_calls(ROOT)
    assert {c.where for c in calls} >= {
        "infra/kuberay/rayjob.yaml",
        "infra/kuberay/rayjob-gpu.yaml",
        "infra/cron/cronjob.yaml",
        "infra/cron/mtrec-daily.cron",
    }
    for c in calls:
        assert c.command in CLI_CONTRACT, f"{c.where}: `mtrec {c.command}` is not a mtrec command"
        assert c.config, f"{c.where}: `mtrec {c.command}` without --config"
    assert {c.command for c in calls if "cron" in c.where} == {"daily"}
    assert {c.command for c in calls if "rayjob" in c.where} == {"run"}


def test_job_commands_are_registered_in_the_cli():
    registered = cli_commands()
    if registered is None:
        pytest.skip("jobs.cli is not importable")
    missing = {c.command for c in mtrec_calls(ROOT)} - registered
    assert not missing - PLANNED_COMMANDS, f"manifests call commands the CLI lacks: {sorted(missing)}"
    if missing:
        pytest.xfail(f"planned but not yet in jobs/cli.py: {sorted(missing)}")


def test_job_configs_and_overrides_are_valid():
    """Every --config exists in the repo (at /opt/mtrec in the images) and the --set overrides are config fields."""
    from pipeline.config import load_config

    for c in mtrec_calls(ROOT):
        assert c.config
        rel = c.config.removeprefix(IMAGE_SRC)
        path = ROOT / rel
        assert path.is_file(), f"{c.where}: --config {c.config} is not in the repository"
        cfg = load_config(path, c.overrides)  # raises ConfigError on an unknown or invalid field
        uri = cfg.tracking_uri()
        if "kuberay" in c.where or "cronjob" in c.where:
            assert uri.startswith("http"), f"{c.where}: runs on a cluster but logs to {uri}"
            assert cfg.artifact_location().startswith("mlflow-artifacts:/"), c.where
            assert cfg.run_dir.is_absolute() and cfg.data.path.is_absolute(), f"{c.where}: paths not on /data"


def test_rayjobs_and_raycluster():
    pins = repo_pins(ROOT)
    for rel in ("infra/kuberay/rayjob.yaml", "infra/kuberay/rayjob-gpu.yaml", "infra/kuberay/raycluster.yaml"):
        doc = yaml_docs(ROOT / rel)[0]
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec", spec)
        assert cluster["rayVersion"] == pins["ray"]
        if doc["kind"] == "RayJob":
            assert spec["shutdownAfterJobFinishes"] is True, rel
            assert "runtimeEnvYAML" in spec and "pip" not in yaml.safe_load(spec["runtimeEnvYAML"]), rel
            assert "${MLFLOW_TRACKING_URI" in spec["entrypoint"], rel
            submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
            assert {"configMapRef": {"name": "mtrec-env"}} in submitter["envFrom"], f"{rel}: submitter expands the URI"
        pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for pod in pods:
            for ctr in pod["spec"]["containers"]:
                limits = ctr.get("resources", {}).get("limits", {})
                gpu = "nvidia.com/gpu" in limits
                assert ctr["image"].endswith(":cuda" if gpu else ":cpu"), f"{rel}: {ctr['name']} {ctr['image']}"
                assert {"configMapRef": {"name": "mtrec-env"}} in ctr.get("envFrom", []), f"{rel}: {ctr['name']}"
                names = {e["name"] for e in ctr.get("env", [])}
                assert "MLFLOW_TRACKING_URI" not in names, f"{rel}: the tracking URI comes from the ConfigMap"
    gpu_job = yaml_docs(ROOT / "infra/kuberay/rayjob-gpu.yaml")[0]["spec"]
    assert "train.use_gpu=true" in gpu_job["entrypoint"]
    assert any(
        "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
        for g in gpu_job["rayClusterSpec"]["workerGroupSpecs"]
    )


def test_ray_up_cluster_yaml_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    import json

    schema = json.loads((Path(ray_autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml_docs(ROOT / "infra/ray/cluster.yaml")[0]
    jsonschema.validate(cfg, schema)
    assert cfg["docker"]["image"].endswith(":cpu")
    assert cfg["available_node_types"]["ray.worker.gpu"]["docker"]["worker_image"].endswith(":cuda")
    assert not any("pip install" in c and "boto3" not in c for c in cfg["setup_commands"]), "pins come from the image"


def test_mlflow_server_manifests():
    pins = repo_pins(ROOT)
    deploy, _, service = yaml_docs(ROOT / "infra/mlflow/deployment.yaml")
    pod = deploy["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["image"].endswith(f"mtrec-mlflow:{pins['mlflow']}")
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health", probe
    env = {e["name"]: e for e in server["env"]}
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    assert "$(POSTGRES_PASSWORD)" in env["MLFLOW_BACKEND_STORE_URI"]["value"]
    # Migrations read the store URI from the environment (the password stays out of the arguments).
    assert pod["initContainers"][0]["command"] == ["mlflow-db-upgrade"]
    assert "MLFLOW_BACKEND_STORE_URI" in {e["name"] for e in pod["initContainers"][0]["env"]}
    assert service["spec"]["ports"][0]["port"] == 5000
    config = yaml_docs(ROOT / "infra/mlflow/configmap.yaml")[0]["data"]
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    # in-cluster clients send Host: mlflow:5000, which mlflow's default allow-list (localhost, IPs) rejects
    assert "mlflow:5000" in config["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    shared = yaml_docs(ROOT / "infra/kuberay/shared.yaml")[0]["data"]
    assert shared["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    compose = yaml_docs(ROOT / "infra/mlflow/docker-compose.yaml")[0]["services"]
    assert {"postgres", "minio", "mlflow"} <= set(compose)
    assert compose["mlflow"]["build"]["dockerfile"] == "docker/Dockerfile.mlflow"
    assert (ROOT / "infra/mlflow" / compose["mlflow"]["build"]["context"] / "docker/Dockerfile.mlflow").is_file()


def test_daily_schedules_agree_and_never_overlap():
    cronjob = yaml_docs(ROOT / "infra/cron/cronjob.yaml")[0]["spec"]
    assert cronjob["concurrencyPolicy"] == "Forbid"
    assert cronjob["timeZone"] in {"Etc/UTC", "UTC"}
    line = next(
        ln
        for ln in (ROOT / "infra/cron/mtrec-daily.cron").read_text().splitlines()
        if ln.strip() and not ln.startswith("#") and "mtrec daily" in ln
    )
    assert line.split()[:5] == cronjob["schedule"].split(), "crontab and CronJob should run at the same UTC time"
    assert "flock -n" in line and ">>" in line and "2>&1" in line


# ---------------------------------------------------------------------------------------------------------------
# Tests: the checks catch drift (unit tests on bad input, and mutated copies of the repository)
# ---------------------------------------------------------------------------------------------------------------


def _copy_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for rel in ("requirements", "scripts", "docker", "infra"):
        shutil.copytree(ROOT / rel, root / rel)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_pin_problems_reports_each_mismatch():
    pins = {"ray": "2.60.0", "mlflow": "3.17.2", "python": "3.11"}
    mentions = [
        Mention("a.yaml", "ray", "2.60.0"),
        Mention("b.yaml", "ray", "2.59.1"),
        Mention("Dockerfile", "python", "3.12"),
        Mention("c.yaml", "boto3", "1.0"),
        Mention("d.yaml", "boto3", "1.1"),
    ]
    problems = pin_problems(mentions, pins)
    assert any("b.yaml" in p and "2.59.1" in p for p in problems)
    assert any("Dockerfile" in p and "3.12" in p for p in problems)
    assert any("boto3" in p for p in problems)
    assert not any("a.yaml" in p for p in problems)


def test_text_mentions_finds_pins_images_and_runtime_checks():
    text = (
        'pip install "ray[default]==2.59.0" mlflow==3.1.0\nimage: rayproject/ray:2.58.0-py311\n'
        "assert torch.__version__.split('+')[0] == '2.12.0'\nimage: x/mtrec-mlflow:3.0.0\nFROM python:3.12-slim"
    )
    found = {(m.package, m.version) for m in text_mentions(text, "t")}
    assert found == {
        ("ray", "2.59.0"),
        ("mlflow", "3.1.0"),
        ("ray", "2.58.0"),
        ("torch", "2.12.0"),
        ("mlflow", "3.0.0"),
        ("python", "3.12"),
    }


def test_dockerfile_parser_joins_continuations_and_resolves_args():
    text = "ARG PY=3.11\nFROM python:${PY}-slim\n# c\nRUN a \\\n  # inner comment\n  && b\nUSER 1000\n"
    instrs = parse_dockerfile(text)
    assert [i.cmd for i in instrs] == ["ARG", "FROM", "RUN", "USER"]
    assert instrs[2].value == "a  && b"
    assert substitute(instrs[1].value, dockerfile_args(instrs)) == "python:3.11-slim"


def test_bumping_the_ray_pin_flags_every_manifest(tmp_path):
    root = _copy_repo(tmp_path)
    _edit(root / "requirements/base.txt", "ray[default,train,data]==2.60.0", "ray[default,train,data]==2.61.0")
    flagged = {p.split(":")[0] for p in version_problems(root)}
    assert {
        "infra/kuberay/raycluster.yaml",
        "infra/kuberay/rayjob.yaml",
        "infra/kuberay/rayjob-gpu.yaml",
        "infra/ray/cluster.yaml",
    } <= flagged


def test_bumping_the_mlflow_pin_flags_the_server_image(tmp_path):
    root = _copy_repo(tmp_path)
    _edit(root / "requirements/base.txt", "mlflow[auth]==3.17.2", "mlflow[auth]==3.18.0")
    flagged = {p.split(":")[0] for p in version_problems(root)}
    assert {"docker/Dockerfile.mlflow", "infra/mlflow/deployment.yaml", "infra/mlflow/docker-compose.yaml"} <= flagged


def test_changing_python_or_torch_is_caught(tmp_path):
    root = _copy_repo(tmp_path)
    _edit(root / "pyproject.toml", 'requires-python = ">=3.11,<3.12"', 'requires-python = ">=3.12,<3.13"')
    _edit(root / "scripts/install.sh", '"torch==2.13.0"', '"torch==2.14.0"')
    problems = version_problems(root)
    assert {"docker/Dockerfile.cpu", "docker/Dockerfile.cuda", "docker/Dockerfile.mlflow"} <= {
        p.split(":")[0] for p in problems if "python" in p
    }
    assert any(p.startswith("infra/ray/cluster.yaml") and "torch" in p for p in problems)


def test_a_drifted_manifest_is_caught(tmp_path):
    root = _copy_repo(tmp_path)
    _edit(root / "infra/kuberay/rayjob.yaml", 'rayVersion: "2.60.0"', 'rayVersion: "2.59.0"')
    assert version_problems(root) == ["infra/kuberay/rayjob.yaml: ray 2.59.0, but the repository pins 2.60.0"]


def test_secret_scanner_flags_literal_secrets(tmp_path):
    bad = {
        "kind": "Deployment",
        "spec": {
            "containers": [
                {
                    "env": [
                        {"name": "POSTGRES_PASSWORD", "value": "hunter2"},
                        {"name": "OK_REF", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                        {"name": "AWS_SECRET_ACCESS_KEY", "value": "$(FROM_SECRET)"},
                    ]
                }
            ]
        },
        "password": "hunter2",
    }
    problems = secret_problems_in_doc(bad, "x.yaml", example=False)
    assert len(problems) == 2 and all("x.yaml" in p for p in problems)
    assert secret_problems_in_doc({"kind": "Secret", "stringData": {"password": "REPLACE_ME"}}, "s", example=False)
    assert not secret_problems_in_doc({"kind": "Secret", "stringData": {"password": "REPLACE_ME"}}, "s", example=True)
    assert uri_password_problems("postgresql://mlflow:hunter2@db:5432/mlflow", "u")
    assert not uri_password_problems("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@db:5432/m", "u")
    assert not uri_password_problems("http://${S3_ACCESS_KEY_ID}:${S3_SECRET_ACCESS_KEY}@minio:9000", "u")

    root = _copy_repo(tmp_path)
    _edit(root / "infra/mlflow/docker-compose.yaml", "${POSTGRES_PASSWORD:?set it in compose.env}", "hunter2")
    assert any("docker-compose.yaml" in p for p in secret_problems(root))


def test_command_extraction_handles_shell_and_kubernetes_syntax():
    cmd = (
        'set -e; exec ray job submit --submission-id "d-$$(date -u +%Y-%m-%d)" -- mtrec daily --config c.yaml '
        '--set mlflow.tracking_uri="${MLFLOW_TRACKING_URI:?not set: see docs}" --set a.b=1 >> log 2>&1'
    )
    (call,) = mtrec_calls_in_command(cmd, "w")
    assert (call.command, call.config) == ("daily", "c.yaml")
    assert call.overrides == ["mlflow.tracking_uri=http://mlflow.test:5000", "a.b=1"]
    assert mtrec_calls_in_command("/srv/mtrec/.venv/bin/mtrec run --config x.yaml", "w")[0].command == "run"
    (module,) = mtrec_calls_in_command("exec python -m jobs.cli daily --config c.yaml --set a.b=1", "w")
    assert (module.command, module.config, module.overrides) == ("daily", "c.yaml", ["a.b=1"])
    assert mtrec_calls_in_command("/opt/venv/bin/python3.11 -m jobs.cli run -c x.yaml", "w")[0].config == "x.yaml"
    assert not mtrec_calls_in_command("python -m pytest -q", "w")


# ---------------------------------------------------------------------------------------------------------------
# Locked down: MLflow authentication, no password in process arguments, network policies, Ray's Jobs API
# ---------------------------------------------------------------------------------------------------------------


def test_mlflow_image_runs_the_basic_auth_app_without_a_baked_password():
    path = ROOT / "docker/Dockerfile.mlflow"
    instrs = parse_dockerfile(path.read_text())
    entry = next(i.value for i in reversed(instrs) if i.cmd == "ENTRYPOINT")
    assert '"--app-name", "basic-auth"' in entry, "the server must run MLflow's basic-auth app"
    env = " ".join(i.value for i in instrs if i.cmd == "ENV")
    assert "MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini" in env
    runs = " ".join(i.value for i in instrs if i.cmd == "RUN")
    assert "'[mlflow]'" in runs and "admin_password" not in runs, "the admin password comes from a Secret at run time"
    assert "/usr/local/bin/mlflow-db-upgrade" in runs and 'os.environ["MLFLOW_BACKEND_STORE_URI"]' in runs


def _containers(doc: Any) -> list[tuple[str, dict]]:
    """(where, container) for every container and init container anywhere in a manifest."""
    found = []
    for path, key, value in walk(doc):
        if key in {"containers", "initContainers"} and isinstance(value, list):
            found += [(f"{'/'.join(map(str, path))}/{c.get('name')}", c) for c in value if isinstance(c, dict)]
    return found


def password_in_arguments_problems(root: Path) -> list[str]:
    """Container commands/args (and compose entrypoints/commands) that carry a database URI or password."""
    problems = []
    secretish = re.compile(r"postgresql://|BACKEND_STORE_URI|PASSWORD", re.IGNORECASE)
    for path in sorted((root / "infra").rglob("*.yaml")):
        rel = str(path.relative_to(root))
        for doc in yaml_docs(path):
            items: list[tuple[str, dict]] = _containers(doc)
            if path.name == "docker-compose.yaml":
                items += [(f"services/{n}", svc) for n, svc in (doc.get("services") or {}).items()]
            for where, spec in items:
                for key in ("command", "args", "entrypoint"):
                    text = json_text(spec.get(key))
                    if secretish.search(text):
                        problems.append(f"{rel}: {where}: {key} carries a secret: {text}")
    return problems


def json_text(value: Any) -> str:
    if value is None:
        return ""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def test_database_password_is_not_in_process_arguments():
    problems = password_in_arguments_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_password_in_arguments_check_catches_the_old_db_upgrade(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "infra", copy / "infra")
    deployment = copy / "infra/mlflow/deployment.yaml"
    deployment.write_text(
        deployment.read_text().replace(
            'command: ["mlflow-db-upgrade"]', 'command: ["mlflow", "db", "upgrade", "$(MLFLOW_BACKEND_STORE_URI)"]'
        )
    )
    assert any("db-upgrade" in p for p in password_in_arguments_problems(copy))


def test_mlflow_manifests_turn_authentication_on_from_secrets():
    deployment = yaml_docs(ROOT / "infra/mlflow/deployment.yaml")[0]
    server = next(c for _, c in _containers(deployment) if c["name"] == "mlflow")
    env = {e["name"]: e for e in server["env"]}
    for name, key in [
        ("MLFLOW_AUTH_ADMIN_USERNAME", "admin-username"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
    ]:
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-secrets", "key": key}, name
    secret = yaml_docs(ROOT / "infra/mlflow/secret.example.yaml")[0]
    assert {"admin-username", "admin-password", "flask-secret-key"} <= set(secret["stringData"])
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert "/var/lib/mlflow-auth" in mounts, "the auth app's user store must outlive the pod"
    compose = yaml_docs(ROOT / "infra/mlflow/docker-compose.yaml")[0]["services"]["mlflow"]["environment"]
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(
        compose
    )


def _policies() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in yaml_docs(ROOT / "infra/networkpolicy.yaml")}


def test_network_policies_deny_by_default_and_open_only_the_listed_paths():
    policies = _policies()
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    # Every allow rule names its peers: an empty `from`/`to` (or a rule without one) would open a port to everyone.
    for name, policy in policies.items():
        for direction, peers in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(direction, []):
                assert rule.get(peers), f"{name}: a {direction} rule without `{peers}` allows every peer"
    jobs_api = policies["ray-jobs-api"]["spec"]
    assert jobs_api["podSelector"] == {"matchLabels": {"ray.io/node-type": "head"}}
    assert [p["port"] for r in jobs_api["ingress"] for p in r["ports"]] == [8265]
    mlflow = policies["mlflow"]["spec"]
    assert [p["port"] for r in mlflow["ingress"] for p in r["ports"]] == [5000]
    assert {p["port"] for r in mlflow["egress"] for p in r["ports"]} == {5432, 9000}


def test_job_submitters_carry_the_label_the_policies_allow():
    for rel in ("infra/kuberay/rayjob.yaml", "infra/kuberay/rayjob-gpu.yaml"):
        labels = yaml_docs(ROOT / rel)[0]["spec"]["submitterPodTemplate"]["metadata"]["labels"]
        assert labels.get("mtrec.io/ray-client") == "true", rel
    cron = yaml_docs(ROOT / "infra/cron/cronjob.yaml")[0]
    labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert labels.get("mtrec.io/ray-client") == "true"


def test_ray_dashboard_is_not_bound_to_all_interfaces():
    for rel in ("infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml", "infra/kuberay/rayjob-gpu.yaml"):
        doc = yaml_docs(ROOT / rel)[0]
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "${POD_IP}", rel
        container = head["template"]["spec"]["containers"][0]
        pod_ip = [e for e in container["env"] if e["name"] == "POD_IP"]
        assert pod_ip and pod_ip[0]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", rel
        for probe in ("readinessProbe", "livenessProbe"):  # KubeRay's defaults would ask localhost:8265
            assert "POD_IP" in json_text(container[probe]["exec"]["command"]), f"{rel}: {probe}"
    text = (ROOT / "infra/ray/cluster.yaml").read_text()
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0" not in text
