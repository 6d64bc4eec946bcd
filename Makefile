# Two commands on a fresh machine: `make serve` and `make test`. Each sets up what it needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

MODEL_CONFIGS := $(wildcard configs/*.yaml)

.PHONY: serve test lint format bench models container-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Serving needs no torch: the base install is enough.
$(VENV)/.serve-installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	@touch $@

# Tests train small models, so they need the training stack too (the `train` extra: torch, onnx, optuna, ...).
$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install -e '.[train,dev]'
	@touch $@ $(VENV)/.serve-installed

serve: $(VENV)/.serve-installed
	$(BIN)/modelserve serve

test: $(VENV)/.dev-installed
	$(BIN)/pytest -m "not container" tests

lint: $(VENV)/.dev-installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(VENV)/.dev-installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Side-by-side benchmark (bench/README.md); `make bench BENCH_ARGS=--quick` for a ~2-minute smoke run.
bench: $(VENV)/.dev-installed
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y wrk; } || { \
		echo "make bench needs wrk (Debian package wrk): apt-get install -y wrk" >&2; exit 1; }
	$(PY) -m bench.compare $(BENCH_ARGS)

# Retrain every shipped model from its committed config.
models: $(VENV)/.dev-installed
	@for cfg in $(MODEL_CONFIGS); do \
		echo "== $$cfg"; \
		$(BIN)/modeltrain fit $$cfg --output models --replace --threads 1 || exit 1; \
	done

container-test: $(VENV)/.dev-installed
	$(BIN)/pytest -m container tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
