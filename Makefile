# Two commands for a fresh machine with Python 3.11+ and make:
#   make demo   - run the demo bot on the in-memory backend (no server needed)
#   make test   - lint, type-check and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck pytest wheel-check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/python examples/demo.py

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests examples benchmarks typing_tests
	$(BIN)/ruff format --check src tests examples benchmarks typing_tests

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy src typing_tests

pytest: $(VENV)/.test-installed
	$(BIN)/pytest

test: lint typecheck pytest

# What users install: build the wheel, install it in a fresh environment, run the
# demo and the memory-backend contract suite against it (not against src/).
wheel-check: $(VENV)/.test-installed
	rm -rf dist .wheel-venv
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .
	$(PYTHON) -m venv .wheel-venv
	.wheel-venv/bin/python -m pip install --quiet dist/chatstate-*.whl
	cd examples && ../.wheel-venv/bin/python demo.py > /dev/null
	.wheel-venv/bin/python -c "import chatstate, pathlib; assert 'site-packages' in chatstate.__file__"
	.wheel-venv/bin/python -c "import chatstate.testing, sys; assert 'pytest' not in sys.modules"
	.wheel-venv/bin/python -m pip install --quiet \
		"$$(ls dist/chatstate-*.whl)[aiogram,telegram,starlette,prometheus,otel]" pytest hypothesis
	.wheel-venv/bin/python -m pytest -q -p no:cacheprovider tests/test_contract_memory.py tests/test_exports.py

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_flow.py
	$(BIN)/python benchmarks/bench_state.py
	$(BIN)/python benchmarks/bench_state.py --parser python
	$(BIN)/python benchmarks/bench_observe.py

clean:
	rm -rf $(VENV) .wheel-venv dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
