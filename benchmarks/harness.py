"""What every dpojax benchmark shares: timing, the machine's name, FLOP accounting, an XLA op-kind profile,
and the side-by-side runners (a dpojax train step, TRL's DPOTrainer) on one model folder and one data set.

Benchmarks are scripts (`python -m benchmarks.NAME` or `python benchmarks/NAME.py`), never timed tests: CPUs
differ between machines (cores, vector units, AMX or not) and a shared machine's load changes from run to run, so
only ratios measured side by side in one run mean anything. Every report names the CPU and quotes medians with
their min/max; the latest figures, with their machine and date, are in benchmarks/RESULTS.md.

    from benchmarks import harness
    t = harness.time_fn(lambda: jax.block_until_ready(step(x)), warmup=2, repeats=5)
    print(harness.machine(), t)                       # "Intel(R) Xeon(R) Processor, 2 cores"  "1.234 s [1.20-1.30]"
    kinds = harness.op_kinds(lambda: jax.block_until_ready(step(x)))
    print(harness.format_op_kinds(kinds))             # share of device time per XLA op kind
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # benchmarks compare CPU kernels; also keeps libtpu quiet

from dpojax import flops  # noqa: E402 - after the environment set-up above
from dpojax.config import config_from_dict  # noqa: E402 - after the environment set-up above
from dpojax.trainer import build, prefetch, reference  # noqa: E402 - after the environment set-up above
from dpojax.trainer.step import batch_sharding  # noqa: E402 - after the environment set-up above


# ---- the machine ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else lscpu), e.g. "Intel(R) Xeon(R) Processor"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> str:
    """One line naming the CPU, its core count and its matrix extensions (AMX matters most for bf16)."""
    flags = cpu_flags()
    ext = [name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags]
    no_amx = "" if "amx_tile" in flags else ", no AMX"
    return f"{cpu_model()}, {os.cpu_count()} cores" + (f", {'/'.join(ext)}" if ext else "") + no_amx


# ---- timing -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of each timed repeat (warm-up excluded)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def __str__(self) -> str:
        return f"{self.median:.3f} s [{self.min:.3f}-{self.max:.3f}]"

    def as_dict(self) -> dict:
        return {"median_s": round(self.median, 4), "min_s": round(self.min, 4), "max_s": round(self.max, 4),
                "n": len(self.times)}


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Call `fn` warmup times untimed (compilation), then `repeats` times timed. `fn` must block until its work
    is done (`jax.block_until_ready`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


def time_alternating(fns: Sequence[Callable[[], object]], *, repeats: int = 3) -> list[Timing]:
    """One Timing per function of `fns` (already warmed up), timed in turns (f0, f1, ..., f0, f1, ...) so that
    every one sees the same load of a shared machine; repeat r of each forms a comparable tuple."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [Timing(tuple(t)) for t in times]


def ratio(slow: Timing, fast: Timing) -> float:
    """How many times faster `fast` is than `slow`, by medians."""
    return slow.median / fast.median


# ---- FLOPs --------------------------------------------------------------------------------------------------
def body_flops(cfg, batch: int, seq_len: int, *, backward: bool = False) -> float:
    """Model FLOPs of the decoder body (no head) on `batch` causal sequences of `seq_len` tokens, counted as
    `dpojax.flops` counts them for MFU (attention over the causal pairs); backward = 2x forward."""
    forward = flops.step_flops(cfg, [seq_len] * batch, 0, reference=False).policy_forward.total
    return forward * (2.0 if backward else 1.0)


def gflops_per_s(flops: float, t: Timing) -> float:
    return flops / t.median / 1e9


# ---- profile: share of device time per XLA op kind --------------------------------------------------------------
MATMUL_KINDS = re.compile(r"dot|ynn|onednn|convolution|gemm|matmul|cublas", re.I)


def op_kind(hlo_op: str) -> str:
    """`copy_bitcast_fusion.12` -> `copy_bitcast_fusion`; `dot.3` -> `dot`."""
    return re.sub(r"(\.\d+)+$", "", hlo_op)


