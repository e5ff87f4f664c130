# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both install the exact tested set of packages from constraints.txt (see CONTRIBUTING: moving the pins).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# -qq: pip prints errors only; each step says what it does in one line of its own
PIP := $(BIN)/python -m pip install -qq -c constraints.txt
# `make test-compat TRANSFORMERS=x.y.z`: the tracing and exactness tests with another transformers release
TRANSFORMERS ?= 5.23.0
COMPAT := .venv-transformers-$(TRANSFORMERS)

.PHONY: demo test test-compat lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@echo "[1/4] Python environment: $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[2/4] pip, at the tested version"
	@$(PIP) pip
	@echo "[3/4] torch 2.13.0 (kept if already installed; see README: Installing torch)"
	@$(PIP) torch==2.13.0
	@echo "[4/4] audiolens-ct and its dependencies (Ray too, for its tests), exactly as in constraints.txt (a few minutes the first time)"
	@$(PIP) -e ".[dev,ray]"
	@touch $(STAMP)
	@echo "environment ready: $(VENV)"

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/audiolens-ct demo --out runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

test-compat: $(STAMP)
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q -c constraints.txt pip torch==2.13.0
	grep -v '^transformers==' constraints.txt > $(COMPAT)/constraints.txt
	$(COMPAT)/bin/python -m pip install -q -c $(COMPAT)/constraints.txt -e ".[dev]" transformers==$(TRANSFORMERS)
	HF_HUB_OFFLINE=1 $(COMPAT)/bin/python -m pytest tests/test_tracing.py tests/test_exactness.py

lint: $(STAMP)
	$(BIN)/ruff check audiolens_ct model_ports tests benchmarks

bench: $(STAMP)
	$(BIN)/python -c "import nnsight" 2>/dev/null || $(PIP) -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_tracing.py

clean:
	rm -rf $(VENV) .venv-transformers-* runs
