# diffusion_lab: `make train` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train test test-floors lint format bench gpu-check clean

install: $(STAMP)

# ".[dev]": the package, every optional extra (sweep, tensorboard, plot) and what `make test` needs
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# the declared lower bounds of pyproject.toml installed in a fresh venv (torch at its pin), then the unit
# tests: says whether the floors are true (FLOORS_VENV=folder, default /tmp/diffusion_lab-floors)
test-floors:
	bash .ci/floors.sh $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m experiments.bench $(ARGS)

# the GPU path (trainer=gpu, DDP, sampling, FID plumbing) in a few minutes; ARGS="--device cpu --tiny" on a CPU
gpu-check: $(STAMP)
	$(PY) -m experiments.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
