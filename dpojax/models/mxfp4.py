"""MXFP4 checkpoints (released gpt-oss): expert weights stored as FP4 blocks with a shared power-of-two scale.

A quantized weight `W` (HF layout [..., C, R]: gpt-oss's `gate_up_proj` [X, D, 2F], `down_proj` [X, F, D]) is
stored as two tensors, the transposed rows cut into groups of 32 values:
  `W_blocks` uint8 [..., R, C / 32, 16]: two FP4 (E2M1) codes per byte, the LOW nibble first (even column);
  `W_scales` uint8 [..., R, C / 32]: an E8M0 exponent per group, biased by 127.
value = FP4_VALUES[code] * 2 ** (scale - 127), then [..., R, C] is transposed back to [..., C, R], as transformers'
`integrations.mxfp4.convert_moe_packed_tensors` does. The loader (`dpojax.models.hf`) sees the pair as one
virtual weight `W` (`packed_weights`) and reads it through `PackedSlice`: only the rows (experts, output columns)
a shard asks for are read and dequantized, in fp32 (exact), then cast to the parameter dtype. Exports are never
quantized.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

FP4_VALUES = np.asarray([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                         -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)  # E2M1 code -> value
GROUP = 32  # values sharing one scale
SCALE_BIAS = 127
BLOCKS, SCALES = "_blocks", "_scales"


def is_mxfp4(hf_config: Mapping[str, Any]) -> bool:
    """Whether config.json declares MXFP4-quantized weights (`quantization_config.quant_method == "mxfp4"`)."""
    quant = hf_config.get("quantization_config") or {}
    return isinstance(quant, Mapping) and quant.get("quant_method") == "mxfp4"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """fp32 [..., C, R] from `blocks` uint8 [..., R, C / 32, 16] and `scales` uint8 [..., R, C / 32]."""
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair up "
                         f"(blocks must be scales' shape plus a last axis of {GROUP // 2}).")
    values = np.empty((*blocks.shape[:-1], GROUP), np.float32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - SCALE_BIAS)
    rows = values.reshape(*blocks.shape[:-2], -1)  # [..., R, C]
    return np.swapaxes(rows, -1, -2)


def packed_weights(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """virtual weight name -> (blocks name, scales name), for every `W_blocks` stored with its `W_scales`."""
    names = set(names)
    return {name.removesuffix(BLOCKS): (name, name.removesuffix(BLOCKS) + SCALES) for name in sorted(names)
            if name.endswith(BLOCKS) and name.removesuffix(BLOCKS) + SCALES in names}


class PackedSlice:
    """A safetensors-slice look-alike over one MXFP4 pair: `get_shape()` is the dequantized [..., C, R] shape and
    `[index]` reads and dequantizes only the leading rows (e.g. experts) and output columns R asked for."""

    def __init__(self, blocks, scales):
        self.blocks, self.scales = blocks, scales  # safetensors slices of the two tensors
        *lead, rows, groups, half = (int(n) for n in blocks.get_shape())
        self.shape = (*lead, groups * 2 * half, rows)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = (*index, *(slice(None),) * (len(self.shape) - len(index)))
        if any(not isinstance(i, slice) or i.step not in (None, 1) for i in index):
            raise IndexError(f"MXFP4 weights are read by contiguous slices only, got {index}.")
        *lead, columns, rows = index
        packed = (*lead, rows)  # the stored tensors put R ahead of the groups: [..., R, C / 32(, 16)]
        return dequantize(self.blocks[packed], self.scales[packed])[..., columns, :]
