# Two commands on a fresh machine: `make engines` (build model_repository/), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SPEC ?=
OUTPUT ?= model_repository
TARGET ?=
CHECKPOINT ?=
BUILD_ARGS ?=
STAMP := $(VENV)/.installed

QUICK ?=
OPENAI_PORT ?= 9000

.PHONY: help setup system-deps engines test serve bench gpu-smoke clean

help:
	@echo "make engines   build SPEC (default specs/tiny.yaml; with CHECKPOINT=dir, limits follow the checkpoint) into $(OUTPUT)/"
	@echo "make test      run the test suite (builds first if needed)"
	@echo "make serve     run tritonserver on $(OUTPUT)/ at 127.0.0.1:8001 (gRPC) / :8000 (HTTP), the OpenAI API at :9000 (OPENAI_PORT=0: none)"
	@echo "make bench     perf_analyzer + baselines into benchmarks/results/ (QUICK=1: a smoke run under 3 minutes)"
	@echo "variables: SPEC=specs/<name>.yaml CHECKPOINT=/path/to/hf/dir TARGET=python|onnxruntime|tensorrt BUILD_ARGS='--set key=value'"

setup: $(STAMP)

# torch first, pinned: it resolves to the CPU build on disk instead of downloading a CUDA one.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(MAKE) --no-print-directory system-deps
	touch $@

# perf_analyzer (make bench, tests/test_bench.py) links Debian's libb64: apt-get only when it is missing.
system-deps:
	@dpkg -s libb64-0d >/dev/null 2>&1 || { command -v apt-get >/dev/null \
	  && $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -qq \
	  && $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -qq libb64-0d; } \
	  || echo "warning: cannot install libb64-0d here; perf_analyzer needs it (apt-get install libb64-0d)"

engines: $(STAMP)
	$(PY) -m builder build $(if $(SPEC),--spec $(SPEC)) --output $(OUTPUT) $(if $(TARGET),--target $(TARGET)) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(BUILD_ARGS)

test: engines system-deps
	$(PY) -m pytest -q tests

serve: engines
	$(PY) -m builder serve --repository $(OUTPUT) --openai-port $(OPENAI_PORT)

bench: engines system-deps
	@$(if $(QUICK),,echo "make bench: the full run takes a few minutes for the tiny preset, about 15 for specs/small.yaml, on 2 cores (QUICK=1: under 3)")
	$(PY) -m builder bench $(if $(SPEC),--spec $(SPEC)) --repository $(OUTPUT) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(QUICK),--quick)

# GPU build server only (NGC container: TRITONSERVER=/opt/tritonserver/bin/tritonserver, pip install -e '.[tensorrt]').
gpu-smoke: $(STAMP)
	$(PY) benchmarks/gpu_smoke.py $(if $(SPEC),--spec $(SPEC))

clean:
	rm -rf $(OUTPUT) .build_cache
