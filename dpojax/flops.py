"""FLOP accounting of a DPO step and peak FLOP/s per chip: what MFU divides by what.

Model FLOPs of one train step (what MFU counts, the same in the trainer's `mfu` metric and in
`benchmarks/throughput.py`), on the real tokens of the batch only (padding is waste, not work):

- policy forward = matmul + attention + head, where
  - matmul    = 2 x (matmul weights of all layers) x tokens   (q, k, v, o projections and the MLP; embeddings free)
  - attention = 4 x H x Dh x (query, key) pairs the mask allows, per layer: causal, so a sequence of n tokens has
                n (n + 1) / 2 pairs (fewer with a sliding window); 2 x Dh for the scores and 2 x Dh for the context
  - head      = 2 x V x D x scored tokens (the positions whose next-token log-prob DPO sums: completion tokens;
                dpojax's log-prob head skips the prompt's, so counting them would flatter the MFU)
- policy backward = 2 x policy forward (gradients of activations and of weights)
- reference forward = the same forward count for the frozen reference (0 when precomputed or reference-free)

Remat recompute (the forward work the backward pass redoes) is hardware work, not model work: it is reported
separately, and counted only in the hardware FLOPs utilization (HFU). The log-prob head always recomputes its
logits in the backward pass; the layers recompute what their remat policy does not save (the MLP's down projection
never: the backward needs only its input): none: nothing; full: every other matmul and the attention; dots: the
attention (every Dense output is saved); dots_all: nothing (the attention products are saved too); qkv: the output
projection and the MLP's gate/up.

Peaks are dense bf16 FLOP/s per chip from the vendors' datasheets (H100 and H200: SXM). On CPU there is no
datasheet number: `measured_matmul_peak` times a large matmul instead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 FLOP/s per chip (no sparsity), by the short name the throughput table prints.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "v4": 275e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
}
# jax `device_kind` substrings -> short name, most specific first ("TPU v5 lite" is a v5e, "TPU v5" a v5p).
DEVICE_KINDS = (
    ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v5p", "v5p"),
    ("TPU v5", "v5p"), ("TPU v4", "v4"), ("H200", "H200"), ("H100", "H100"), ("A100", "A100"),
)


def chip_name(device_kind: str) -> str | None:
    """The short chip name of a jax `device_kind` ("NVIDIA H100 80GB HBM3" -> "H100"), None when unknown."""
    return next((short for sub, short in DEVICE_KINDS if sub in device_kind), None)


def device_peak(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one chip of this kind, None when unknown (CPU)."""
    name = chip_name(device_kind)
    return None if name is None else PEAK_BF16_FLOPS[name]


def peak_flops_per_second() -> float | None:
    """Peak FLOP/s of all devices together, when their kind is in the table (None on CPU)."""
    per_device = device_peak(jax.devices()[0].device_kind)
    return None if per_device is None else per_device * jax.device_count()


def measured_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul on the default device (median of `repeats`), in `dtype` with fp32
    accumulation: the stand-in for a peak where no datasheet number exists (CPU)."""
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))


# ---- counts ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Forward:
    """FLOPs of one forward pass over a batch, by part."""

    matmul: float = 0.0  # layer projections and MLP
    attention: float = 0.0  # scores and context over the attended (query, key) pairs
    head: float = 0.0  # LM head on the scored positions

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.head


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one train step (all devices together)."""

    policy_forward: Forward
    reference_forward: Forward  # Forward() when the reference is precomputed or absent
    remat_recompute: float  # forward work redone in the backward pass (not model FLOPs)
    tokens: int  # real tokens through the body
    weight_grads: bool = True  # False under LoRA: the frozen base weights get no gradient (the adapters not counted)

    @property
    def policy_backward(self) -> float:
        """2 x forward: each matmul's input and weight gradients; without weight gradients (LoRA) the matmuls and
        the head cost 1 x forward, the attention products (no weights) still 2 x."""
        p = self.policy_forward
        return 2.0 * p.total if self.weight_grads else p.matmul + p.head + 2.0 * p.attention

    @property
    def model(self) -> float:
        """What MFU counts: policy forward + backward + reference forward."""
        return self.policy_forward.total + self.policy_backward + self.reference_forward.total

    @property
    def hardware(self) -> float:
        """What HFU counts: model FLOPs plus the remat recompute."""
        return self.model + self.remat_recompute

    def lines(self) -> list[str]:
        """The accounting written out, one part per line."""
        p, r = self.policy_forward, self.reference_forward
        return [
            f"policy forward      {_fmt(p.total)}  (matmul {_fmt(p.matmul)}, attention causal {_fmt(p.attention)}, "
            f"head {_fmt(p.head)})",
            f"policy backward     {_fmt(self.policy_backward)}  " + ("(2 x forward)" if self.weight_grads else
                                                                "(no base-weight gradients: LoRA)"),
            f"reference forward   {_fmt(r.total)}" + ("  (precomputed or none)" if not r.total else ""),
            f"model FLOPs (MFU)   {_fmt(self.model)}  over {self.tokens} real tokens",
            f"remat recompute     {_fmt(self.remat_recompute)}  (counted in HFU only)",
        ]


