# `make demo` and `make test` each work from a fresh clone: they create .venv, install, and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test install install-test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test,tpu]'  # tpu: libtpu, so tests/test_aot*.py compile for TPU topologies
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/dpojax train configs/demo.yaml

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed-test
	$(PY) benchmarks/cpu_vs_trl.py

clean:
	rm -rf runs .pytest_cache
