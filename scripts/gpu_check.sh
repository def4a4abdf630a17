#!/usr/bin/env bash
# The GPU path in one command, for a CUDA machine (about 10 minutes; prints one table at the end):
#   bash scripts/gpu_check.sh              (or: make gpu-check)
#   bash scripts/gpu_check.sh --cpu-only   the part that needs no GPU (what CI runs)
#
# CPU part (any machine, with the dev venv .venv):
#   1. install switch: its decisions in both directions, with pip --dry-run against the dev venv and a venv that
#      looks like a GPU one (tests/test_install_switch.py; metadata only, no wheel downloaded)
#   2. device hygiene: every bottom x top x gradient method stepped on the meta device (tests/test_device_hygiene.py)
# GPU part (skipped with --cpu-only; fails, rather than skips, where no GPU is visible):
#   3. a fresh GPU venv ($GPU_VENV, default .venv-gpu) made by scripts/install.sh TARGET=gpu, verified
#   4. import check: torch's CUDA build, fbgemm's CUDA ops, a GPU visible
#   5. the GPU-marked tests (NCCL, DMP on CUDA, gather, DCP save/load, export, router determinism); a skip is a failure
#   6. one short training run through Ray Train with train.use_gpu: true and train.precision: bf16
#   7. the throughput benchmark on GPUs (fp32 and bf16)
# Options (environment): GPU_VENV=path, KEEP_VENV=1 (reuse an existing GPU venv), WORKERS=n (default: GPUs, max 2).
set -uo pipefail
cd "$(dirname "$0")/.."
CPU_ONLY=0
if [ "${1:-}" = "--cpu-only" ]; then CPU_ONLY=1; fi
DEV_PY=${DEV_PY:-.venv/bin/python}
GPU_VENV=${GPU_VENV:-.venv-gpu}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
ROWS=()
FAILED=0

# check NAME LOGFILE COMMAND...: runs it, keeps its output in the log, records PASS/FAIL and the last line.
check() {
  local name=$1 log=$2
  shift 2
  local started=$SECONDS
  if "$@" >"$log" 2>&1; then status=PASS; else status=FAIL; FAILED=1; fi
  local detail
  detail=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-90)
  ROWS+=("$(printf '| %-34s | %-4s | %4ss | %s' "$name" "$status" "$((SECONDS - started))" "$detail")")
}
skip() { ROWS+=("$(printf '| %-34s | %-4s | %4s  | %s' "$1" "SKIP" "-" "$2")"); }

no_skips() {  # the GPU tests must run here, not skip
  "$@" | tee /dev/stderr | { ! grep -q "SKIPPED"; }
}

# ---- CPU part -------------------------------------------------------------------------------------------------------
check "install switch decisions (dry run)" "$OUT/install_dry_run.log" \
  env PYTHONPATH="$PWD" "$DEV_PY" -m pytest -q -rs -p no:cacheprovider tests/test_install_switch.py
check "device hygiene on meta" "$OUT/hygiene.log" \
  env PYTHONPATH="$PWD" "$DEV_PY" -m pytest -q -p no:cacheprovider tests/test_device_hygiene.py -m "not slow"

# ---- GPU part -------------------------------------------------------------------------------------------------------
if [ "$CPU_ONLY" = "1" ]; then
  skip "GPU part" "--cpu-only"
else
  if [ "${KEEP_VENV:-0}" != "1" ]; then rm -rf "$GPU_VENV"; fi
  check "fresh GPU venv (install.sh)" "$OUT/install_gpu.log" env TARGET=gpu VENV="$GPU_VENV" bash scripts/install.sh
  GPY="$GPU_VENV/bin/python"
  check "import check" "$OUT/import.log" "$GPY" -c '
import fbgemm_gpu, torch, torchrec  # noqa: F401
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
assert torch.cuda.is_available(), "no GPU visible to torch"
assert hasattr(torch.ops.fbgemm, "asynchronous_complete_cumsum"), "fbgemm CUDA ops missing"
x = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2, 3], device="cuda"))
print(f"torch {torch.__version__} cuda {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, fbgemm ok {x.tolist()}")
'
  check "GPU-marked tests" "$OUT/gpu_tests.log" \
    no_skips env PYTHONPATH="$PWD" "$GPY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu.py
  GPUS=$("$GPY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  WORKERS=${WORKERS:-$(( GPUS < 2 ? (GPUS < 1 ? 1 : GPUS) : 2 ))}
  check "Ray Train run, use_gpu, bf16" "$OUT/train.log" \
    env PYTHONPATH="$PWD" "$GPY" -m jobs.cli run --config configs/experiments/small.yaml --generate \
    --set "run_dir=$OUT/run" --set "data.path=$OUT/run/logs" --set "data.oracle_path=$OUT/run/oracle.parquet" \
    --set train.use_gpu=true --set train.precision=bf16 --set "train.num_workers=$WORKERS"
  for precision in fp32 bf16; do
    check "throughput benchmark, $precision" "$OUT/bench_$precision.log" \
      env PYTHONPATH="$PWD" "$GPY" benchmarks/train_throughput.py --use-gpu --precision "$precision" \
      --workers "$WORKERS" --rows-per-day 50000 --days 2 --json "$OUT/bench_$precision.json"
  done
fi

echo
echo "| check                              | ok   | time  | last line of its log ($OUT/*.log)"
echo "|------------------------------------|------|-------|------------------------------------"
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
