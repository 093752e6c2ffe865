"""Rotary position embedding settings: a leaf module, so `models.config` and `models.families` can both use them
without importing each other."""

from __future__ import annotations

import dataclasses

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding; the fields are those of HF's `rope_parameters` (None = not used)."""

    type: str = "default"  # one of ROPE_TYPES
    theta: float = 10_000.0  # base wavelength
    factor: float | None = None  # linear/dynamic/yarn/llama3/longrope scaling factor
    original_max_position_embeddings: int | None = None  # llama3/yarn/longrope pre-training context
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn (default 32)
    beta_slow: float | None = None  # yarn (default 1)
    attention_factor: float | None = None  # yarn/longrope cos/sin scale (default from factor)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to integers
    short_factor: tuple[float, ...] | None = None  # longrope: per-frequency divisors within the original context
    long_factor: tuple[float, ...] | None = None  # longrope: divisors beyond it
