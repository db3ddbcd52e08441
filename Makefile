# microseg — `make demo`, `make test` and `make bench` do all set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH  ?= full

.PHONY: all setup lock demo test lint bench clean

all: test

setup:
	@scripts/setup.sh

# Pin every Python dependency afresh in requirements.lock (then make test,
# and commit it): the only way newer libraries reach `make setup`.
lock: setup
	@scripts/lock.sh

# The lab a newcomer sees first: workloads, traffic, the daemon and `top`.
# DEMO_ARGS=--duration 20 runs it without the TUI and prints a summary.
DEMO_ARGS ?=
demo: setup
	@$(PY) -m microseg demo $(DEMO_ARGS)

# pytest's exit code 5 means "no tests collected": never a silent pass.
test: setup
	@$(VENV)/bin/ruff check microseg tui exporters tests bench grafana
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

lint: setup
	$(VENV)/bin/ruff check microseg tui exporters tests bench grafana

bench: setup
	$(PY) -m bench --mode $(BENCH)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
