# Two commands: `make demo` and `make test`. Both create .venv and install the pinned dependencies.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean wheel-check

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (polyquant needs Python 3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade "pip>=23" "setuptools>=77,<85" wheel
	$(PY) -m pip install -qq -c constraints.txt -e ".[all,test]"  # -qq: errors only (setuptools prints notes on every editable install)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/polyquant demo

# Two pytest-xdist workers (a test file stays on one worker, so its module fixtures are built once); every test
# runs with one torch thread (tests/conftest.py), so the two workers fit two cores.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build dist *.egg-info
