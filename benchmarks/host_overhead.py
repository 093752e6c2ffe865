"""Host overhead of the training loop: the host's own work per step (building and packing the batch, counting its
tokens and FLOPs, sending it, dispatching the step, reading metrics back, logging, checkpoint bookkeeping) against
the step's device time, on a model whose CPU step takes a few ms (as GPU and TPU steps do). Target: under 10%.

    python -m benchmarks.host_overhead                          # the `host` preset: 2 layers, d 32, T 32, 4 pairs
    python -m benchmarks.host_overhead --repeats 5 --json out.json   # medians over 5 runs
    python -m benchmarks.host_overhead --prefetch 0             # batches built in the loop thread (no producer)
    python -m benchmarks.host_overhead --batch 16                # a ~15 ms CPU step
    python -m benchmarks.host_overhead --set train.steps_per_dispatch=10   # 10 steps per dispatch
    python -m benchmarks.host_overhead --device-cores 1          # the device on one core, the host on the rest

It runs `dpojax train` itself (`dpojax.trainer.loop.train`) with the loop's phases timed by wrappers: the batch
producer (`prefetch.ready_batches`: build, pack, count, send to the devices; in the producer thread, wall and thread
CPU time), the loop thread's take of a ready batch (`prefetch.Prefetch.__next__`: a wait for the producer), the step
call (dispatch), `window.wait` (the loop's wait for a step without reading it) and `window.fetch` (the loop's one
read of device values), whose wait for the device is timed apart from the copy. Figures:
  - loop-thread host work per step = the loop's wall time per step minus its waits for the device, against the
    step's device time ("host share"; the producer thread's work runs beside it and is reported apart);
  - the same as the loop thread's own CPU time (`time.thread_time`) per step minus the CPU time of its waits: on a
    machine whose cores the device's compute threads keep busy (a CPU "device" on 2 cores), the wall figure also
    counts the time the loop thread was preempted by them; a GPU/TPU host has cores to spare, and there the CPU
    figure is the closer one. Both are reported; the target applies to each;
  - loop slowdown = the loop's mean wall time per step against the same compiled step run back to back on batches
    already on the devices, with the run's final state: what a user sees of all host work, the producer's too
    (the median step is shown too: it leaves out the log, eval and checkpoint steps).
Means over the steps after --skip (compilation) and before the last, log steps included; with --repeats, the
median over runs of each figure. With train.steps_per_dispatch = K the phases are timed per dispatch and divided
by its K steps (--skip counts dispatches).

`--device-cores N` gives the CPU device N of the machine's cores and the host the others, as a GPU or TPU host's
devices leave its cores to it: XLA's CPU client starts with only the device cores allowed (its compute threads are
made there and stay there), then the loop thread moves to the others, and the batch producer it starts follows it.
Without it (the default) the device's compute threads and the host's threads share every core, which on a 2-core
machine counts, in the host's figures, the time and cache the compute takes from them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness, throughput  # noqa: E402 - after the sys.path or environment set-up above
from dpojax.trainer import loop, prefetch, window  # noqa: E402 - after the environment set-up above


class LoopClock:
    """Seconds per loop phase per step (a step runs from its dispatch to the next one's), wall and loop-thread CPU,
    by wrapping the loop's phase functions; `install` patches them, `uninstall` restores them."""

    def __init__(self):
        self.starts: list[tuple[float, float]] = []  # (perf_counter, thread_time) at each dispatch
        self.sizes: list[int] = []  # steps in each dispatch (train.steps_per_dispatch > 1: K at once)
        self.phases: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # wall
        self.cpu: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # loop-thread CPU
        self.produce: list[tuple[float, float]] = []  # (wall, thread CPU) seconds of each batch in the producer
        self.run = self.state = None  # the run and its latest state leaves (to time the step)
        self.fns: dict[int, object] = {}  # its compiled step by steps per dispatch: 1 `flat`, K `many`
        self.batches: list = []  # (device batch, its steps) of the run's last dispatches, for the same
        self._saved: dict = {}

    def _add(self, phase: str, t0: tuple[float, float], t1: tuple[float, float]) -> None:
        self.phases[phase][len(self.starts)] += t1[0] - t0[0]
        self.cpu[phase][len(self.starts)] += t1[1] - t0[1]

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    @staticmethod
    def _patched() -> list[tuple[object, str]]:
        """(module, name) of each function the clock wraps, in `install`'s order."""
        return [(prefetch, "ready_batches"), (prefetch, "Prefetch"), (window, "fetch"), (window, "wait"),
                (loop, "setup_train")]

    def install(self) -> None:
        self._saved = {(module, name): getattr(module, name) for module, name in self._patched()}
        ready_batches, prefetcher, fetch, wait, setup_train = self._saved.values()
        clock, now = self, self.now

        def timed_batches(*args, **kw):  # runs in the producer thread (or in the loop thread with --prefetch 0)
            it = ready_batches(*args, **kw)
            while True:
                t0, c0 = time.perf_counter(), time.thread_time()
                item = next(it, None)
                self.produce.append((time.perf_counter() - t0, time.thread_time() - c0))
                if item is None:
                    return
                self.batches = (self.batches + [(item.batch, item.steps)])[-8:]
                yield item

        class TimedPrefetch(prefetcher):
            def __next__(self):
                t0 = now()
                try:
                    return super().__next__()
                finally:
                    clock._add("take", t0, now())

        def timed_fetch(tree):
            import jax

            t0 = now()
            jax.block_until_ready(tree)
            t1 = now()
            out = fetch(tree)
            self._add("wait", t0, t1)
            self._add("read-back", t1, now())
            return out

        def timed_wait(tree):
            t0 = now()
            try:
                return wait(tree)
            finally:
                self._add("wait", t0, now())

        def timed_setup(*args, **kw):
            run, state = setup_train(*args, **kw)

            def timed(fn, size):  # what the loop calls: the step(s) over the state's flat leaves
                def dispatch(*a):
                    t0 = now()
                    self.starts.append(t0)
                    self.sizes.append(size(a[2]))
                    self.state, out = fn(*a)
                    self._add("dispatch", t0, now())
                    return self.state, out

                return dispatch

            import jax

            self.run, self.fns = run, {1: run.train_step.flat}
            if run.cfg.train.steps_per_dispatch > 1:
                self.fns[run.cfg.train.steps_per_dispatch] = run.train_step.many
            run.train_step.flat = timed(run.train_step.flat, lambda batch: 1)
            run.train_step.many = timed(run.train_step.many, lambda batch: jax.tree.leaves(batch)[0].shape[0])
            return run, state

        for (module, name), fn in zip(self._patched(), (timed_batches, TimedPrefetch, timed_fetch, timed_wait,
                                                         timed_setup)):
            setattr(module, name, fn)

    def uninstall(self) -> None:
        for (module, name), fn in self._saved.items():
            setattr(module, name, fn)

    def per_step(self, skip: int, inline: bool) -> dict[str, float]:
        """Mean seconds per step of each phase, the wall time and the host time (wall, and loop-thread CPU as
        `cpu_*`), over dispatches skip+1 .. last-1 (a dispatch of K steps counts K steps)."""
        spans = range(skip + 1, len(self.starts))  # dispatch i (1-based) runs from starts[i-1] to starts[i]
        n = sum(self.sizes[i - 1] for i in spans)  # steps in them
        wall = [(self.starts[i][0] - self.starts[i - 1][0]) / self.sizes[i - 1] for i in spans]  # per step
        cpu = sum(self.starts[i][1] - self.starts[i - 1][1] for i in spans) / n
        out = {name: sum(c[i] for i in spans) / n for name, c in self.phases.items()}
        out |= {f"cpu_{name}": sum(c[i] for i in spans) / n for name, c in self.cpu.items()}
        out["wall"] = sum(self.starts[i][0] - self.starts[i - 1][0] for i in spans) / n
        out["wall_median"] = statistics.median(wall)
        out["host"] = out["wall"] - out.get("wait", 0.0)
        out["cpu_host"] = cpu - out.get("cpu_wait", 0.0)
        produced = self.produce[skip + 1 : len(self.starts)]
        out["produce_wall"] = sum(w for w, _ in produced) / n
        out["produce_cpu"] = sum(c for _, c in produced) / n
        if inline:  # the loop thread built the batches itself: that is its "take"
            out["take"], out["cpu_take"] = out["produce_wall"], out["produce_cpu"]
        for prefix in ("", "cpu_"):
            out[prefix + "other"] = out[prefix + "host"] - sum(
                out.get(prefix + k, 0.0) for k in ("take", "dispatch", "read-back"))
        return out

    def python_calls_per_dispatch(self, calls: int = 3) -> float:
        """Python functions run during one call of the compiled step (0: jax's C++ dispatch path, no Python
        fallback), counted with `sys.setprofile` over `calls` calls."""
        import jax

        seen, ref, state = [0], jax.tree.leaves(self.run.models.ref_params), self.state
        batch, size = self.batches[-1]

        def profile(frame, event, arg):
            seen[0] += event == "call"

        for _ in range(calls):
            sys.setprofile(profile)
            try:
                state, out = self.fns[size](state, ref, batch)
            finally:
                sys.setprofile(None)
        self.state = jax.block_until_ready(state)
        return seen[0] / calls

    def device_step(self, repeats: int = 5, steps: int = 20) -> float:
        """Seconds per step of the run's compiled step, dispatched back to back on its last batches from its final
        state (no host work between the steps): the median of `repeats` timings of `steps` steps."""
        import jax

        state, ref = self.state, jax.tree.leaves(self.run.models.ref_params)
        size = max(size for _, size in self.batches)  # the run's usual dispatch: K steps (or 1)
        batches = [batch for batch, n in self.batches if n == size]
        fn = self.fns[size]
        for batch in batches[:2]:  # warm
            state, out = fn(state, ref, batch)
        jax.block_until_ready(state)
        times, calls = [], -(-steps // size)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(calls):
                state, out = fn(state, ref, batches[i % len(batches)])
            jax.block_until_ready((state, out))
            times.append((time.perf_counter() - t0) / (calls * size))
        return statistics.median(times)


def measure(args) -> dict:
    import jax

    clock = LoopClock()
    saved_prefetch, prefetch.PREFETCH = prefetch.PREFETCH, args.prefetch
    with tempfile.TemporaryDirectory() as tmp:
        ns = argparse.Namespace(max_length=args.max_length, batch=args.batch, warmup=0, steps=args.steps, dtype=None,
                                attention=None, remat=None, micro_batch=None,
                                set=[f"train.log_every={args.log_every}", *args.set])
        cfg = throughput.preset_config(args.preset, ns, Path(tmp), jax.device_count())
        clock.install()
        try:
            loop.train(cfg)
        finally:
            clock.uninstall()
            prefetch.PREFETCH = saved_prefetch
        py_calls = clock.python_calls_per_dispatch()
        step_s = clock.device_step()
    r = clock.per_step(args.skip, inline=args.prefetch == 0)
    return {"machine": harness.machine(), "backend": jax.default_backend(), "devices": jax.device_count(),
            "preset": args.preset, "batch": cfg.train.batch_size, "max_length": cfg.data.max_length,
            "steps": args.steps, "log_every": args.log_every, "overrides": args.set,
            "prefetch": args.prefetch, "packing": clock.run.spec.packing, "step_ms": step_s * 1e3,
            "python_calls_per_dispatch": py_calls,
            **{f"{k}_ms": v * 1e3 for k, v in r.items()}, "host_share": r["host"] / step_s,
            "cpu_host_share": r["cpu_host"] / step_s,
            "slowdown": r["wall"] / step_s - 1.0, "slowdown_median": r["wall_median"] / step_s - 1.0}


def median_of(runs: list[dict]) -> dict:
    """Each number's median over runs (the other fields from the first)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def report(r: dict) -> str:
    ms = lambda key: f"{r.get(key + '_ms', 0.0):8.3f} ms"
    both = lambda key: f"{ms(key)} {ms('cpu_' + key)}"
    producer = "producer thread" if r["prefetch"] else "loop thread, inline"
    return "\n".join([
        f"host overhead: preset {r['preset']} ({r['batch']} pairs, T {r['max_length']}), {r['steps']} steps, "
        f"log_every {r['log_every']}, packing {r['packing']}, "
        f"prefetch {r['prefetch']}{', ' + ' '.join(r['overrides']) if r['overrides'] else ''}; {r['devices']} "
        f"{r['backend']} device(s); median of {r.get('repeats', 1)} run(s)  [{r['machine']}]; {r['cores']}",
        f"step (device, back to back)        {ms('step')}",
        f"loop wall per step (mean)          {ms('wall')}  = {r['slowdown']:+.1%} against the step  (median "
        f"{r['wall_median_ms']:.3f} ms = {r['slowdown_median']:+.1%})",
        "loop-thread host work per step           wall         CPU",
        f"  total                            {both('host')}  = {r['host_share']:.1%} (wall), "
        f"{r['cpu_host_share']:.1%} (CPU) of the step",
        f"  take a ready batch               {both('take')}",
        f"  dispatch                         {both('dispatch')}  ({r['python_calls_per_dispatch']:.0f} Python calls "
        "inside: 0 = jax's C++ path)",
        f"  metrics read-back (copy)         {both('read-back')}",
        f"  other (metrics, log, bookkeeping){both('other')}",
        f"loop waiting for the device        {both('wait')}",
        f"batch build/pack/count/send ({producer}): {r['produce_wall_ms']:.3f} ms wall, "
        f"{r['produce_cpu_ms']:.3f} ms CPU per batch",
    ])


def split_cores(device_cores: int) -> tuple[list[int], list[int]]:
    """Start XLA's CPU client on the first `device_cores` of this process's cores and move this thread to the
    others (see the module docstring); returns (device cores, host cores). Call it before JAX makes its client."""
    cpus = sorted(os.sched_getaffinity(0))
    if not 0 < device_cores < len(cpus):
        raise SystemExit(f"--device-cores {device_cores}: this process may use {len(cpus)} core(s); leave the host "
                         "at least one")
    device, host = cpus[:device_cores], cpus[device_cores:]
    os.sched_setaffinity(0, device)
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        raise SystemExit(f"--device-cores is for a CPU device (JAX found {jax.default_backend()})")
    x = jnp.ones((256, 256))
    jax.block_until_ready(jax.jit(lambda a: a @ a)(x))  # the client's compute and dispatch threads start here
    os.sched_setaffinity(0, host)
    return device, host


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="host", choices=sorted(throughput.PRESETS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the means (compilation)")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every")
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (default: the preset's)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    ap.add_argument("--prefetch", type=int, default=None,
                    help="batches the producer thread keeps ready (default: dpojax's own; 0: built in the loop thread)")
    ap.add_argument("--repeats", type=int, default=1, help="runs; each figure is the median over them")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--device-cores", type=int, default=0,
                    help="cores the CPU device computes on, the rest left to the host (default 0: all shared)")
    args = ap.parse_args(argv)
    cores = split_cores(args.device_cores) if args.device_cores else None
    if args.prefetch is None:
        args.prefetch = prefetch.PREFETCH
    result = median_of([measure(args) for _ in range(args.repeats)])
    result["cores"] = f"device on cores {cores[0]}, host on {cores[1]}" if cores else "device and host share all cores"
    print(report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
