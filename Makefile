# The two set-up commands of the README: `make demo` and `make test` (each installs first).
PY ?= python3
VENV := .venv
# Pinned torch, installed before the package. The one supported CUDA build (infra/README.md, "CUDA
# and drivers"): cu128, driver >= 570, as in the image. Where nvidia-smi is found it comes from
# PyTorch's cu128 index (PyPI's default build would be CUDA 13, needing driver >= 580); elsewhere
# plain torch==2.13.0, which on this project's CPU machines resolves to a local CPU wheel.
CUDA := cu128
GPU := $(shell command -v nvidia-smi 2>/dev/null)
TORCH ?= torch==2.13.0$(if $(GPU), --index-url https://download.pytorch.org/whl/$(CUDA))
# The engine's image (infra/docker/Dockerfile; needs Docker with BuildKit, the default since 23.0).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= kandinsky-engine:$(VERSION)

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: install demo check test fuzz bench image
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/kandinsky-batch run configs/demo.yaml --overwrite --report

# The quick check (a few minutes): every test that starts no Ray, and one end-to-end job.
check: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "(not ray and not slow and not gpu) or smoke" --durations=15

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q --durations=30

# The randomized resume state machine with a long budget (CI plays a few short sequences);
# FUZZ_SEED=<the printed seed> replays a sequence.
FUZZ_EXAMPLES ?= 25
FUZZ_STEPS ?= 10
fuzz: $(VENV)/.installed
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_STEPS=$(FUZZ_STEPS) $(VENV)/bin/python -m pytest -q -s tests/test_resume_random.py

bench: $(VENV)/.installed
	$(VENV)/bin/kandinsky-batch bench --rows 64 --steps 10

image:
	docker build -f infra/docker/Dockerfile -t $(IMAGE) .
