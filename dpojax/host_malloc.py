"""Keep freed host memory for reuse (glibc): XLA:CPU's big per-step buffers otherwise cost page faults every step.

On the CPU backend every executable run allocates its temporaries (at [16, 64] on SmolLM2-135M about 2 GB a step:
the layers' stacked residuals and gradients) with `posix_memalign`. glibc serves an allocation this large with a
fresh `mmap` and returns it with `munmap` when freed, so every page is faulted in again on the next step: ~500k
minor faults and ~1.1 s of kernel time per SmolLM2 step on a 2-core Xeon. XLA's worker threads allocate from
glibc's per-thread arenas, which fall back to `mmap` whatever `M_MMAP_MAX` says; with one arena, no mmapped chunks
and a high trim threshold, freed buffers stay in the heap and the next step reuses them without faults.

`keep_freed_memory()` sets that up. It must run before JAX starts its CPU client (its threads take their arena on
their first allocation), so the CLI calls it before importing the trainer. Applied only where the CPU is the
device (no TPU or GPU device files, or JAX_PLATFORMS=cpu), on glibc; `DPOJAX_HOST_MALLOC=default` turns it off.
The process then keeps its peak heap for its lifetime (XLA's GPU and TPU allocators do the same on device).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 1 << 30  # hand memory back to the OS only when this much is free at the heap's top

_applied: bool | None = None


def cpu_is_the_device() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS asks for cpu only, or no TPU/GPU device file exists."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    return not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*")
                or os.path.exists("/dev/kfd"))


def keep_freed_memory(*, force: bool = False) -> bool:
    """One malloc arena, no mmapped chunks, trim only above 1 GiB (glibc `mallopt`). -> whether it was applied.
    Once per process; `force`: apply whatever the device (benchmarks that run torch and JAX on the CPU)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DPOJAX_HOST_MALLOC", "").lower() == "default" or not (force or cpu_is_the_device()):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # glibc only
            return False
        _applied = bool(libc.mallopt(M_ARENA_MAX, 1) and libc.mallopt(M_MMAP_MAX, 0)
                        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except OSError:
        return False
    return _applied
