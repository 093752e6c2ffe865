"""Who tokenizes a data set's chunks: this thread, threads of this process, or spawned processes.

Threads first: the fast tokenizer encodes without holding the GIL (`encode_batch_fast` releases it), so one
thread's encoding runs beside another's Python (template rendering, ids to arrays), and a thread costs nothing to
start. The Python part (~17% of the CPU per row for UltraFeedback-shaped chat pairs, ~38% for short ones) still
runs one thread at a time, so with more than THREAD_WORKERS workers and from PARALLEL_MIN_ROWS rows on, spawned
processes tokenize instead: they scale past the Python share, but each costs 1-3 CPU-s to start (imports, the
tokenizer, and the main module, which a spawned process imports again).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
from collections.abc import Iterator

THREAD_WORKERS = 2  # tokenizer threads of one process; more workers are processes (from PARALLEL_MIN_ROWS rows)
PARALLEL_MIN_ROWS = 32768  # fewer rows are never given to processes


def default_num_proc() -> int:
    """Tokenizer workers: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_plan(num_proc: int | None, n_rows: int, chunk_rows: int) -> tuple[int, bool]:
    """(workers, whether they are processes) for n_rows rows in chunks of chunk_rows (`num_proc` None: one per
    CPU); 0 workers: this thread alone (one worker, or one chunk)."""
    num_proc = default_num_proc() if num_proc is None else max(1, num_proc)
    if num_proc == 1 or n_rows <= chunk_rows:
        return 0, False
    if num_proc <= THREAD_WORKERS or n_rows < PARALLEL_MIN_ROWS:
        return min(num_proc, THREAD_WORKERS), False
    return num_proc, True


@contextlib.contextmanager
def pool(workers: int, processes: bool) -> Iterator[concurrent.futures.Executor | None]:
    """`worker_plan`'s workers: None (this thread), threads, or spawned processes (safe after JAX has started
    threads; a process's tokenizer runs on one thread: the processes are the parallelism)."""
    if not workers:
        yield None
    elif not processes:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dpojax-tokenize") as threads:
            yield threads
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker_start) as procs:
            yield procs


def worker_start() -> None:
    """A worker process's tokenizer runs on one thread: the processes are the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
