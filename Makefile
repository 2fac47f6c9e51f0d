# Two commands a newcomer needs: `make demo` and `make test`. Both create or reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the bench extra (lightly, pytorch-metric-learning, faiss, PyAV) is installed too: tests compare
	# against those libraries as independent references and smoke-test the benchmark scripts
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/cmgen demo

# --durations: the 25 slowest tests at the end of every run (CI logs show where the time goes)
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/losses.py
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info
