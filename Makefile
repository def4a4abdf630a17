# The two commands of the README: `make demo` (set up if needed, run the whole pipeline) and `make test`.
PY ?= .venv/bin/python
CONFIG ?= configs/experiments/demo.yaml
SRC := features models pipeline jobs tests benchmarks scripts

.PHONY: setup setup-gpu setup-cpu gpu-check browser demo test test-fast lint typecheck bench clean

# install.sh writes the stamp (target and builds); a re-run keeps the venv's target (cpu unless setup-gpu made it gpu).
.venv/.installed: scripts/install.sh scripts/venv_switch.py requirements/*.txt pyproject.toml
	TARGET=$$(sed -n 's/^target=//p' $@ 2>/dev/null || true); TARGET=$${TARGET:-cpu} bash scripts/install.sh

setup: .venv/.installed

setup-gpu:  ## CUDA machines: switch .venv to torch's CUDA build and fbgemm-gpu (and back with `make setup-cpu`)
	TARGET=gpu bash scripts/install.sh

setup-cpu:  ## switch .venv back to torch's CPU build and fbgemm-gpu-cpu
	TARGET=cpu bash scripts/install.sh

gpu-check:  ## CUDA machines: fresh GPU venv, GPU tests, a Ray Train run on GPUs, the benchmark (scripts/gpu_check.sh)
	bash scripts/gpu_check.sh

browser:  ## headless Chromium for the browser tests: Debian's chromium package (root or sudo), once
	command -v chromium >/dev/null 2>&1 || bash scripts/install_browser.sh

demo: setup
	$(PY) -m jobs.cli run --config $(CONFIG) --generate

test: setup browser
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

lint: setup
	.venv/bin/ruff check $(SRC)
	.venv/bin/ruff format --check $(SRC)

typecheck: setup
	.venv/bin/mypy

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
