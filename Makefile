# Two entry points, each self-installing on a fresh machine:
#   make demo   end-to-end run on generated images (tokenize, train tiny, sample)
#   make test   the whole test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from the local wheel; on GPU clusters install the CUDA build first.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m star_scale.cli demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf demo_out runs .pytest_cache
