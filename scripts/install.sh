#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs the pinned stack.
#   bash scripts/install.sh                  CPU: torch's CPU build + fbgemm-gpu-cpu, the default and what CI uses
#   TARGET=gpu bash scripts/install.sh       CUDA machines: torch's CUDA build + the CUDA fbgemm-gpu (1.8.0)
# Re-running with the other TARGET over an existing venv switches it cleanly: scripts/venv_switch.py reads what is
# installed and removes torch when it is the other build and both fbgemm distributions when the other one is there
# (they own the same fbgemm_gpu/ folder), then pip installs, and the result is verified. The stamp file
# $VENV/.installed records the target and the builds (make reads it, so `make setup` keeps a GPU venv a GPU venv).
# Options (environment):
#   VENV=path             where the virtual environment goes (default .venv)
#   INSTALL_DEV=0         skip pytest/ruff/mypy (images)
#   TORCH_INDEX_URL=url   extra index for torch/fbgemm only (the PyTorch CPU index for CPU, cu126 etc. for GPU)
#   SKIP_IMPORT_CHECK=1   skip the final import check (image builds on machines without a GPU driver)
#   DRY_RUN=1             change nothing: print the switch's decisions and what pip would install (pip --dry-run,
#                         metadata only, no wheel downloaded); fails when pip would bring the wrong torch build
# torchrec's own metadata pulls the CUDA fbgemm-gpu, which breaks the import on a CPU box, so torchrec goes in
# with --no-deps and its real dependencies are listed in requirements/torchrec-deps.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
TARGET=${TARGET:-cpu}
INSTALL_DEV=${INSTALL_DEV:-1}
DRY_RUN=${DRY_RUN:-0}
TORCH_PIN="torch==2.13.0"
TORCHREC_PIN="torchrec==1.8.0"
case "$TARGET" in
  cpu) FBGEMM_PIN="fbgemm-gpu-cpu==1.8.0" ;;
  gpu) FBGEMM_PIN="fbgemm-gpu==1.8.0" ;;
  *) echo "TARGET must be cpu or gpu, got '$TARGET'" >&2; exit 2 ;;
esac
SWITCH="scripts/venv_switch.py"
TORCH_INDEX=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_INDEX=(--extra-index-url "$TORCH_INDEX_URL"); fi

if [ "$DRY_RUN" = "1" ]; then
  if [ -x "$VENV/bin/python" ]; then VPY="$VENV/bin/python"; else VPY="$PY"; fi
  PIP="$VPY -m pip --disable-pip-version-check"
  REMOVE=""
  if [ -x "$VENV/bin/python" ]; then REMOVE=$("$VPY" "$SWITCH" uninstall "$TARGET"); fi
  echo "target: $TARGET"
  echo "installed: $(if [ -x "$VENV/bin/python" ]; then "$VPY" "$SWITCH" state; else echo none; fi)"
  echo "would uninstall: ${REMOVE:-nothing}"
  report=$(mktemp)
  trap 'rm -f "$report"' EXIT
  # What pip would install once the removals are done (--ignore-installed stands in for them), torch and fbgemm
  # separately, so that a switch of one does not show the other as new.
  for pin in "$TORCH_PIN" "$FBGEMM_PIN"; do
    name=${pin%%==*}
    ignore=()
    if [ "$name" = "torch" ] && [[ " $REMOVE " == *" torch "* ]]; then ignore=(--ignore-installed); fi
    if [ "$name" != "torch" ] && [[ " $REMOVE " == *" fbgemm-gpu"* ]]; then ignore=(--ignore-installed); fi
    $PIP install -q --dry-run --no-deps "${ignore[@]}" "${TORCH_INDEX[@]}" --report "$report" "$pin"
    "$VPY" "$SWITCH" check-report "$TARGET" "$report"
  done
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
rm -f "$VENV/.installed"  # no stamp while the venv is in between

$PIP install -q --upgrade "pip>=24" wheel "setuptools>=68"
REMOVE=$("$VENV/bin/python" "$SWITCH" uninstall "$TARGET")
if [ -n "$REMOVE" ]; then
  echo "switching $VENV to $TARGET: removing $REMOVE"
  # shellcheck disable=SC2086  # a list of distribution names
  $PIP uninstall -q -y $REMOVE
fi
$PIP install -q "${TORCH_INDEX[@]}" "$TORCH_PIN"
$PIP install -q "${TORCH_INDEX[@]}" --no-deps "$TORCHREC_PIN" "$FBGEMM_PIN"
$PIP install -q -r requirements/torchrec-deps.txt
$PIP install -q -r requirements/base.txt
$PIP install -q --no-deps --no-build-isolation -e .
if [ "$INSTALL_DEV" = "1" ]; then
  $PIP install -q -r requirements/dev.txt
fi
# Exactly the target's builds, or fail naming what is wrong (e.g. a CPU torch found on a CUDA install).
STAMP=$("$VENV/bin/python" "$SWITCH" verify "$TARGET")
if [ "${SKIP_IMPORT_CHECK:-0}" != "1" ]; then
  "$VENV/bin/python" - <<'PY'
import fbgemm_gpu  # noqa: F401  the imports themselves are the check (a wrong fbgemm build fails here)
import torch
import torchrec  # noqa: F401

print(f"torch {torch.__version__}, torchrec ok, fbgemm ok, cuda available: {torch.cuda.is_available()}")
PY
fi
printf '%s\n' "$STAMP" > "$VENV/.installed"
echo "installed ($VENV/.installed): $(echo "$STAMP" | tr '\n' ' ')"
