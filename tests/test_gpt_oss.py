"""gpt-oss: attention sinks equal transformers' eager gpt-oss attention (windows, segments, query blocks); the
kernels that cannot add sinks are refused by name; MXFP4 expert weights dequantize exactly as transformers'
`convert_moe_packed_tensors`."""

from __future__ import annotations

import numpy as np
import pytest

from dpojax.errors import ModelError
from dpojax.models import mxfp4
from dpojax.models.attention import attend_xla, resolve_attention, segment_mask


# ---- attention sinks --------------------------------------------------------------------------------------
def _torch_sink_attention(q, k, v, mask, sinks, scale):
    """transformers' gpt-oss eager attention on [B, T, H|G, Dh] numpy inputs and a boolean [B, 1, T, T] mask."""
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_key_value_groups = q.shape[2] // k.shape[2]
            self.sinks = torch.nn.Parameter(torch.from_numpy(sinks))

    additive = torch.where(torch.from_numpy(np.array(mask)), 0.0, torch.finfo(torch.float32).min)
    out, _ = eager_attention_forward(Stub().eval(), *(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)),
                                     additive, scaling=scale)
    return out.detach().numpy()


@pytest.mark.parametrize("T,window", [(12, 4), (300, None), (300, 50)])
def test_sinks_equal_transformers_eager_attention(T, window):
    """Segments (padding: segment 0), GQA, a window shorter than the sequence, and T = 300 (queries in blocks)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(T)
    B, H, G, Dh = 2, 4, 2, 8
    q, k, v = (rng.standard_normal((B, T, n, Dh)).astype(np.float32) for n in (H, G, G))
    sinks = (2.0 * rng.standard_normal(H)).astype(np.float32)
    seg = np.ones((B, T), np.int32)
    seg[1, T // 3:] = 2
    seg[1, T - 3:] = 0
    w = None if window is None else jnp.asarray(window, jnp.int32)
    ours = attend_xla(q, k, v, seg, scale=0.3, window=w, sinks_H=jnp.asarray(sinks))
    ref = _torch_sink_attention(q, k, v, segment_mask(seg, w), sinks, 0.3)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-5, rtol=0)
    without = attend_xla(q, k, v, seg, scale=0.3, window=w)
    assert np.abs(np.asarray(without) - ref)[real].max() > 1e-2  # the sinks matter


def test_kernels_without_sinks_are_refused():
    import jax.numpy as jnp

    for name in ("cudnn", "splash"):
        with pytest.raises(ModelError, match="model.attention='xla'"):
            resolve_attention(name, dtype=jnp.bfloat16, head_dim=64, backend="gpu", sinks=True)
    for backend in ("gpu", "tpu", "cpu"):
        assert resolve_attention("auto", dtype=jnp.bfloat16, head_dim=64, backend=backend, sinks=True) == "xla"
    assert resolve_attention("auto", dtype=jnp.bfloat16, head_dim=64, backend="gpu") == "cudnn"


# ---- MXFP4 -------------------------------------------------------------------------------------------------
def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, scales) of `w` [..., C, R] in the released gpt-oss layout (`dpojax.models.mxfp4`): per group of 32
    values along C the smallest power of two that fits the group's largest magnitude under 6, each value rounded
    to the nearest FP4 code, two codes a byte (low nibble first)."""
    rows = np.swapaxes(np.asarray(w, np.float32), -1, -2)  # [..., R, C]
    groups = rows.reshape(*rows.shape[:-1], -1, mxfp4.GROUP)
    top = np.max(np.abs(groups), axis=-1, keepdims=True)
    exponent = np.where(top > 0, np.ceil(np.log2(np.maximum(top, 1e-30) / 6.0)), 0).astype(np.int32)
    scaled = groups / np.ldexp(np.float32(1), exponent)
    codes = np.argmin(np.abs(np.abs(scaled)[..., None] - mxfp4.FP4_VALUES[:8]), axis=-1).astype(np.uint8)
    codes |= np.where(scaled < 0, 8, 0).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exponent[..., 0] + mxfp4.SCALE_BIAS).astype(np.uint8)


def test_dequantize_equals_transformers():
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)  # every code, both nibbles
    scales = rng.integers(100, 140, (3, 10, 4), dtype=np.uint8)
    ours = mxfp4.dequantize(blocks, scales)
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    assert ours.shape == (3, 128, 10)
    np.testing.assert_array_equal(ours, ref.numpy())
    w = (rng.standard_normal((2, 64, 6)) * 0.3).astype(np.float32)
    round_trip = mxfp4.dequantize(*quantize_mxfp4(w))
    assert np.abs(round_trip - w).max() <= 0.25 * np.abs(w).max()  # the test quantizer is a real one
    np.testing.assert_array_equal(mxfp4.dequantize(*quantize_mxfp4(round_trip)), round_trip)
