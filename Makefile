# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) classify.py examples --out results.jsonl

# pytest exits 5 when it collected no test: that fails here too.
test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests
