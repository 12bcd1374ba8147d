# The two set-up commands of the README: `make demo` and `make test` (each installs first).
PY ?= python3
VENV := .venv
# Pinned torch, installed before the package: on CPU-only machines of this project that resolves
# to a local CPU wheel; from PyPI on a Linux GPU box it is the CUDA build. Override for another
# CUDA flavour, e.g. make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: install demo test bench
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/kandinsky-batch run configs/demo.yaml --overwrite

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

bench: $(VENV)/.installed
	$(VENV)/bin/kandinsky-batch bench --rows 64 --steps 10
