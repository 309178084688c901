# The README's two set-up commands: `make demo` and `make test` (what CI runs). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The oldest transformers release the remote code supports; `make test` also runs the model tests on it.
OLDEST_TRANSFORMERS := 4.57.6
COMPAT := .venv-compat

.PHONY: demo test test-main test-compat browser

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) classify.py examples --out results.jsonl --no-resume

test: test-main test-compat

# The demo's browser test drives Debian's chromium (browser downloads fail here). Installing it is
# this explicit step (root and apt-get needed), never a side effect of a test; without it that test skips.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: no chromium (make browser needs root and apt-get); the browser test will skip"

# pytest exits 5 when it collected no test: that fails here too.
test-main: $(VENV)/.installed browser
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

$(COMPAT)/.installed: Makefile requirements-model.txt
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install --quiet torch==2.13.0
	$(COMPAT)/bin/python -m pip install --quiet -r requirements-model.txt transformers==$(OLDEST_TRANSFORMERS) \
		pytest scikit-learn tqdm
	touch $@

# The model, processor, pipeline and conversion tests on the oldest supported transformers.
test-compat: $(COMPAT)/.installed
	HF_HUB_OFFLINE=1 $(COMPAT)/bin/python -m pytest -q tests/test_core.py tests/test_convert.py tests/test_fringe_and_grid.py
