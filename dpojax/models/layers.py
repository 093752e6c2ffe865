"""Building blocks: parameters with logical axes, RMSNorm/LayerNorm, dense projections, MLPs, RoPE.

Every parameter is an `nnx.Param` whose custom metadata `logical_axes` names its axes with the
glossary of `dpojax.sharding`. Block parameters are created STACKED: `num_layers=L` prepends an
axis `layers` of size L; the same module code then runs on one layer's slice inside a scan.
Norms and softmax run in fp32; matmuls in the compute `dtype`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dpojax.models.config import ModelConfig, RopeConfig

Initializer = str  # "normal" (std = init_std), "ones", "zeros"
DENSE_OUTPUT = "dense"  # checkpoint_name of every Dense matmul output (the `dots` remat policies save it)


def make_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], *, init: Initializer,
               param_dtype, num_layers: int | None = None, init_std: float = 0.02) -> nnx.Param:
    """An nnx.Param of `shape` (with a leading `layers` axis of size num_layers when given)."""
    if num_layers is not None:
        shape, axes = (num_layers, *shape), ("layers", *axes)
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = (init_std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(param_dtype)
    elif init == "ones":
        value = jnp.ones(shape, param_dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, param_dtype)
    else:
        raise ValueError(f"unknown initializer {init!r}")
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + weight), computed in fp32, returned in `dtype`."""

    def __init__(self, size: int, *, eps: float, offset: float = 0.0, dtype, param_dtype,
                 num_layers: int | None, rngs: nnx.Rngs):
        self.eps, self.offset, self.dtype = eps, offset, dtype
        self.weight = make_param(rngs, (size,), ("norm",), init="zeros" if offset else "ones",
                                 param_dtype=param_dtype, num_layers=num_layers)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., size]: [B, T, D], or [B, T, H, Dh] (qk_norm)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma: (x * (offset + w)) in fp32, then cast
            return (x32 * (self.weight[...].astype(jnp.float32) + self.offset)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)  # Llama: w * cast(x)


class LayerNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, computed in fp32, returned in `dtype`."""

    def __init__(self, size: int, *, eps: float, dtype, param_dtype, num_layers: int | None, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.weight = make_param(rngs, (size,), ("norm",), init="ones", param_dtype=param_dtype,
                                 num_layers=num_layers)
        self.bias = make_param(rngs, (size,), ("norm",), init="zeros", param_dtype=param_dtype,
                               num_layers=num_layers)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., size]
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        x32 = centered * jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def make_norm(cfg: ModelConfig, size: int, *, dtype, param_dtype, num_layers: int | None, rngs: nnx.Rngs):
    """The model's norm (cfg.norm) over the last axis of `size`."""
    if cfg.norm == "layer":
        return LayerNorm(size, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, num_layers=num_layers,
                         rngs=rngs)
    return RMSNorm(size, eps=cfg.norm_eps, offset=cfg.norm_offset, dtype=dtype, param_dtype=param_dtype,
                   num_layers=num_layers, rngs=rngs)


@functools.lru_cache(maxsize=1)
def native_bf16_dots() -> bool:
    """Whether a 16-bit dot should accumulate in fp32 (`preferred_element_type`): yes on TPU/GPU, and on CPUs with
    bf16 matrix instructions (AMX, AVX512_BF16), where XLA:CPU then runs a native bf16 kernel, much faster than a
    plain bf16 dot (which XLA upcasts to fp32 and back). On CPUs without them that bf16 kernel is emulated and
    slower than the upcast, so there the plain dot is kept."""
    if jax.default_backend() != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _dot(x_2d: jax.Array, w_2d: jax.Array, dtype) -> jax.Array:
    """[rows, in] @ [in, out] in `dtype` (x_2d may have several row axes); 16-bit operands accumulate (and return)
    fp32 first where the hardware has bf16 matrix instructions (`native_bf16_dots`)."""
    if x_2d.ndim > 2:
        return _dot_general(x_2d, w_2d, (((x_2d.ndim - 1,), (0,)), ((), ())), dtype)
    if jnp.dtype(dtype).itemsize < 4 and native_bf16_dots():
        return jax.lax.dot(x_2d, w_2d, preferred_element_type=jnp.float32).astype(dtype)
    return jax.lax.dot(x_2d, w_2d)


