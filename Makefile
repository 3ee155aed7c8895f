# make test: what CI runs. make demo: the bundled CIFAR-10 demo. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q test_hald.py

demo: $(VENV)/installed
	$(PY) hald.py

clean:
	rm -rf runs .pytest_cache .hypothesis __pycache__
