#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs the pinned stack.
#   bash scripts/install.sh                  CPU: fbgemm-gpu-cpu, the default and what CI uses
#   TARGET=gpu bash scripts/install.sh       CUDA machines: the CUDA fbgemm-gpu of the same release (1.8.0)
# Options (environment):
#   VENV=path             where the virtual environment goes (default .venv)
#   INSTALL_DEV=0         skip pytest/ruff/mypy (images)
#   TORCH_INDEX_URL=url   extra index for torch/fbgemm only (e.g. the PyTorch CPU wheel index in CPU images)
#   SKIP_IMPORT_CHECK=1   skip the final import check (image builds on machines without a GPU driver)
# torchrec's own metadata pulls the CUDA fbgemm-gpu, which breaks the import on a CPU box, so torchrec goes in
# with --no-deps and its real dependencies are listed in requirements/torchrec-deps.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
TARGET=${TARGET:-cpu}
INSTALL_DEV=${INSTALL_DEV:-1}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
TORCH_INDEX=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_INDEX=(--extra-index-url "$TORCH_INDEX_URL"); fi

$PIP install -q --upgrade "pip>=24" wheel "setuptools>=68"
$PIP install -q "${TORCH_INDEX[@]}" "torch==2.13.0"
case "$TARGET" in
  cpu) $PIP install -q "${TORCH_INDEX[@]}" --no-deps "torchrec==1.8.0" "fbgemm-gpu-cpu==1.8.0" ;;
  gpu) $PIP install -q "${TORCH_INDEX[@]}" --no-deps "torchrec==1.8.0" "fbgemm-gpu==1.8.0" ;;
  *) echo "TARGET must be cpu or gpu, got '$TARGET'" >&2; exit 2 ;;
esac
$PIP install -q -r requirements/torchrec-deps.txt
$PIP install -q -r requirements/base.txt
$PIP install -q --no-deps --no-build-isolation -e .
if [ "$INSTALL_DEV" = "1" ]; then
  $PIP install -q -r requirements/dev.txt
fi
if [ "${SKIP_IMPORT_CHECK:-0}" != "1" ]; then
  "$VENV/bin/python" - <<'PY'
import fbgemm_gpu  # noqa: F401  the imports themselves are the check (a wrong fbgemm build fails here)
import torch
import torchrec  # noqa: F401

print(f"torch {torch.__version__}, torchrec ok, fbgemm ok, cuda available: {torch.cuda.is_available()}")
PY
fi
