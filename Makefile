# fpm: `make demo` and `make test` work on a fresh machine (they create .venv and install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The C++ ops (fpm's CPU kernels, DeepSpeed's CPU Adam) are built at install into the environment's
# own folder ($(VENV)/torch_extensions; fpm/cpu/build.py), so that no run compiles.
export HF_HUB_OFFLINE ?= 1
PYTEST_ARGS ?=

.PHONY: install install-bench demo test test-fast test-system bench clean

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -m fpm.cpu.prebuild   # fpm's and DeepSpeed's C++ ops, built side by side (~40 s once)
	touch $@

install: $(VENV)/.installed

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

install-bench: $(VENV)/.bench

# the benchmarks read ../shared/data; results and commands are in bench/RESULTS.md
bench: install-bench
	$(BIN)/python bench/data_prepare.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/finetune_real.py

# the paper's depth study at tiny scale: 3 depths x 2 seeds, synthetic data, offline
demo: install
	$(BIN)/fpm sweep-depth bert-e-depth --preset tiny --out runs/demo-sweep

# the test tiers (tests/conftest.py): unit + cli (the logic), + e2e (tiny trainings), system (CI).
# make test and test-fast spread the tests over the cores (pytest-xdist, work-stealing); the system tier one test at a
# time (its torchrun matrices, SLURM cluster and timing checks use every core themselves).
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
XDIST := -n $(TEST_WORKERS) --dist worksteal

test: install
	$(BIN)/python -m pytest -m "not system" $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "unit or cli" $(XDIST) $(PYTEST_ARGS)

test-system: install
	$(BIN)/python -m pytest -m system $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .torch_extensions
