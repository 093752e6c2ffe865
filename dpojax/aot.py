"""Ahead-of-time compilation of the real train step for a TPU topology, on any host (libtpu installed).

`compile_for_topology(cfg, "v5p:2x2x1")` builds everything a run would jit, but abstractly: the policy and
reference parameters as sharded `ShapeDtypeStruct`s from config.json alone (no weights, no memory), the
optimizer state and step counter with the shardings `init_state` gives them, and one global batch of
`train.batch_size` pairs at `data.max_length` tokens (the largest bucket). It then lowers and compiles
`dpojax.trainer.step.compile_steps`'s train step for the topology's devices (`jax.experimental.topologies`)
and reads XLA's per-device memory and cost analyses. When the step does not fit, the TPU compiler refuses it
(RESOURCE_EXHAUSTED); that is reported as "fits: no" with the compiler's numbers.

Topology names are `chip:AxB[xC]` as libtpu spells them (v4, v5e, v5p, v6e), or a Cloud TPU accelerator
type from `ACCELERATOR_TYPES` (v5p-8 = v5p:2x2x1, 4 chips).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

from dpojax import flops, losses, paths
from dpojax.errors import ConfigError, UserError
from dpojax.models.config import ModelConfig
from dpojax.models.hf import read_hf_config
from dpojax.trainer import build
from dpojax.trainer.step import abstract_batch, abstract_state, compile_steps

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # HBM per chip
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip


CHIPS = {  # peaks: dpojax.flops, the one table the trainer's MFU and the throughput benchmark use too
    "v4": Chip(32 * GiB, flops.PEAK_BF16_FLOPS["v4"]),
    "v5e": Chip(16 * GiB, flops.PEAK_BF16_FLOPS["v5e"]),
    "v5p": Chip(95 * GiB, flops.PEAK_BF16_FLOPS["v5p"]),
    "v6e": Chip(32 * GiB, flops.PEAK_BF16_FLOPS["v6e"]),
}
# Cloud TPU accelerator type -> libtpu topology (v4/v5p count TensorCores, 2 per chip; v5e/v6e count chips)
ACCELERATOR_TYPES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8", "v5p-512": "v5p:4x8x8",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8", "v6e-64": "v6e:8x8",
}
# No TPU here: stop libtpu probing for one, and let several compiling processes load it at once.
QUIET_LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
                    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def parse_topology(name: str) -> tuple[str, str, int]:
    """(libtpu topology name, chip, number of chips) of `name` (`v5p:2x2x1` or `v5p-8`)."""
    topology = ACCELERATOR_TYPES.get(name, name)
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", topology)
    if m is None or m.group(1) not in CHIPS:
        raise ConfigError(
            f"compile: unknown TPU topology {name!r}; use chip:AxB[xC] with chip one of {', '.join(CHIPS)} "
            f"(e.g. v5p:2x2x1, v5e:2x4) or an accelerator type ({', '.join(sorted(ACCELERATOR_TYPES)[:6])}, ...)."
        )
    return topology, m.group(1), math.prod(int(d) for d in m.group(2).split("x"))


def topology_devices(topology: str, slices: int = 1) -> list:
    """The devices of a TPU topology, times `slices` slices (no TPU needed; libtpu compiles for them)."""
    for key, value in QUIET_LIBTPU_ENV.items():  # without these libtpu probes for a local TPU and warns
        os.environ.setdefault(key, value)
    from jax.experimental import topologies  # loads libtpu: only once the environment above is set


    try:
        kw = {"num_slices": slices} if slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kw).devices)
    except Exception as e:  # missing libtpu, unknown shape: one clear message
        hint = " Install libtpu: pip install 'dpojax[tpu]'." if "libtpu" in str(e).lower() or "tpu" in str(e) else ""
        raise UserError(f"compile: cannot describe TPU topology {topology!r}: {e}.{hint}") from None


def read_model_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """config.json of a folder (local or gs://), or of a hub id (reads config.json only, never weights)."""
    folder = paths.path(name_or_path)
    if folder.is_file() and folder.suffix == ".json":  # a config.json given directly
        return json.loads(folder.read_text())
    if folder.is_dir():
        return read_hf_config(folder)
    try:
        import huggingface_hub  # heavy, and only for a hub id

        return json.loads(Path(huggingface_hub.hf_hub_download(name_or_path, "config.json", revision=revision))
                          .read_text())
    except Exception as e:
        raise UserError(
            f"compile: could not read config.json of {name_or_path!r} (no hub access, or a gated model without a "
            f"token?): {type(e).__name__}: {str(e)[:300]}. Give a local copy instead: dpojax compile CONFIG "
            "--topology T --model-config path/to/config.json (only the architecture is read, no weights)."
        ) from None


# ------------------------------------------------------------------------------------------------ report
@dataclasses.dataclass(frozen=True)
class CompileReport:
    topology: str
    chip: str
    chips: int
    devices: int
    num_responses: int  # K per prompt (2 for pair losses)
    mesh: dict[str, int]
    attention: str
    num_params: int  # policy parameters
    batch_pairs: int  # global preference pairs per step
    seq_len: int
    hbm_per_device: int  # bytes
    fits: bool
    argument_bytes: int | None = None  # per device: state + reference + batch
    output_bytes: int | None = None  # per device, not aliased to a (donated) argument
    temp_bytes: int | None = None  # per device: activations, gradients, workspace
    code_bytes: int | None = None
    flops_per_step: float | None = None  # XLA cost analysis, summed over devices
    model_flops_per_step: float | None = None  # dpojax.flops: policy forward+backward + reference forward, causal
    seconds_per_step: float | None = None  # XLA's cost model estimate
    error: str | None = None  # the compiler's message when it refused (out of memory)
    active_params: int | None = None  # mixture of experts: parameters a token runs through (None: dense)

    @property
    def peak_bytes(self) -> int | None:
        if self.argument_bytes is None:
            return None
        return self.argument_bytes + (self.output_bytes or 0) + (self.temp_bytes or 0)

    def format(self) -> str:
        g = lambda b: "n/a" if b is None else f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.2f} MiB"
        active = "" if self.active_params is None else f" ({self.active_params / 1e9:.3f} B active per token)"
        lines = [
            f"topology            {self.topology} ({self.chips} {self.chip} chips, {self.devices} devices), "
            f"mesh {self.mesh}",
            f"model               {self.num_params / 1e9:.3f} B parameters{active}, attention {self.attention}",
            f"batch               {self.batch_pairs} prompts x {self.num_responses} responses x {self.seq_len} tokens "
            "(policy + reference)",
            f"per device          arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)}, "
            f"temporaries {g(self.temp_bytes)}",
            f"peak per device     {g(self.peak_bytes)} of {g(self.hbm_per_device)} HBM"
            f" -> fits: {'yes' if self.fits else 'NO'}",
        ]
        peak = CHIPS[self.chip].peak_bf16_flops * self.chips
        lines.append(f"FLOPs per step      {self.model_flops_per_step:.4g} (model: policy forward+backward, reference "
                     f"forward); ideal time {self.model_flops_per_step / peak:.3g} s at {peak / 1e15:.3g} PFLOP/s")
        if self.flops_per_step is not None:
            estimate = f"{self.seconds_per_step:.4g} s" if (self.seconds_per_step or 0) > 0 else "none (non-positive)"
            lines.append(f"XLA cost model      {self.flops_per_step:.4g} FLOPs, time estimate {estimate} "
                         "(loop bodies, e.g. scanned layers, counted once)")
        if self.error:
            lines.append(f"compiler            {self.error}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ compile
@dataclasses.dataclass(frozen=True)
class LoweredStep:
    lowered: Any  # jax.stages.Lowered of the train step
    mesh: dict[str, int]
    attention: str
    num_params: int
    batch_pairs: int
    seq_len: int
    model_flops_per_step: float
    num_responses: int = 2
    active_params: int | None = None  # mixture of experts: parameters a token runs through (None: dense)


def lower_step(cfg, devices, *, backend: str = "tpu", batch_pairs: int | None = None,
               micro_pairs: int | None = None, model_config: str | None = None) -> LoweredStep:
    """The train step of `cfg` lowered (not compiled) for `devices` with abstract, sharded arguments: the policy
    and reference from config.json alone (`model_config`: a local config.json for the policy, and the reference
    when it is the same model), the optimizer state as `init_state` shards it, one global batch of `batch_pairs`
    prompts (default train.batch_size) at data.max_length in micro-batches of `micro_pairs`, with K = 2 responses
    for pair losses and data.max_responses for K-wise ones (the largest batch they can meet)."""
    sharder = build.make_sharder(cfg, devices)
    n_pairs = batch_pairs or cfg.train.batch_size
    micro = min(micro_pairs or cfg.micro_batch_size, n_pairs)
    if n_pairs % micro or micro % sharder.batch_shards:
        raise ConfigError(f"compile: {n_pairs} pairs in micro-batches of {micro} do not split over the "
                          f"{sharder.batch_shards} devices that split the batch (mesh.data * mesh.fsdp * mesh.expert).")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=n_pairs, micro_batch_size=micro))

    @functools.cache
    def read_config(name: str) -> ModelConfig:
        source = model_config if model_config and name == cfg.model.name_or_path else name
        return ModelConfig.from_hf(read_model_config(source, cfg.model.revision))

    models = build.abstract_models(cfg, sharder, read_config, backend=backend)
    build.check_sharded(models, sharder)
    spec = build.step_spec(cfg, models, sharder, horizon=cfg.train.steps or 1000)
    state = abstract_state(models.policy_params, spec.optimizer, sharder)
    k = cfg.data.max_responses if losses.is_kwise(cfg.loss) else 2
    batch = abstract_batch(spec, sharder, n_pairs, k, cfg.data.max_length)
    train, _ = compile_steps(spec, state, models.ref_params, sharder)
    # model FLOPs as the trainer's MFU counts them (dpojax.flops: causal attention), for the batch compiled here:
    # n_pairs x K sequences of max_length tokens, nothing shared, every position scored (the head's worst case)
    n_seq = n_pairs * k
    counted = flops.step_flops(models.policy_cfg, [cfg.data.max_length] * n_seq, n_seq * cfg.data.max_length,
                               reference=models.ref_graphdef is not None, weight_grads=models.lora is None)
    return LoweredStep(
        lowered=train.lower(state, models.ref_params, batch), mesh=dict(sharder.mesh.shape), attention=spec.attention,
        num_params=models.policy_cfg.num_params(), batch_pairs=n_pairs, seq_len=cfg.data.max_length,
        model_flops_per_step=counted.model, num_responses=k,
        active_params=models.policy_cfg.active_params() if models.policy_cfg.is_moe else None,
    )


