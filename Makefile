# Two commands on a fresh machine: `make engines` (build model_repository/), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SPEC ?= specs/tiny.yaml
OUTPUT ?= model_repository
TARGET ?=
BUILD_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: help setup engines test serve clean

help:
	@echo "make engines   build $(SPEC) into $(OUTPUT)/ (installs what it needs into $(VENV)/)"
	@echo "make test      run the test suite (builds first if needed)"
	@echo "make serve     run tritonserver on $(OUTPUT)/ at 127.0.0.1:8001 (gRPC) / :8000 (HTTP)"
	@echo "variables: SPEC=specs/<name>.yaml TARGET=python|onnxruntime|tensorrt BUILD_ARGS='--set key=value'"

setup: $(STAMP)

# torch first, pinned: it resolves to the CPU build on disk instead of downloading a CUDA one.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

engines: $(STAMP)
	$(PY) -m builder build --spec $(SPEC) --output $(OUTPUT) $(if $(TARGET),--target $(TARGET)) $(BUILD_ARGS)

test: engines
	$(PY) -m pytest -q tests

serve: engines
	$(PY) -m builder serve --repository $(OUTPUT)

clean:
	rm -rf $(OUTPUT) .build_cache
