# flame: `make demo` trains the demo model end to end; `make test` runs the test suite.
# Each target creates .venv on first use (CPU torch 2.13.0 unless a torch is already there) and reuses it.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: venv demo test test-slow check gpu-wheels gpu-check-dry clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: venv
	bash scripts/demo.sh

test: venv
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=15

test-slow: venv
	$(PY) -m pytest -q -m slow -n 2 --dist loadscope --durations=15

check: venv
	$(VENV)/bin/ruff check flame tests scripts custom_models benchmarks
	$(VENV)/bin/ruff format --check flame tests scripts custom_models benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Wheels for the lent GPU machine, which reaches no registry (scripts/gpu/wheels.py; README "GPU check").
gpu-wheels: venv
	$(PY) scripts/gpu/wheels.py --dest .whl

# The GPU check on this machine: every step but the CUDA work, on the wheels of `make gpu-wheels`.
gpu-check-dry: venv
	$(PY) scripts/gpu/check.py --dry

clean:
	rm -rf outputs/demo data/demo
