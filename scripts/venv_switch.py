"""The decisions of scripts/install.sh about torch and fbgemm, run with the target venv's own python.

A venv holds one build of each: torch's CPU or CUDA build, and fbgemm-gpu-cpu or fbgemm-gpu. Both fbgemm
distributions own the same ``fbgemm_gpu/`` folder, so installing one over the other leaves a mix that imports
against neither torch; and an installed ``2.13.0+cpu`` satisfies ``torch==2.13.0``, so pip alone never switches
torch. Hence: read what is installed, uninstall what belongs to the other target, then let pip install.

    python venv_switch.py state                    what is installed (JSON)
    python venv_switch.py uninstall TARGET         the distributions to remove before installing TARGET
    python venv_switch.py check-report TARGET R    what a ``pip install --dry-run --report R`` would install; fails
                                                   when it would bring a torch of the other build
    python venv_switch.py verify TARGET            after the install: exactly TARGET's builds, else fail; prints
                                                   the stamp file's lines
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from typing import Any

FBGEMM = {"cpu": "fbgemm-gpu-cpu", "gpu": "fbgemm-gpu"}
_CUDA_MARKERS = ("nvidia-", "cuda-toolkit")


def torch_build(version: str, requires: list[str]) -> str:
    """'cpu' or 'gpu' from a torch distribution's version and requirements: a local ``+cpu`` / ``+cuXXX`` label
    decides; PyPI's unlabelled Linux wheel is the CUDA build, which requires the nvidia-* / cuda-toolkit wheels."""
    local = version.partition("+")[2]
    if local.startswith("cpu"):
        return "cpu"
    if local.startswith(("cu", "rocm")):
        return "gpu"
    names = [r.split(";")[0].strip().lower() for r in requires]
    return "gpu" if any(n.startswith(_CUDA_MARKERS) for n in names) else "cpu"


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def state() -> dict[str, Any]:
    torch = _installed("torch")
    fbgemm = {name: d.version for name in FBGEMM.values() if (d := _installed(name)) is not None}
    return {
        "torch": torch.version if torch else None,
        "torch_build": torch_build(torch.version, torch.requires or []) if torch else None,
        "fbgemm": fbgemm,
    }


def to_uninstall(target: str, current: dict[str, Any]) -> list[str]:
    """Torch when it is the other build; both fbgemm distributions when the other one is there (removing only one
    would delete files the remaining one owns)."""
    out = []
    if current["torch"] is not None and current["torch_build"] != target:
        out.append("torch")
    other = FBGEMM["gpu" if target == "cpu" else "cpu"]
    if other in current["fbgemm"]:
        out += sorted(current["fbgemm"])
    return out


def check_report(target: str, report: dict[str, Any]) -> list[str]:
    """Lines describing what pip would install; raises when a torch of the wrong build or the other fbgemm would
    come in."""
    lines = []
    for item in report.get("install", []):
        meta = item["metadata"]
        name, version = meta["name"].lower().replace("_", "-"), meta["version"]
        where = item.get("download_info", {}).get("url", "")
        if name == "torch":
            build = torch_build(version, meta.get("requires_dist", []))
            if build != target:
                raise SystemExit(
                    f"pip would install torch {version} ({build} build) for TARGET={target}, from {where}: "
                    + (
                        "point TORCH_INDEX_URL at a CUDA wheel index or drop the CPU index / find-links"
                        if target == "gpu"
                        else "set TORCH_INDEX_URL to the CPU wheel index (https://download.pytorch.org/whl/cpu)"
                    )
                )
            lines.append(f"would install torch {version} ({build} build)")
        elif name in FBGEMM.values():
            if name != FBGEMM[target]:
                raise SystemExit(f"pip would install {name} for TARGET={target}; expected {FBGEMM[target]}")
            lines.append(f"would install {name} {version}")
        else:
            lines.append(f"would install {name} {version}")
    return lines or ["nothing to install"]


def verify(target: str) -> list[str]:
    current = state()
    problems = []
    if current["torch_build"] != target:
        problems.append(f"torch {current['torch']} is the {current['torch_build']} build, not {target}")
    if set(current["fbgemm"]) != {FBGEMM[target]}:
        problems.append(f"fbgemm distributions {sorted(current['fbgemm'])}, expected only {FBGEMM[target]}")
    if problems:
        raise SystemExit(f"TARGET={target}: " + "; ".join(problems))
    fbgemm = FBGEMM[target]
    return [
        f"target={target}",
        f"torch={current['torch']}",
        f"torch_build={current['torch_build']}",
        f"fbgemm={fbgemm}=={current['fbgemm'][fbgemm]}",
    ]


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "state":
        print(json.dumps(state()))
    elif command == "uninstall":
        print(" ".join(to_uninstall(args[0], state())))
    elif command == "check-report":
        with open(args[1]) as f:
            print("\n".join(check_report(args[0], json.load(f))))
    elif command == "verify":
        print("\n".join(verify(args[0])))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