def compile_for_topology(cfg, topology: str, *, slices: int = 1, batch_pairs: int | None = None,
                         micro_pairs: int | None = None, model_config: str | None = None) -> CompileReport:
    """Compile the train step of `cfg` for `topology` (times `slices` slices over DCN) and report per-device
    memory, FLOPs and time. batch_pairs / micro_pairs override train.batch_size / train.micro_batch_size."""
    name, chip, chips = parse_topology(topology)
    devices = topology_devices(name, slices)
    step = lower_step(cfg, devices, batch_pairs=batch_pairs, micro_pairs=micro_pairs, model_config=model_config)
    base = dict(topology=name if slices == 1 else f"{slices} x {name}", chip=chip, chips=chips * slices,
                devices=len(devices), num_responses=step.num_responses, mesh=step.mesh, attention=step.attention,
                num_params=step.num_params, active_params=step.active_params,
                batch_pairs=step.batch_pairs, seq_len=step.seq_len, hbm_per_device=CHIPS[chip].hbm_bytes * chips //
                (len(devices) // slices), model_flops_per_step=step.model_flops_per_step)
    try:
        compiled = compile_uncached(step.lowered)
    except Exception as e:  # XlaRuntimeError: the TPU compiler refuses a program that exceeds HBM
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
            raise
        return CompileReport(**base, fits=False, error=_first_lines(text))
    mem, cost = compiled.memory_analysis(), _cost(compiled)
    outputs = mem.output_size_in_bytes - mem.alias_size_in_bytes
    peak = mem.argument_size_in_bytes + outputs + mem.temp_size_in_bytes
    return CompileReport(
        **base, fits=peak <= base["hbm_per_device"], argument_bytes=mem.argument_size_in_bytes, output_bytes=outputs,
        temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
        flops_per_step=cost.get("flops", 0.0) * len(devices), seconds_per_step=cost.get("optimal_seconds"),
    )


def compile_uncached(lowered):
    """`lowered.compile()` with JAX's persistent compilation cache off. The TPU topology's client only compiles (no
    TPU attached): it can write an executable to the cache but not load one back ("PjRtCompiler must be constructed
    with a Client to call DeserializeLoadedExecutable"), so a second identical compile sharing the cache folder
    warned and compiled again. JAX decides once per process whether the cache is used (for the first backend, here
    the CPU), hence the reset on both sides: the next compile for this host's devices sets the cache up again."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _first_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:n])[:600]


def largest_batch(cfg, topology: str, *, slices: int = 1, limit: int = 4096,
                  model_config: str | None = None) -> tuple[int | None, list[CompileReport]]:
    """The largest batch (pairs, a multiple of the data-parallel devices) whose step fits without gradient
    accumulation (micro-batch = batch), by doubling then bisection; returns it (None when even the smallest
    does not fit) and every report made on the way. Accumulation then reaches any multiple of it."""
    name, _, _ = parse_topology(topology)
    unit = build.make_sharder(cfg, topology_devices(name, slices)).batch_shards
    reports: list[CompileReport] = []

    def fits(k: int) -> bool:
        r = compile_for_topology(cfg, topology, slices=slices, batch_pairs=k * unit, micro_pairs=k * unit,
                                 model_config=model_config)
        reports.append(r)
        return r.fits

    if not fits(1):
        return None, reports
    lo, hi = 1, 2
    while hi * unit <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * unit, reports
