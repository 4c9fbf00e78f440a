# Each target creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test diagrams handover bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m electfsm.demo

test: $(STAMP)
	$(PY) -m ruff check electfsm tests bench
	$(PY) -m mypy electfsm
	$(PY) -m pytest -q

diagrams: $(STAMP)
	$(PY) -m electfsm.diagram diagrams

handover: $(STAMP)
	$(PY) bench/handover.py

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
