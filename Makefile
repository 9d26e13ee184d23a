# fastdd set-up, demo and tests. On a fresh machine:
#   make demo   -> creates .venv, installs everything, distils Fashion-MNIST with DM and evaluates it
#   make test   -> creates .venv, installs everything, runs the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed before anything else: the local CPU wheel unless a CUDA torch is already importable
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
DEMO_ARGS ?= --ipc 1 --iterations 300 --batch-real 32 --seed 0
EVAL_ARGS ?= --models 3 --epochs 300 --seed 0
PYTEST_ARGS ?=

.PHONY: install demo test bench clean dataset

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*/*.cpp csrc/*.cpp csrc/*/*.cu)
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "using the CUDA torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip && \
		$(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q "setuptools>=64" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,theory]"
	@$(MAKE) --no-print-directory dataset
	@touch $@

install: $(VENV)/.installed

# Debian's dataset-fashion-mnist puts the real Fashion-MNIST in /usr/share/datasets/fashion-mnist
dataset:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
		echo "warning: could not install dataset-fashion-mnist; the demo will use scikit-learn's digits"; \
	else echo "note: not Debian/root: install Fashion-MNIST yourself or set FASTDD_DATA"; fi

demo: install
	@ds=$$($(PY) -c "from fastdd.data import load_dataset, DatasetNotFoundError as E;\
	exec('try: load_dataset(\"fashion-mnist\"); print(\"fashion-mnist\")\nexcept E: print(\"digits\")')"); \
	echo "== distilling $$ds with DM"; \
	$(VENV)/bin/fastdd distill --method dm --dataset $$ds $(DEMO_ARGS) --out $(DEMO_OUT) --force && \
	echo "== evaluating" && \
	$(VENV)/bin/fastdd evaluate $(DEMO_OUT) $(EVAL_ARGS)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# end-to-end benchmarks (reference-structure loop vs fastdd); `make bench BENCH_ARGS=--quick` for a short run
BENCH_ARGS ?=
bench: install
	$(PY) benchmarks/dm_iteration.py $(BENCH_ARGS)
	$(PY) benchmarks/evaluate.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info fastdd/_C*.so runs
