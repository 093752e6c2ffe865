"""Tolerances for float32 results that two programs compute in another order (vmapped vs one run each, packed vs
padded, sharded vs one device): XLA picks kernels by CPU (AVX2, AVX-512, AMX) and by program, so such results agree
to a few units in the last place (ulps) of the magnitudes they are computed from, not bit for bit, and not to a
fixed absolute number. A sum of log-probs near -400 has ulps of 3e-5; a difference of two such sums is only as
exact as they are, however small it is."""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one ulp at 1.0, so one ulp at x is at most EPS32 * |x|


def fp32_tol(scale, ulps: float) -> float:
    """An absolute tolerance of `ulps` float32 ulps at magnitude `scale` (the largest |value| of an array or a
    number): the rounding a result inherits from the inputs of that size it was computed from."""
    return float(ulps * EPS32 * np.max(np.abs(np.asarray(scale, np.float64))))


def rewards_atol(record, beta: float, ulps: float = 16) -> float:
    """Absolute tolerance for the rewards of a training record (per-prompt means of beta x (policy - reference)
    log-prob sums): they are only as exact as those sums, however small the margin, so `ulps` ulps of beta x the
    policy's |logps/chosen| + |logps/rejected|, doubled for the reference's sums of the same size."""
    return fp32_tol(beta * 2 * (abs(record["logps/chosen"]) + abs(record["logps/rejected"])), ulps)