def op_times(fn: Callable[[], object], *, repeats: int = 1) -> tuple[dict[str, float], dict[str, int]]:
    """(seconds, count) per XLA op (HLO instruction name) over `repeats` calls of `fn` (already compiled), by SELF
    time (a while loop's body ops count, the loop itself only for its own overhead)."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(repeats):
                fn()
        paths = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "*.trace.json.gz"))
        events = [e for p in paths for e in json.load(gzip.open(p))["traceEvents"]
                  if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    seconds: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter[str] = collections.Counter()
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []  # open events; a child's time is taken out of its parent's
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            seconds[e["args"]["hlo_op"]] += e["dur"] * 1e-6
            counts[e["args"]["hlo_op"]] += 1
            if stack:
                seconds[stack[-1]["args"]["hlo_op"]] -= e["dur"] * 1e-6
            stack.append(e)
    return dict(seconds), dict(counts)


def op_kinds(fn: Callable[[], object], *, repeats: int = 1) -> list[tuple[str, float, int]]:
    """(kind, seconds, count) per XLA op kind over `repeats` calls of `fn` (already compiled), by SELF time
    (`op_times`), largest first."""
    return kinds_of(*op_times(fn, repeats=repeats))


def kinds_of(seconds: dict[str, float], counts: dict[str, int]) -> list[tuple[str, float, int]]:
    """`op_times` summed per op kind, largest first."""
    by_kind: dict[str, float] = collections.defaultdict(float)
    n: collections.Counter[str] = collections.Counter()
    for op, t in seconds.items():
        by_kind[op_kind(op)] += t
        n[op_kind(op)] += counts[op]
    return sorted(((k, t, n[k]) for k, t in by_kind.items()), key=lambda row: -row[1])


def hlo_sources(hlo_text: str) -> dict[str, tuple[str, str, int]]:
    """HLO instruction name -> (file name, function, line) of the Python code it came from (its innermost frame,
    from the compiled module's `stack_frame_id` metadata and FileNames / FunctionNames / FileLocations /
    StackFrames tables); a fusion carries its root's."""
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    section = None
    ops: dict[str, int] = {}
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        row = re.match(r"^(\d+) (.*)$", line)
        if section and row:
            tables[section][int(row.group(1))] = row.group(2)
            continue
        section = None if not line.strip() else section
        op = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*stack_frame_id=(\d+)", line)
        if op:
            ops[op.group(1)] = int(op.group(2))

    def field(text: str, name: str) -> int:
        return int(re.search(name + r"=(\d+)", text).group(1))

    out = {}
    for op, frame in ops.items():
        location = tables["FileLocations"].get(field(tables["StackFrames"].get(frame, "file_location_id=0"),
                                                     "file_location_id"))
        if location is None:
            continue
        file = tables["FileNames"][field(location, "file_name_id")].strip('"')
        function = tables["FunctionNames"][field(location, "function_name_id")].strip('"')
        out[op] = (os.path.basename(file), function, field(location, "line"))
    return out


# Parts of an MoE layer by the function of experts.py an op comes from (innermost frame): the grouped matmuls (their
# blocks loop included), the routing that surrounds them in `expert_ffn` (sort by expert, permute the rows, unpermute
# and combine), the router (scores, softmax, top-k) and the router statistics of the aux loss.
_MATMULS = "expert matmuls (grouped matmul kernel, forward and backward)"
MOE_PARTS = {**dict.fromkeys(("grouped", "grouped_matmul", "block_matmul", "_block_matmul_bwd", "expert", "one_block",
                              "_window", "_windows", "_masked_update"), _MATMULS),
             **dict.fromkeys(("expert_ffn", "_sort_by_expert"), "routing: sort, permute, unpermute, combine"),
             "route": "router: scores, softmax, top-k", "router_stats": "router statistics (aux loss)"}


def moe_shares(seconds: dict[str, float], sources: dict[str, tuple[str, str, int]]) -> dict[str, float]:
    """Share of the profiled time (`op_times`) per MoE part (`MOE_PARTS`, ops from dpojax/models/experts.py),
    the rest under "everything else"."""
    total = sum(seconds.values()) or 1.0
    shares: dict[str, float] = collections.defaultdict(float)
    for op, t in seconds.items():
        file, function, _ = sources.get(op, ("", "", 0))
        part = MOE_PARTS.get(function) if file == "experts.py" else None
        shares[part or "everything else"] += t / total
    return dict(shares)


