#!/usr/bin/env bash
# Creates .venv and installs the pinned stack.
#   bash scripts/install.sh          CPU (fbgemm-gpu-cpu), the default and what CI uses
#   TARGET=gpu bash scripts/install.sh   CUDA build of fbgemm-gpu of the same release
# torchrec's own metadata pulls the CUDA fbgemm-gpu, which breaks the import on a CPU box, so torchrec goes in
# with --no-deps and its real dependencies are listed in requirements/torchrec-deps.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
TARGET=${TARGET:-cpu}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade "pip>=24" wheel
$PIP install -q "torch==2.13.0"
case "$TARGET" in
  cpu) $PIP install -q --no-deps "torchrec==1.8.0" "fbgemm-gpu-cpu==1.8.0" ;;
  gpu) $PIP install -q --no-deps "torchrec==1.8.0" "fbgemm-gpu==1.8.0" ;;
  *) echo "TARGET must be cpu or gpu, got '$TARGET'" >&2; exit 2 ;;
esac
$PIP install -q -r requirements/torchrec-deps.txt
$PIP install -q -r requirements/base.txt
$PIP install -q --no-deps -e .
$PIP install -q -r requirements/dev.txt
"$VENV/bin/python" - <<'PY'
import torch, torchrec, fbgemm_gpu  # noqa: F401  the import itself is the check
print(f"torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0'}, cuda={torch.cuda.is_available()}")
PY
