# Quickstart targets. Each sets up what it needs on a fresh machine (Python 3.11 + pip).
#   make demo   create .venv, install, generate the demo corpus, preprocess it, train on a local Ray
#   make test   create .venv, install, run the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := runs/demo

.PHONY: demo test install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3 ...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/msa-prep demo --output $(DEMO)/shards --documents 3000 --max-chars 2000
	$(VENV)/bin/msa-prep demo --output $(DEMO)/heldout --documents 300 --max-chars 2000 --seed 1 --vocab-size 0
	$(VENV)/bin/msa-train --config configs/tiny.toml

# The unit tests run in two processes (they start no Ray); the end-to-end ones (`slow`: each starts
# its own Ray and uses both cores) one at a time. `--dist worksteal`: an idle worker takes queued tests
# from the busy one (the default `load` hands out runs of neighbouring tests, and one worker was left
# with most of the Triton-interpreter KL tests for minutes while the other sat idle).
test: install
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests
	$(PY) -m pytest -q -m slow tests

clean-demo:
	rm -rf $(DEMO)