def format_op_kinds(rows: Sequence[tuple[str, float, int]], *, top: int = 12, per: int = 1) -> str:
    """A table: share of the profiled time, seconds and op count per kind (per call when `per` calls were
    profiled); matmul kinds are marked with *."""
    total = sum(s for _, s, _ in rows) or 1.0
    lines = [f"  {'op kind':<36} {'share':>6} {'s/call':>8} {'ops/call':>9}"]
    for kind, s, n in rows[:top]:
        mark = "*" if MATMUL_KINDS.search(kind) else " "
        lines.append(f"{mark} {kind:<36} {s / total:>6.1%} {s / per:>8.4f} {n / per:>9.0f}")
    matmul = sum(s for k, s, _ in rows if MATMUL_KINDS.search(k))
    other = max((s for k, s, _ in rows if not MATMUL_KINDS.search(k)), default=0.0)
    lines.append(f"  matmul kinds (*): {matmul / total:.1%} of {total / per:.3f} s/call; "
                 f"largest other kind: {other / total:.1%}")
    return "\n".join(lines)


def largest_non_matmul_share(rows: Sequence[tuple[str, float, int]]) -> float:
    total = sum(s for _, s, _ in rows) or 1.0
    return max((s for k, s, _ in rows if not MATMUL_KINDS.search(k)), default=0.0) / total


# ---- side by side: a dpojax train step and TRL's DPOTrainer on one model folder and one JSONL data set ----------
@dataclasses.dataclass(frozen=True)
class StepSetup:
    """What both trainers get: an HF model folder (policy = reference), a JSONL preference file, fp32."""

    model_dir: Path
    data: Path
    batch: int  # global preference pairs per optimizer step
    max_length: int
    steps: int  # timed steps
    warmup: int  # untimed first steps (compilation for dpojax)
    remat: str = "none"  # dpojax model.remat; TRL: gradient checkpointing unless "none"
    lr: float = 1e-6
    buckets: tuple[int, ...] | None = None  # dpojax data.buckets (None: its default, powers of two up to max_length)


def setup_config(setup: StepSetup, work: Path, *, data_overrides: dict | None = None, **model_overrides):
    """The dpojax Config of `setup` (adamw, constant lr, one device mesh axis over all devices); `data_overrides`:
    more `data.` keys (e.g. packing)."""
    return config_from_dict({
        "model": {"name_or_path": str(setup.model_dir), "remat": setup.remat, **model_overrides},
        "data": {"train": str(setup.data), "max_length": setup.max_length, "cache_dir": str(work / "cache"),
                 "buckets": None if setup.buckets is None else list(setup.buckets), **(data_overrides or {})},
        "optim": {"name": "adamw", "lr": setup.lr, "schedule": "constant", "max_grad_norm": 1.0},
        "train": {"batch_size": setup.batch, "steps": setup.warmup + setup.steps},
        "output_dir": str(work / "dpojax_run"),
    })


@dataclasses.dataclass
class BuiltStep:
    """The project's real train step, built the way `dpojax train` builds it, and the run's first batches. Steps
    run as the train loop runs them: over the state's flat leaves (`TrainStep.flat`; per layer when the layers are
    unrolled), which `state` turns back into a TrainState."""

    run: object  # dpojax.trainer.build.Run
    leaves: list  # the train state as the step's flat leaves (replaced by each step: they are donated)
    batches: list  # host PreferenceBatches, train.steps of them, in the trainer's order
    table: object = None  # precomputed reference log-probs of the data (ref_model.precompute), else None

    def __call__(self, batch) -> None:
        """One train step on `batch`, blocking until it is done."""
        import jax

        batch = reference.attach(batch, self.table)
        self.leaves, out = self.run.train_step.flat(self.leaves, jax.tree.leaves(self.run.models.ref_params),
                                                    build.to_device(batch, batch_sharding(self.run.sharder)))
        jax.block_until_ready((self.leaves, out))

    def hlo_text(self, batch) -> str:
        """The compiled HLO of the train step on `batch` (compiled again: the jit cache holds no text)."""
        import jax

        batch = build.to_device(reference.attach(batch, self.table), batch_sharding(self.run.sharder))
        lowered = self.run.train_step.flat.lower(self.leaves, jax.tree.leaves(self.run.models.ref_params), batch)
        return lowered.compile().as_text()

    @property
    def state(self):
        """The structured TrainState of the leaves (a copy when the layers are split)."""
        return self.run.train_step.state_of(self.leaves)