def _fmt(flops: float) -> str:
    """FLOPs with a unit that keeps 4 significant digits readable: 307.1 TFLOP, 1.234 GFLOP."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(flops) >= scale:
            return f"{flops / scale:.4g} {unit}"
    return f"{flops:.4g} FLOP"


def causal_pairs(lengths: Sequence[int] | np.ndarray, window: int | None = None) -> int:
    """(query, key) pairs a causal mask allows over sequences of `lengths` tokens: n (n + 1) / 2 each, or with a
    sliding window w (query - key < w) sum over positions i of min(i + 1, w)."""
    n = np.asarray(lengths, np.int64)
    if window is None or window <= 0:
        return int(np.sum(n * (n + 1) // 2))
    w = np.minimum(n, window)
    return int(np.sum(w * (w + 1) // 2 + (n - w) * window))


def forward_flops(cfg, *, tokens: int, scored: int, pairs_per_layer: Sequence[int]) -> Forward:
    """Forward FLOPs of model `cfg` (a dpojax ModelConfig) over `tokens` body tokens, `scored` head positions and
    `pairs_per_layer[l]` attended (query, key) pairs in layer l."""
    matmul_weights, _ = cfg._layer_params(active=True)  # MoE: the experts a token runs through
    per_pair = 4.0 * cfg.num_heads * cfg.head_dim
    return Forward(
        matmul=2.0 * cfg.num_layers * matmul_weights * tokens,
        attention=per_pair * float(sum(pairs_per_layer)),
        head=2.0 * cfg.vocab_size * cfg.hidden_size * scored,
    )


def remat_recompute(cfg, policy_forward: Forward, remat: str, *, tokens: int) -> float:
    """Forward FLOPs the backward pass redoes under remat policy `remat` (see the module docstring): what XLA's cost
    analysis of the unrolled model shows (tests/test_throughput.py). The MLP's down projection is never redone (the
    backward needs its input, not its output). `dots` and `dots_all` save every Dense output (named
    `models.layers.DENSE_OUTPUT`: the matmul sits in a custom_vjp the dot policies cannot see); `dots_all` also
    saves the attention products."""
    head = policy_forward.head  # the log-prob head recomputes its logits chunk by chunk
    D, F, H, Dh, L = cfg.hidden_size, cfg.active_mlp_width, cfg.num_heads, cfg.head_dim, cfg.num_layers
    down = 2.0 * L * F * D * tokens
    if remat in ("none", "dots_all"):
        return head
    if remat == "full":
        return head + policy_forward.matmul - down + policy_forward.attention
    if remat == "dots":
        return head + policy_forward.attention
    if remat == "qkv":  # q, k, v and the attention context saved: the output projection and the MLP's input side
        mlp_in = (3 if cfg.mlp == "gated" else 2) - 1
        return head + 2.0 * L * (H * Dh * D + mlp_in * D * F) * tokens
    raise ValueError(f"remat={remat!r}: no FLOP accounting for this policy")


def step_flops(cfg, lengths: Sequence[int] | np.ndarray, scored: int, *,
               prefix: Sequence[int] | np.ndarray | None = None, remat: str = "none",
               reference: bool = True, weight_grads: bool = True) -> StepFlops:
    """FLOPs of one train step over causal sequences of real `lengths` tokens (one entry per sequence), each also
    attending to `prefix` earlier keys (a shared prompt computed once: packing; default 0), with `scored`
    completion tokens; `reference`: the reference forward runs in the step; `weight_grads`: False under LoRA."""
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    prefix = np.zeros_like(lengths) if prefix is None else np.asarray(prefix, np.int64).reshape(-1)
    tokens = int(lengths.sum())
    pairs = [causal_pairs(prefix + lengths, w) - causal_pairs(prefix, w) for w in cfg.windows]
    policy = forward_flops(cfg, tokens=tokens, scored=scored, pairs_per_layer=pairs)
    return StepFlops(
        policy_forward=policy,
        reference_forward=policy if reference else Forward(),
        remat_recompute=remat_recompute(cfg, policy, remat, tokens=tokens),
        tokens=tokens,
        weight_grads=weight_grads,
    )


def _counts(ids: np.ndarray, valid: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Token counts per (row, key values...) of the valid tokens of [rows, length] arrays, as a
    [rows * ..., last key] array."""
    sizes = [int(k.max(initial=0)) + 1 for k in keys]
    flat = np.arange(len(ids))[:, None] * np.ones_like(ids)
    for k, n in zip(keys, sizes):
        flat = flat * n + k
    counts = np.bincount(flat[valid].ravel(), minlength=len(ids) * int(np.prod(sizes)))
    return counts.reshape(-1, sizes[-1])


