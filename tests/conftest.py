"""Test session set-up: 8 fake CPU devices (set before jax is imported anywhere), fp32 matmuls."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One persistent compilation cache for the session's processes (xdist workers, the serial pass, the CLI subprocesses
# they start): the same tiny model compiles the same step in many tests. Entries are keyed by the program, the
# compile options and the JAX version, so a stale entry is never read. Compiles for TPU topologies (dpojax compile)
# keep out of it: their compile-only client cannot load an entry back (`dpojax.aot.compile_uncached`).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"dpojax-tests-jax-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402 - after the sys.path or environment set-up above

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402 - after the sys.path or environment set-up above

SERIAL_MODULES = {"test_multihost.py", "test_resume.py"}  # subprocesses whose timing a busy neighbour would skew


def pytest_collection_modifyitems(config, items):
    """Tests of SERIAL_MODULES are `serial`: `make test` runs them alone after the parallel pool."""
    for item in items:
        if item.path.name in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)
