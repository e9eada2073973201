# gpuboss: `make demo` runs the demo, `make test` runs lint and the tests. Both set up .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format mypy unit gpu-check bench bench-smoke bench-ir chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gpuboss demo

lint: $(STAMP)
	$(BIN)/ruff check gpuboss tests bench examples
	$(BIN)/ruff format --check gpuboss tests bench examples
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix gpuboss tests bench examples
	$(BIN)/ruff format gpuboss tests bench examples

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint unit

# On a machine with an NVIDIA GPU (and torch with CUDA for the allocations): the inventory against the real
# card. Elsewhere the tests skip and the example says "no NVML".
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -q -s -rs tests/test_real_gpu.py
	$(BIN)/python examples/gpu_check.py --strict --alloc-gb 4

bench: $(STAMP)
	$(BIN)/python -m bench

bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke

bench-ir: $(STAMP)
	$(BIN)/python -m bench.instructions

# About 3 minutes of faults against a private redis-server; CHAOS_ARGS="--duration 30 --json" to change it.
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