def build_step(cfg) -> BuiltStep:
    """Mesh, models, data (and precomputed reference log-probs when the config asks), the compiled train step
    and train state of `cfg`: the stages of `dpojax train` (the one place to adapt when the trainer's API moves)."""
    sharder = build.make_sharder(cfg)
    models = build.build_models(cfg, sharder)
    pairs = build.load_split(cfg, models, cfg.data.train, cfg.data.train_split)
    models = build.precompute_references(cfg, models, sharder, [pairs])
    steps = build.total_steps(cfg, len(pairs))
    run, state = build.setup_train(cfg, models, sharder, steps=steps)
    return BuiltStep(run, run.train_step.leaves_of(state), list(prefetch.host_batches(run, pairs, 0, steps)),
                     reference.lookup(run.models.ref_tables, pairs))


def build_dpojax_step(setup: StepSetup, work: Path, *, data_overrides: dict | None = None, **model_overrides):
    """(step(batch) -> None blocking, batches): the real train step on `setup`."""
    built = build_step(setup_config(setup, work, data_overrides=data_overrides, **model_overrides))
    return built, built.batches


def batch_shape(batch) -> tuple:
    """The array shapes of a host batch: one compiled program of the train step per distinct value."""
    import jax

    return tuple(getattr(x, "shape", ()) for x in jax.tree.leaves(batch))


def warm_shapes(step: BuiltStep, seen: Sequence, timed: Sequence) -> int:
    """Run `step` once, untimed, on the first batch of each shape in `timed` that no batch of `seen` has, so no
    timed step includes a compilation; returns how many shapes the step has compiled in all. (Packed batches come in
    a handful of row lengths, `dpojax.data.packing.row_length`: a run compiles each once, and its persistent
    compilation cache keeps them for the next run; TRL pads each batch to its longest row and compiles nothing.)"""
    shapes = {batch_shape(b) for b in seen}
    for batch in timed:
        if batch_shape(batch) not in shapes:
            shapes.add(batch_shape(batch))
            step(batch)
    return len(shapes)


def dpojax_steps(setup: StepSetup, work: Path, *, profile: bool = False, data_overrides: dict | None = None,
                 report: dict | None = None, **model_overrides) -> Timing:
    """Seconds per dpojax train step (policy forward+backward, reference forward, AdamW update); `profile`: also
    print the XLA op-kind shares of one more step, and for a mixture-of-experts policy the shares of its parts
    (`moe_shares`, also put in `report["moe_shares"]`)."""
    step, batches = build_dpojax_step(setup, work, data_overrides=data_overrides, **model_overrides)
    with CompileTimer() as compiling:
        for batch in batches[:setup.warmup]:
            step(batch)
        shapes = warm_shapes(step, batches[:setup.warmup], batches[setup.warmup:])
    times, cpu = [], []
    for batch in batches[setup.warmup:]:
        c0, t0 = cpu_seconds(), time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    if report is not None:
        report["dpojax_step_cpu"] = Timing(tuple(cpu)).as_dict()
        report["dpojax_compiled_shapes"] = shapes
        report["dpojax_compile_s"] = round(compiling.seconds, 1)
    if profile:
        seconds, counts = op_times(lambda: step(batches[-1]))
        print(f"dpojax train step, XLA op kinds by self time ({machine()}):\n"
              f"{format_op_kinds(kinds_of(seconds, counts))}", flush=True)
        if step.run.models.policy_cfg.is_moe:
            shares = moe_shares(seconds, hlo_sources(step.hlo_text(batches[-1])))
            print("dpojax train step, MoE parts by self time:\n" + "\n".join(
                f"  {part:<44} {share:>6.1%}" for part, share in sorted(shares.items(), key=lambda kv: -kv[1])),
                flush=True)
            if report is not None:
                report["moe_shares"] = {k: round(v, 4) for k, v in shares.items()}
    return Timing(tuple(times))


