# Each target creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs diagrams handover cli-handover timeline bench bench-aio bench-shards chaos clean

# Fault tests use libfaketime (clock skew) and nftables (packet loss) from Debian when they can
# be installed (as root, with apt); without them those tests are skipped and say why.
$(STAMP): pyproject.toml
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    ! { command -v faketime && command -v nft; } >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        faketime nftables >/dev/null) || echo "faketime/nftables not installed: those tests will skip"; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m electfsm.cli.demo

test: $(STAMP)
	$(PY) -m ruff check electfsm tests bench examples docs
	$(PY) -m mypy electfsm
	$(SPHINX)
	$(PY) -m pytest -q

# The documentation site in docs/_build/html: warnings are errors (-W), every reference must
# resolve (-n), nothing is fetched (no intersphinx). -E: a fresh environment, so a docstring or
# table changed since the last build cannot hide behind the cache.
SPHINX := $(PY) -m sphinx -b html -W -n -E -q --keep-going docs docs/_build/html

docs: $(STAMP)
	$(SPHINX)

diagrams: $(STAMP)
	$(PY) -m electfsm.diagram diagrams

handover: $(STAMP)
	$(PY) bench/handover.py

cli-handover: $(STAMP)
	$(PY) bench/cli_handover.py

# Where a handover's time goes (a diagnostic: timestamps at each hop of the successor).
timeline: $(STAMP)
	$(PY) bench/timeline.py

# Randomized faults: make chaos SEED=7 MINUTES=30 CANDIDATES=5 (same seed, same schedule).
chaos: $(STAMP)
	$(PY) -m electfsm.chaos --seed $${SEED:-1} --minutes $${MINUTES:-30} \
	    --candidates $${CANDIDATES:-5} --out chaos-$${SEED:-1}

bench: $(STAMP)
	$(PY) bench/run.py

# electfsm.aio: event-loop lag with 100 AsyncElectors, handover through the facade.
bench-aio: $(STAMP)
	$(PY) bench/aio.py

# 1,000 elections on one Session: etcd load, CPU, threads, memory, SIGKILL failover.
bench-shards: $(STAMP)
	$(PY) bench/shards.py

clean:
	rm -rf $(VENV) build docs/_build *.egg-info .pytest_cache .mypy_cache .ruff_cache
