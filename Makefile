# Two commands a new user needs: `make demo` and `make test`. Both set up .venv on first use
# (idempotent, seconds when already done), build the native op, then run. `make page` serves the page
# that tries the demo's trained model.
SYS_PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV       ?= .venv
PYTHON     := $(VENV)/bin/python
STAMP      := $(VENV)/.e2e-vl-installed
# torch is installed first, on its own, because the extension compiles against it.
TORCH_SPEC ?= torch torchvision
PYTEST_ARGS ?= -n 2 --timeout 900 --durations 30

.PHONY: setup build test demo page bench clean gpu-check gpu-wheels FORCE

$(PYTHON):
	$(SYS_PYTHON) -m venv $(VENV)

# The dependencies and the editable install. E2E_VL_SKIP_NATIVE_OP=1: setup.py leaves the native op to
# `build` below, so that a fresh clone compiles it once (pip would compile it in a throw-away folder, and
# `build` a second time).
$(STAMP): setup.py pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --upgrade pip setuptools wheel ninja
	$(PYTHON) -m pip install $(TORCH_SPEC)
	E2E_VL_SKIP_NATIVE_OP=1 $(PYTHON) -m pip install -e '.[test,demo,page]' --no-build-isolation
	touch $@

setup: $(STAMP)

# The native op (detector/_C*.so), compiled again only when its sources or headers, setup.py or the
# installed torch changed, or the library is missing. build/ keeps the objects, so ninja recompiles only
# the files a change touches (it tracks header dependencies itself; --force makes setup.py ask it even
# when no .cpp is newer than the library).
NATIVE_OP       := build/native-op.stamp
NATIVE_OP_DEPS  := setup.py $(shell find detector/csrc -type f 2>/dev/null) \
                   $(wildcard $(VENV)/lib/python*/site-packages/torch/version.py)
$(NATIVE_OP): $(NATIVE_OP_DEPS) $(if $(wildcard detector/_C*.so),,FORCE) | $(STAMP)
	$(PYTHON) setup.py -q build_ext --inplace --force
	mkdir -p $(@D) && touch $@

build: $(NATIVE_OP)

FORCE:

# Debian's Chromium, which the page's test (tests/test_page.py) drives headless; installed once (as root).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update
	apt-get install -y --no-install-recommends chromium chromium-driver

test: build | $(CHROMIUM)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest $(PYTEST_ARGS) tests

# Stage 1 (the detector's stand-in pre-training, 7-10 minutes on 2 cores) once, again when its configs or
# its data (the labels read off the questions) change; then the embedded default.
DEMO_DETECTOR := output/easy_vqa/detector.pth
$(DEMO_DETECTOR): configs/easy_vqa/detector.yaml configs/easy_vqa/base.yaml e2e_vl/data/easy_vqa.py
	$(MAKE) build
	$(PYTHON) tools/train_net.py --config-file configs/easy_vqa/detector.yaml
	$(PYTHON) tools/export_detector.py --checkpoint output/easy_vqa/detector --output $@ --overwrite

demo: build $(DEMO_DETECTOR)
	$(PYTHON) tools/train_net.py

# The page to try the demo's run (or RUN=folder) in a browser, on http://127.0.0.1:$(PORT).
PORT ?= 7860
page: build
	$(PYTHON) tools/serve_page.py $(RUN) --port $(PORT)

# The speed tables and the pre-training probe. The learning tables (demo_seeds.py, architectures.py) train
# dozens of full runs (hours on 2 cores): run them on purpose, with the commands in their docstrings.
BENCHMARKS ?= roi_align detector_speed extract train_step pretrain_probe
bench: build $(DEMO_DETECTOR)  # pretrain_probe.py reads the demo's stage-1 detector
	for b in $(BENCHMARKS); do $(PYTHON) benchmarks/$$b.py || exit 1; done

# The GPU check (README, "GPUs"): on a lent CUDA machine, with the python that is there (no .venv, torch
# untouched): builds the extension, runs the CUDA tests, sanitizers, benchmarks and the demo, and writes
# $(OUT)/gpu_report.md. DEVICE=cpu is its dry run (tiny sizes); STEPS=demo,ddp runs only those checks.
OUT ?= output/gpu_check
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PYTHON)),$(PYTHON),python3)
gpu-check:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py --out $(OUT) $(if $(DEVICE),--device $(DEVICE)) $(if $(STEPS),--steps $(STEPS)) $(GPU_CHECK_ARGS)

# The wheels the GPU image lacks (Python 3.12, manylinux x86-64) into .whl/, to carry there.
gpu-wheels: setup
	$(PYTHON) tools/gpu_wheels.py download --dest .whl

clean:
	rm -rf build detector/_C*.so *.egg-info
