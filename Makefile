# The two set-up commands of the README: `make demo` and `make test` (each installs first).
PY ?= python3
VENV := .venv
# Pinned torch, installed before the package: on CPU-only machines of this project that resolves
# to a local CPU wheel; from PyPI on a Linux GPU box it is the CUDA build. Override for another
# CUDA flavour, e.g. make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
# The engine's image (infra/docker/Dockerfile; needs Docker with BuildKit, the default since 23.0).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= kandinsky-engine:$(VERSION)

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: install demo test bench image
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/kandinsky-batch run configs/demo.yaml --overwrite --report

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q --durations=30

bench: $(VENV)/.installed
	$(VENV)/bin/kandinsky-batch bench --rows 64 --steps 10

image:
	docker build -f infra/docker/Dockerfile -t $(IMAGE) .