def trl_steps(setup: StepSetup, work: Path, *, dtype: str = "float32", device: str = "cpu",
              report: dict | None = None) -> Timing:
    """Seconds per TRL DPOTrainer step on the same model, data, batch and optimizer. `dtype` "bfloat16": fp32
    weights with bf16 autocast (TRL's `bf16=True`, as dpojax's bf16 compute over fp32 params); `device` "cuda": the
    first GPU (torch's SDPA attention, flash kernels in bf16). A model folder without weights (a preset's
    `synthetic_model_dir`) is random-initialized from its config.json, the reference a copy of the policy.
    `report`: gets "trl_step_cpu", the process's CPU seconds per step (`cpu_seconds`)."""
    import copy

    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    rows = [json.loads(line) for line in setup.data.read_text().splitlines()]
    if glob.glob(str(setup.model_dir / "*.safetensors")):
        policy = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(setup.model_dir), dtype=torch.float32)
        ref = copy.deepcopy(policy)
    times: list[float] = []
    cpu: list[float] = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.t0, self.c0 = time.perf_counter(), cpu_seconds()

        def on_step_end(self, *a, **k):
            sync()
            times.append(time.perf_counter() - self.t0)
            cpu.append(cpu_seconds() - self.c0)

    trainer = DPOTrainer(
        model=policy, ref_model=ref, processing_class=AutoTokenizer.from_pretrained(setup.model_dir),
        train_dataset=datasets.Dataset.from_list(rows),
        args=DPOConfig(
            output_dir=str(work / "trl_run"), report_to=[], use_cpu=device == "cpu", bf16=dtype == "bfloat16",
            max_length=setup.max_length, per_device_train_batch_size=setup.batch,
            max_steps=setup.warmup + setup.steps, learning_rate=setup.lr, lr_scheduler_type="constant",
            save_strategy="no", logging_steps=10**6, disable_tqdm=True, gradient_checkpointing=setup.remat != "none",
        ),
        callbacks=[Timer()],
    )
    trainer.train()
    if report is not None:
        report["trl_step_cpu"] = Timing(tuple(cpu[setup.warmup:])).as_dict()
    return Timing(tuple(times[setup.warmup:]))


