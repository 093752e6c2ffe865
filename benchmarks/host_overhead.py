"""Host overhead of the training loop: the host's own work per step (building and packing the batch, counting its
tokens and FLOPs, sending it, dispatching the step, reading metrics back, logging, checkpoint bookkeeping) against
the step's device time, on a model whose CPU step takes a few ms (as GPU and TPU steps do). Target: under 10%.

    python -m benchmarks.host_overhead                          # the `host` preset: 2 layers, d 32, T 32, 4 pairs
    python -m benchmarks.host_overhead --log-every 1 --set data.packing=none
    python -m benchmarks.host_overhead --preset tiny --steps 100

It runs `dpojax train` itself (`dpojax.train.loop.train`) with the loop's phases timed by wrappers around the batch
iterator (`loop._ready_batches`: build, pack, count, send to the devices), the step call (dispatch) and `loop.fetch`
(the loop's one read of device values), whose wait for the device is timed apart from the copy. Host ms/step = the
loop's wall time per step minus its waits for the device; the rest of it ("other") is the loop's bookkeeping.
Step ms = the same compiled step run back to back on batches already on the devices, with the run's final state.
Means over the steps after --skip (compilation) and before the last, log steps included.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness, throughput  # noqa: E402


class LoopClock:
    """Seconds per loop phase per step (a step runs from its dispatch to the next one's), by wrapping the loop's
    phase functions; `install` patches them, `uninstall` restores them."""

    def __init__(self):
        self.starts: list[float] = []  # perf_counter at each step's dispatch
        self.phases: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.run = self.step = self.state = None  # the run, its compiled step and latest state (to time the step)
        self.batches: list = []  # device batches of the run (the last few), for the same
        self._saved: dict = {}

    def _add(self, phase: str, seconds: float) -> None:
        self.phases[phase][len(self.starts)] += seconds

    def install(self) -> None:
        from dpojax.train import loop

        self._saved = {name: getattr(loop, name) for name in ("_ready_batches", "fetch", "setup_train")}
        ready_batches, fetch, setup_train = (self._saved[n] for n in ("_ready_batches", "fetch", "setup_train"))

        def timed_batches(*args, **kw):
            it = ready_batches(*args, **kw)
            while True:
                t0 = time.perf_counter()
                item = next(it, None)
                self._add("batch", time.perf_counter() - t0)
                if item is None:
                    return
                self.batches = (self.batches + [item.batch])[-8:]
                yield item

        def timed_fetch(tree):
            import jax

            t0 = time.perf_counter()
            jax.block_until_ready(tree)
            t1 = time.perf_counter()
            out = fetch(tree)
            self._add("wait", t1 - t0)
            self._add("read-back", time.perf_counter() - t1)
            return out

        def timed_setup(*args, **kw):
            run, state = setup_train(*args, **kw)
            step = run.train_step

            def dispatch(*a):
                t0 = time.perf_counter()
                self.starts.append(t0)
                self.state, out = step(*a)
                self._add("dispatch", time.perf_counter() - t0)
                return self.state, out

            self.run, self.step, run.train_step = run, step, dispatch
            return run, state

        loop._ready_batches, loop.fetch, loop.setup_train = timed_batches, timed_fetch, timed_setup

    def uninstall(self) -> None:
        from dpojax.train import loop

        for name, fn in self._saved.items():
            setattr(loop, name, fn)

    def per_step(self, skip: int) -> dict[str, float]:
        """Mean seconds per step of each phase, the wall time and the host time, over steps skip+1 .. last-1."""
        steps = range(skip + 1, len(self.starts))  # step i (1-based) runs from starts[i-1] to starts[i]
        wall = [self.starts[i] - self.starts[i - 1] for i in steps]
        out = {name: sum(c[i] for i in steps) / len(wall) for name, c in self.phases.items()}
        out["wall"], out["wall_median"] = statistics.mean(wall), statistics.median(wall)
        out["host"] = out["wall"] - out.get("wait", 0.0)
        out["other"] = out["host"] - sum(out.get(k, 0.0) for k in ("batch", "dispatch", "read-back"))
        return out

    def device_step(self, repeats: int = 20) -> float:
        """Seconds per step of the run's compiled step, dispatched back to back on its last batches from its final
        state (no host work between the steps)."""
        import jax

        state, ref = self.state, self.run.models.ref_params
        for batch in self.batches[:2]:  # warm
            state, out = self.step(state, ref, batch)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for i in range(repeats):
            state, out = self.step(state, ref, self.batches[i % len(self.batches)])
        jax.block_until_ready((state, out))
        return (time.perf_counter() - t0) / repeats


def measure(args) -> dict:
    import jax

    from dpojax.train import loop

    clock = LoopClock()
    with tempfile.TemporaryDirectory() as tmp:
        ns = argparse.Namespace(max_length=None, batch=None, warmup=0, steps=args.steps, dtype=None, attention=None,
                                remat=None, micro_batch=None, set=[f"train.log_every={args.log_every}", *args.set])
        cfg = throughput.preset_config(args.preset, ns, Path(tmp), jax.device_count())
        clock.install()
        try:
            loop.train(cfg)
        finally:
            clock.uninstall()
        step_s = clock.device_step()
    r = clock.per_step(args.skip)
    return {"machine": harness.machine(), "backend": jax.default_backend(), "devices": jax.device_count(),
            "preset": args.preset, "steps": args.steps, "log_every": args.log_every, "overrides": args.set,
            "packing": clock.run.spec.packing, "step_ms": step_s * 1e3, **{f"{k}_ms": v * 1e3 for k, v in r.items()},
            "host_share": r["host"] / step_s}


def report(r: dict) -> str:
    ms = lambda key: f"{r.get(key + '_ms', 0.0):8.3f} ms"  # noqa: E731
    return "\n".join([
        f"host overhead: preset {r['preset']}, {r['steps']} steps, log_every {r['log_every']}, packing {r['packing']}"
        f"{', ' + ' '.join(r['overrides']) if r['overrides'] else ''}; {r['devices']} {r['backend']} device(s)  "
        f"[{r['machine']}]",
        f"step (device, back to back)      {ms('step')}",
        f"loop wall per step               {ms('wall')}  (median {r['wall_median_ms']:.3f} ms)",
        f"host work per step               {ms('host')}  = {r['host_share']:.1%} of the step",
        f"  batch (build, pack, count, send) {ms('batch')}",
        f"  dispatch                         {ms('dispatch')}",
        f"  metrics read-back (copy)         {ms('read-back')}",
        f"  other (metrics, log, bookkeeping){ms('other')}",
        f"waiting for the device           {ms('wait')}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="host", choices=sorted(throughput.PRESETS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the means (compilation)")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    result = measure(args)
    print(report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
