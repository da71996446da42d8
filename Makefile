# The two commands of the README: `make demo` (see mail flow, nothing else needed) and
# `make test` (the whole suite). Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench system-deps check-wheel clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mailworker demo

# Postfix's smtp-sink and redis-server are real servers the integration tests run.
system-deps:
	@./scripts/system-deps

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

# The wheel as a user gets it: `pip install 'mailworker[demo]' && mailworker demo` in a
# fresh virtualenv (scripts/check-wheel says what it checks).
check-wheel: $(STAMP)
	PYTHON=$(BIN)/python ./scripts/check-wheel

lint: $(STAMP)
	$(BIN)/ruff check mailworker tests benchmarks
	$(BIN)/mypy

bench: $(STAMP) system-deps
	$(BIN)/python benchmarks/bench_smtp.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
