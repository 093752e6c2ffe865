"""dpojax.host_malloc: when the CLI keeps freed host memory (CPU device only; opt-out by env). The effect itself
(no page faults per step) is a benchmark figure, not a test."""

from __future__ import annotations

from dpojax import host_malloc


def test_applies_only_where_the_cpu_is_the_device(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.cpu_is_the_device()
    for platforms in ("tpu", "cuda", "cpu,tpu"):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert not host_malloc.cpu_is_the_device()


def test_opt_out_and_only_from_the_real_command_line(monkeypatch):
    monkeypatch.setattr(host_malloc, "_applied", None)
    monkeypatch.setenv("DPOJAX_HOST_MALLOC", "default")
    assert host_malloc.keep_freed_memory(force=True) is False