def _dot_general(a: jax.Array, b: jax.Array, dims, dtype) -> jax.Array:
    """jax.lax.dot_general in `dtype`, with `_dot`'s fp32 accumulation of 16-bit operands."""
    if jnp.dtype(dtype).itemsize < 4 and native_bf16_dots():
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(dtype)
    return jax.lax.dot_general(a, b, dims)


def _as_2d(x: jax.Array, kernel: jax.Array, n_in: int, dtype, keep_rows: bool = False) -> tuple[jax.Array, jax.Array]:
    """x [..., *in] -> [rows, prod(in)] (keep_rows: [..., prod(in)]) and kernel [*in, *out] -> [prod(in), prod(out)]
    in `dtype` (free reshapes of row-major arrays)."""
    n_feat = math.prod(kernel.shape[:n_in])
    rows = x.shape[:x.ndim - n_in] if keep_rows else (-1,)
    return x.astype(dtype).reshape(*rows, n_feat), kernel.astype(dtype).reshape(n_feat, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dense_matmul(x: jax.Array, kernel: jax.Array, n_in: int, dtype, keep_rows: bool = False) -> jax.Array:
    """x [..., *in] . kernel [*in, *out] -> [..., *out] in `dtype`, as ONE 2-D matmul, with the backward written
    out as two plain 2-D dots: dx = g @ w^T and dw = x^T @ g.

    Why: jax's own transpose rule computes dw as (g^T @ x) and then transposes it, which XLA:CPU turns into a
    transposed copy of g fused with g's producer (a large share of a small model's step), and a multi-dimensional
    kernel ([D, H, Dh]) gets layout copies around its dot. The residuals are x and the kernel exactly as given
    (under `lax.scan` a layer's kernel is then forwarded from the stacked parameters, never copied into a
    stacked residual); casts and reshapes are redone in the backward. Same values as the plain dot_general.

    keep_rows: x's leading (row) axes stay apart (a dot_general over the merged features only) instead of being
    flattened into one: under context parallelism a row's positions are split over devices, and a flattened
    [B * T] of them is no block of one sharded axis, so GSPMD would all-gather the whole [B, T, *in] first."""
    x_2d, w_2d = _as_2d(x, kernel, n_in, dtype, keep_rows)
    return _dot(x_2d, w_2d, dtype).reshape(*x.shape[:x.ndim - n_in], *kernel.shape[n_in:])


def _dense_fwd(x, kernel, n_in, dtype, keep_rows):
    return dense_matmul(x, kernel, n_in, dtype, keep_rows), (x, kernel)


def _dense_bwd(n_in, dtype, keep_rows, residuals, g):
    x, kernel = residuals
    x_2d, w_2d = _as_2d(x, kernel, n_in, dtype, keep_rows)
    g_2d = g.astype(dtype).reshape(*x_2d.shape[:-1], w_2d.shape[1])
    dx = _dot(g_2d, w_2d.T, dtype).reshape(x.shape).astype(x.dtype)
    if keep_rows:  # dw = x^T @ g contracting every row axis at once
        rows = tuple(range(x_2d.ndim - 1))
        dw = _dot_general(x_2d, g_2d, ((rows, rows), ((), ())), dtype)
    else:
        dw = _dot(x_2d.T, g_2d, dtype)
    return dx, dw.reshape(kernel.shape).astype(kernel.dtype)


dense_matmul.defvjp(_dense_fwd, _dense_bwd)


class Dense(nnx.Module):
    """y = x . kernel (+ bias), contracting the last len(in_shape) axes of x; kernel is [*in_shape, *out_shape].

    Computed by `dense_matmul`: one 2-D matmul forward, two backward."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], *, in_axes: tuple[str, ...],
                 out_axes: tuple[str, ...], use_bias: bool, dtype, param_dtype, num_layers: int | None,
                 rngs: nnx.Rngs, init_std: float = 0.02, bias_axes: tuple[str, ...] | None = None,
                 keep_rows: bool = False):
        self.n_in, self.dtype, self.keep_rows = len(in_shape), dtype, keep_rows  # keep_rows: `dense_matmul`
        self.kernel = make_param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes), init="normal",
                                 param_dtype=param_dtype, num_layers=num_layers, init_std=init_std)
        self.bias = (make_param(rngs, out_shape, bias_axes or out_axes, init="zeros", param_dtype=param_dtype,
                                num_layers=num_layers) if use_bias else None)
        # a LoRA adapter (`set_lora`): adds scale * (x @ A) @ B to the output; declared as data (a subtree of the
        # graph state once set), no state while None
        self.lora: nnx.Module | None = nnx.data(None)

    def set_lora(self, adapter: nnx.Module) -> None:
        """Adapt this layer with `adapter` (`dpojax.models.lora.attach`): x -> [..., *out] added to the output."""
        self.lora = adapter

    def __call__(self, x: jax.Array) -> jax.Array:
        # named: the matmul is inside a custom_vjp, where the dot-saving remat policies cannot see it
        y = checkpoint_name(dense_matmul(x, self.kernel[...], self.n_in, jnp.dtype(self.dtype), self.keep_rows),
                           DENSE_OUTPUT)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x)
        return y


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)) (SwiGLU when act = silu)."""

    def __init__(self, D: int, F: int, *, use_bias: bool, activation: str, dtype, param_dtype,
                 num_layers: int | None, rngs: nnx.Rngs, keep_rows: bool = False):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, num_layers=num_layers, rngs=rngs,
                  keep_rows=keep_rows)
        self.activation = activation
        self.gate_proj = Dense((D,), (F,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.up_proj = Dense((D,), (F,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.down_proj = Dense((F,), (D,), in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        h_BxTxF = gated_activation(self.gate_proj(x_BxTxD), self.up_proj(x_BxTxD), self.activation)
        return self.down_proj(h_BxTxF)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated_activation(gate: jax.Array, up: jax.Array, activation: str) -> jax.Array:
    """act(gate) * up, keeping only gate and up for the backward (act and its derivative are recomputed there):
    under `lax.scan` every residual is a stacked [L, B, T, F] copy, and autodiff of silu alone keeps two more."""
    return ACTIVATION_FNS[activation](gate) * up


def _gated_fwd(gate, up, activation):
    return gated_activation(gate, up, activation), (gate, up)


def _gated_bwd(activation, residuals, g):
    gate, up = residuals
    act_gate, act_vjp = jax.vjp(ACTIVATION_FNS[activation], gate)
    return act_vjp(g * up)[0], g * act_gate


gated_activation.defvjp(_gated_fwd, _gated_bwd)


class PlainMLP(nnx.Module):
    """down(act(up(x))) (GPT-2, GPT-NeoX)."""

    def __init__(self, D: int, F: int, *, use_bias: bool, activation: str, dtype, param_dtype,
                 num_layers: int | None, rngs: nnx.Rngs, keep_rows: bool = False):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, num_layers=num_layers, rngs=rngs,
                  keep_rows=keep_rows)
        self.activation = activation
        self.up_proj = Dense((D,), (F,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.down_proj = Dense((F,), (D,), in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATION_FNS[self.activation](self.up_proj(x_BxTxD)))


def make_mlp(cfg: ModelConfig, *, dtype, param_dtype, num_layers: int | None, rngs: nnx.Rngs,
             keep_rows: bool = False):
    """keep_rows: rows split over `context` (`dense_matmul`)."""
    cls = GatedMLP if cfg.mlp == "gated" else PlainMLP
    return cls(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias, activation=cfg.activation,
               dtype=dtype, param_dtype=param_dtype, num_layers=num_layers, rngs=rngs, keep_rows=keep_rows)


ACTIVATION_FNS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


# ---- RoPE -------------------------------------------------------------------------------------------


def rope_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int, *,
                     long: bool = False) -> tuple[np.ndarray, float]:
    """(inv_freq [Dr/2] float32, cos/sin scale) for `rope` over `head_dim` = Dr rotated dims, following
    transformers' definitions. `long` picks LongRoPE's long factors (else its short ones)."""
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    scale = 1.0
    if rope.type == "longrope":
        ext = np.asarray(rope.long_factor if long else rope.short_factor, np.float32)
        inv_freq = (1.0 / (ext * np.float32(rope.theta) ** exponents)).astype(np.float32)
        scale = rope.attention_factor
        if scale is None:
            orig = rope.original_max_position_embeddings
            scale = 1.0 if rope.factor <= 1.0 else math.sqrt(1 + math.log(rope.factor) / math.log(orig))
    elif rope.type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope)
    elif rope.type == "yarn":
        inv_freq, scale = _yarn_inv_freq(rope, dim)
    # "dynamic" equals "default" for sequences up to max_position_embeddings (checked by ModelConfig).
    return inv_freq.astype(np.float32), float(scale)


def _llama3_inv_freq(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    factor, base, orig = rope.factor, rope.theta, rope.original_max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), attention_factor


def rope_cos_sin(positions_BxT: jax.Array, inv_freq: np.ndarray, scale: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, Dr] (fp32 angles, cast to dtype), halves repeated as in HF's rotate_half layout."""
    half = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]  # [B, T, Dr / 2]
    angles_BxTxDr = jnp.concatenate([half, half], axis=-1)
    return (jnp.cos(angles_BxTxDr) * scale).astype(dtype), (jnp.sin(angles_BxTxDr) * scale).astype(dtype)


def rope_tables(rope: RopeConfig, rotary_dims: int, max_position_embeddings: int, positions_BxT: jax.Array,
                dtype, longest: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, Dr] for `rope`. LongRoPE, as transformers: the long factors when the longest position
    in the batch (+1; or `longest` when given: decoding one token sees one position) exceeds
    original_max_position_embeddings, the short ones otherwise."""
    inv_freq, scale = rope_frequencies(rope, rotary_dims, max_position_embeddings)
    cos_BxTxDr, sin_BxTxDr = rope_cos_sin(positions_BxT, inv_freq, scale, dtype)
    original = rope.original_max_position_embeddings
    if rope.type == "longrope" and (longest is not None or positions_BxT.shape[1] > original):  # else short
        long_inv_freq, long_scale = rope_frequencies(rope, rotary_dims, max_position_embeddings, long=True)
        long_cos, long_sin = rope_cos_sin(positions_BxT, long_inv_freq, long_scale, dtype)
        use_long = (jnp.max(positions_BxT) + 1 if longest is None else longest) > original
        cos_BxTxDr, sin_BxTxDr = jnp.where(use_long, long_cos, cos_BxTxDr), jnp.where(use_long, long_sin, sin_BxTxDr)
    return cos_BxTxDr, sin_BxTxDr


def apply_rope(x_BxTxHxDh: jax.Array, cos_BxTxDr: jax.Array, sin_BxTxDr: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin on the first Dr dims of each head (rotate_half(x) = [-x2, x1] on their
    two halves); the remaining Dh - Dr dims pass unchanged (partial rotary). H: any heads axis (H, or G for keys).

    With every dim rotated (Dr = Dh, most models) rotate_half is a reversal of the two halves and a sign folded
    into sin: no slices and no concatenation, whose backward would be pads (a copy of x per rotation)."""
    Dr, Dh = cos_BxTxDr.shape[-1], x_BxTxHxDh.shape[-1]
    cos_BxTx1xDr, sin_BxTxDr = cos_BxTxDr[:, :, None, :], sin_BxTxDr
    if Dr == Dh:
        sign_Dr = jnp.concatenate([-jnp.ones(Dr // 2, sin_BxTxDr.dtype), jnp.ones(Dr // 2, sin_BxTxDr.dtype)])
        halves = x_BxTxHxDh.reshape(*x_BxTxHxDh.shape[:-1], 2, Dr // 2)
        swapped_BxTxHxDh = jnp.flip(halves, axis=-2).reshape(x_BxTxHxDh.shape)  # [x2, x1]
        return x_BxTxHxDh * cos_BxTx1xDr + swapped_BxTxHxDh * (sin_BxTxDr * sign_Dr)[:, :, None, :]
    x_rot, x_pass = x_BxTxHxDh[..., :Dr], x_BxTxHxDh[..., Dr:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_rot * cos_BxTx1xDr + rotated * sin_BxTxDr[:, :, None, :]
    return jnp.concatenate([out, x_pass], axis=-1)
