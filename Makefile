# Set-up and the two everyday commands. TORCH pins the CPU wheel that this project's machines
# keep on disk; on a GPU machine pass e.g. `make train TORCH=torch` for the CUDA build.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: train test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/egrpo train

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/engine_overhead.py