def trl_main(argv: list[str] | None = None) -> dict:
    """`python -m benchmarks.harness trl ...`: `trl_steps` in a process of its own (no JAX in it: on a GPU, JAX's
    preallocated memory would not leave TRL room); writes {step timing, pairs/s} to --json."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.harness trl")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--dtype", default="float32", choices=tuple(build.DTYPES))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    setup = StepSetup(Path(args.model_dir), Path(args.data), args.batch, args.max_length, args.steps, args.warmup,
                      remat=args.remat)
    with tempfile.TemporaryDirectory() as tmp:
        timing = trl_steps(setup, Path(tmp), dtype=args.dtype, device=args.device)
    out = {"step": timing.as_dict(), "pairs_per_s": args.batch / timing.median, "dtype": args.dtype,
           "device": args.device, "remat": args.remat}
    Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def trl_in_subprocess(setup: StepSetup, *, dtype: str, device: str, json_path: Path) -> dict:
    """`trl_main` in a child process of this Python; returns what it wrote."""
    cmd = [sys.executable, "-m", "benchmarks.harness", "trl", "--model-dir", str(setup.model_dir), "--data",
           str(setup.data), "--batch", str(setup.batch), "--max-length", str(setup.max_length), "--steps",
           str(setup.steps), "--warmup", str(setup.warmup), "--remat", setup.remat, "--dtype", dtype, "--device",
           device, "--json", str(json_path)]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(json_path.read_text())


def side_by_side(setup: StepSetup, work: Path, *, label: str, profile: bool = False, **model_overrides) -> dict:
    """Both trainers on `setup`, one after the other in this process; the report names the CPU. `model_overrides`:
    dpojax `model.*` keys (e.g. scan_layers=False)."""
    extra: dict = {}
    ours = dpojax_steps(setup, work, profile=profile, report=extra, **model_overrides)
    theirs = trl_steps(setup, work, report=extra)
    result = {
        "machine": machine(), "model": label, "max_length": setup.max_length, "batch_pairs": setup.batch,
        "dpojax_step": ours.as_dict(), "trl_step": theirs.as_dict(),
        "dpojax_pairs_per_s": round(setup.batch / ours.median, 3),
        "trl_pairs_per_s": round(setup.batch / theirs.median, 3),
        "speedup": round(ratio(theirs, ours), 3),
        # CPU seconds per step (all threads): what a machine shared with other jobs disturbs least
        "speedup_cpu_time": round(extra["trl_step_cpu"]["median_s"] / extra["dpojax_step_cpu"]["median_s"], 3),
        **extra,
    }
    print(f"{label}: dpojax {setup.batch / ours.median:.2f} pairs/s ({ours}/step) vs TRL "
          f"{setup.batch / theirs.median:.2f} pairs/s ({theirs}/step): {ratio(theirs, ours):.2f}x; CPU seconds per "
          f"step {extra['dpojax_step_cpu']['median_s']:.1f} vs {extra['trl_step_cpu']['median_s']:.1f}: "
          f"{result['speedup_cpu_time']:.2f}x; dpojax compiled {extra['dpojax_compiled_shapes']} batch shape(s) "
          f"in {extra['dpojax_compile_s']:.0f} s before timing  [{machine()}]", flush=True)
    return result


# ---- compile time, peak memory, synthetic random-init models ------------------------------------------------
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileTimer:
    """Seconds JAX spent tracing, lowering and compiling (its own monitoring events) inside the `with` block."""

    def __init__(self):
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration

    def __enter__(self) -> "CompileTimer":
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listen)


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): the largest `peak_bytes_in_use` over this process's devices where the backend
    reports it (GPU, TPU), else the process's peak resident set size (CPU: host memory is device memory)."""
    import resource

    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    if peaks and all(p is not None for p in peaks):
        return max(peaks), "peak device memory (largest over local devices)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of this process (CPU)"


def synthetic_model_dir(root: Path, hf_config: dict) -> Path:
    """A model folder of config.json and a word-level tokenizer covering the whole vocabulary ("w0" .. ): enough
    for `model.init: random` (no weights on disk), so a model of any size costs nothing to set up."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(hf_config["vocab_size"] - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    root.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(root)
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    (root / "config.json").write_text(json.dumps({**ids, **hf_config}, indent=1))
    return root


def full_length_pairs(path: Path, n: int, max_length: int, vocab_size: int, seed: int = 0) -> Path:
    """`n` random-word pairs whose prompt + completion (+ EOS) is exactly `max_length` tokens of a
    `synthetic_model_dir` tokenizer: every batch fills the largest bucket, so steps time one compiled shape."""
    prompt, completion = max_length // 2, max_length - max_length // 2 - 1  # EOS appended to the completion
    return word_pairs(path, n, prompt, completion, vocab_size, seed)


def word_pairs(path: Path, n: int, prompt: int, completion: int, vocab_size: int, seed: int = 0) -> Path:
    """`n` pairs of random words "w0".."w{vocab_size - 5}" (one token each for a `synthetic_model_dir` tokenizer):
    a `prompt`-word prompt, and chosen and rejected of `completion` words each."""
    import random

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab_size - 4)]
    with path.open("w") as f:
        for _ in range(n):
            row = {"prompt": " ".join(rng.choices(words, k=prompt))}
            for key in ("chosen", "rejected"):
                row[key] = " " + " ".join(rng.choices(words, k=completion))
            f.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":
    if sys.argv[1:2] != ["trl"]:
        raise SystemExit("usage: python -m benchmarks.harness trl --model-dir DIR --data FILE ... (see trl_main)")
    trl_main(sys.argv[2:])