def batch_counts(batch) -> tuple[np.ndarray, np.ndarray, int]:
    """(prefix, length, scored) of a batch's sequences: each sequence is `length` real tokens attending causally to
    themselves and to `prefix` shared keys before them; `scored` counts the scored completion tokens.

    PreferenceBatch [N, K, T]: every run of equal positive segment ids in a row is a sequence with prefix 0; padding
    responses and filler prompts count 0 (as `real_tokens`). PackedBatch (data.packing): per group part (segment),
    the shared prompt (branch 0) is a sequence with prefix 0 and each response (branch k + 1) a sequence with the
    prompt as prefix: the prompt is computed, and counted, once."""
    if hasattr(batch, "branch_ids_PxJ"):
        seg_PxJ, branch_PxJ = np.asarray(batch.segment_ids_PxJ, np.int64), np.asarray(batch.branch_ids_PxJ, np.int64)
        counts = _counts(seg_PxJ, seg_PxJ > 0, seg_PxJ, branch_PxJ)  # [row * segment id, branch]
        prompt, responses = counts[:, :1], counts[:, 1:]
        prefix = np.concatenate([np.zeros(prompt.size, np.int64), np.broadcast_to(prompt, responses.shape).ravel()])
        lengths = np.concatenate([prompt.ravel(), responses.ravel()])
        return prefix[lengths > 0], lengths[lengths > 0], int(np.sum(np.asarray(batch.completion_PxI)))
    real_NxK = np.asarray(batch.response_mask_NxK) * np.asarray(batch.prompt_mask_N)[:, None]
    seg_NxKxT = np.asarray(batch.segment_ids_NxKxT).astype(np.int64) * (real_NxK[..., None] > 0)
    seg_BxT = seg_NxKxT.reshape(-1, seg_NxKxT.shape[-1])
    lengths = _counts(seg_BxT, seg_BxT > 0, seg_BxT)[:, 1:].ravel()  # id 0 is padding
    scored = int(np.sum(np.asarray(batch.completion_mask_NxKxT) * (real_NxK[..., None] > 0)))
    return np.zeros(np.sum(lengths > 0), np.int64), lengths[lengths > 0], scored


def batch_flops(cfg, batch, *, remat: str = "none", reference: bool = True, weight_grads: bool = True) -> StepFlops:
    """`step_flops` of one PreferenceBatch or PackedBatch (host arrays)."""
    prefix, lengths, scored = batch_counts(batch)
    return step_flops(cfg, lengths, scored, prefix=prefix, remat=remat, reference=reference,
                      weight_grads=weight_grads)
