# The two commands a newcomer needs: `make up` and `make test`. Both build the virtualenv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up demo lint test bench soak chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "tally needs Python 3.11+")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

## Start the whole platform on the embedded stack (PostgreSQL, tansu, chDB). ARGS=--demo adds traffic.
up: $(STAMP)
	$(BIN)/tally up $(ARGS)

demo: $(STAMP)
	$(BIN)/tally up --demo

## Lint and types (configured in pyproject.toml): ruff over the tree, mypy over the product packages.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

## Run every test against the real embedded servers (and Debian's chromium for the dashboard), TEST_WORKERS
## modules at a time, each worker with servers of its own (docs/adr/0042-test-layout.md); TEST_WORKERS=0: serial.
## ruff first (a second); mypy alongside the tests (its 11 s on one core while the suite starts), and a mypy
## finding fails `make test` like a failing test. Bytecode is cached even where PYTHONDONTWRITEBYTECODE is
## set: the suite starts hundreds of Python processes, and every worker rewrites every test module's asserts.
TEST_WORKERS ?= 4
test: $(STAMP)
	./scripts/ensure-chromium
	$(BIN)/ruff check .
	@types=$$(mktemp); $(BIN)/mypy >$$types 2>&1 & mypy=$$!; \
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); tests=$$?; \
	wait $$mypy; typed=$$?; echo "mypy: $$(tail -n 1 $$types)"; [ $$typed -eq 0 ] || cat $$types; rm -f $$types; \
	[ $$tests -eq 0 ] && [ $$typed -eq 0 ]

## Kill and restart processes under load for 10 minutes; compare both stores with what was acknowledged.
chaos: $(STAMP)
	$(BIN)/tally chaos --minutes 10 $(ARGS)

## Benchmarks (never part of the tests): floors and stage ratios. ARGS=--quick for a short run.
bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.run $(ARGS)
	$(BIN)/python -m bench.collector $(ARGS)
	$(BIN)/python -m bench.isolation $(ARGS)
	$(BIN)/python -m bench.queries $(ARGS)
	$(BIN)/python -m bench.analyst $(ARGS)

## Capacity and soak (issue 19): the highest steady rate both stores keep up with, then MINUTES at half of it;
## bench/results/soak.md + soak.png (30 minutes; MINUTES=N). ARGS=--quick: a few minutes; ARGS="--rate 8000" skips
## the search; ARGS=--find-capacity-only stops after it.
soak: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/python -m bench.soak $(if $(MINUTES),--minutes $(MINUTES)) $(ARGS)

clean:
	rm -rf $(VENV) .tally .pytest_cache
