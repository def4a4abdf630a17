# The two commands of the README: `make demo` (set up if needed, run the whole pipeline) and `make test`.
PY ?= .venv/bin/python
CONFIG ?= configs/experiments/demo.yaml
SRC := features models pipeline jobs tests benchmarks scripts

.PHONY: setup setup-gpu browser demo test test-fast lint typecheck bench clean

.venv/.installed: scripts/install.sh requirements/*.txt pyproject.toml
	bash scripts/install.sh
	touch $@

setup: .venv/.installed

setup-gpu:  ## CUDA machines: CUDA fbgemm-gpu of the same release instead of fbgemm-gpu-cpu
	TARGET=gpu bash scripts/install.sh
	touch .venv/.installed

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
