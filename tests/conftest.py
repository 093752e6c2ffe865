"""Test session set-up: 8 fake CPU devices (set before jax is imported anywhere), fp32 matmuls."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Compile the tiny test models with XLA's CPU backend optimizations off: most of a test's time is compiling, and these
# flags cut it by about a third; results move in the last bits only (each comparison runs both sides under the same
# flags, or has a tolerance). Subprocesses inherit them (tests that set XLA_FLAGS keep them: tiny_models.xla_flags).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
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

# The slowest modules, slowest first (`--durations` of the parallel pass): they are collected first so that the xdist
# workers (`--dist loadfile --no-loadscope-reorder`) start them first and end together, the light modules filling in.
SLOWEST_FIRST = ("test_aot_compile.py", "test_gcs.py", "test_resume.py", "test_online.py", "test_multihost.py",
                 "test_sharding.py", "test_lora.py", "test_tracking.py", "test_moe_train.py", "test_moe_models.py",
                 "test_expert_parallel.py", "test_gpt_oss.py", "test_score.py", "test_examples.py",
                 "test_reference.py", "test_packing.py", "test_throughput.py", "test_trl_parity.py",
                 "test_ranking_learning.py", "test_host_overhead.py", "test_api_transforms.py", "test_ranking_step.py")


def pytest_collection_modifyitems(config, items):
    """The modules of SLOWEST_FIRST come first, in that order, the others after in their usual order. (Tests marked
    `serial` run alone after the parallel pool: `make test`.)"""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
