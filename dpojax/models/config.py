"""`ModelConfig`: the architecture of a decoder-only LM, read from a Hugging Face `config.json` dict.

One `ModelConfig` describes every supported family with a few named options (norm, MLP, position
encoding, biases, q/k norm). A family is one entry in `FAMILIES`: a function that turns the HF dict
into those options, plus (in `hf.py`) one weight-name mapping table. Adding GPT-2, GPT-NeoX, Gemma or
Phi-3 later means adding option values (e.g. `norm="layer"`, `norm_offset=1.0`, `position="learned"`,
`parallel_residual=True`) that the layers understand, one parser here and one table in `hf.py`.

Dimension letters (used in names across dpojax.models):
  B batch, T length, D embed, F mlp, H query heads, K kv heads, G = H // K, Dh head_dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from dpojax.errors import ModelError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
ACTIVATIONS = ("silu",)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding; the fields are those of HF's `rope_parameters` (None = not used)."""

    type: str = "default"  # one of ROPE_TYPES
    theta: float = 10_000.0  # base wavelength
    factor: float | None = None  # linear/dynamic/yarn/llama3 scaling factor
    original_max_position_embeddings: int | None = None  # llama3/yarn pre-training context
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn (default 32)
    beta_slow: float | None = None  # yarn (default 1)
    attention_factor: float | None = None  # yarn cos/sin scale (default from factor, mscale)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to integers


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only model. Hashable (the HF dict is kept but not compared)."""

    family: str  # a key of FAMILIES (= HF model_type)
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # K (H % K == 0)
    head_dim: int  # Dh (may differ from D // H)
    max_position_embeddings: int  # longest context the model was configured for
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope: RopeConfig = RopeConfig()
    tie_embeddings: bool = False  # lm_head shares the embedding table
    qkv_bias: bool = False  # biases on q/k/v projections (qwen2, llama attention_bias)
    o_bias: bool = False  # bias on the attention output projection (llama attention_bias)
    mlp_bias: bool = False  # biases on the MLP projections (llama mlp_bias)
    qk_norm: bool = False  # RMSNorm over Dh on q and k before RoPE (qwen3)
    activation: str = "silu"  # MLP gate activation, one of ACTIVATIONS
    # Named options kept for families to come; only these values are implemented now.
    norm: str = "rms"  # "rms" (later: "layer" for GPT-2 / NeoX)
    norm_offset: float = 0.0  # scale = offset + weight (Gemma uses 1.0)
    mlp: str = "gated"  # "gated" = down(act(gate(x)) * up(x)) (later: "plain" for GPT-2 / NeoX)
    position: str = "rope"  # "rope" (later: "learned" for GPT-2)
    sliding_window: int | None = None  # window of sliding-window layers, None when it never applies
    hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def group_size(self) -> int:
        """G: query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from a HF `config.json` dict; raises ModelError for anything not supported."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ModelError(
                f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))}."
            )
        fields = FAMILIES[model_type](hf)
        cfg = cls(family=model_type, hf_config=dict(hf), **fields)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})."
            )
        if self.head_dim % 2:
            raise ModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.activation not in ACTIVATIONS:
            raise ModelError(f"hidden_act {self.activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}.")
        for name, value, allowed in (("norm", self.norm, ("rms",)), ("mlp", self.mlp, ("gated",)),
                                     ("position", self.position, ("rope",))):
            if value not in allowed:
                raise ModelError(f"{name}={value!r} is not implemented yet; implemented: {', '.join(allowed)}.")

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ModelError when a sequence of `seq_len` would need a feature we do not implement."""
        if self.sliding_window is not None and seq_len > self.sliding_window:
            raise ModelError(
                f"{self.family}: sequences of {seq_len} tokens exceed the sliding attention window "
                f"({self.sliding_window}), which dpojax does not implement; use max_length <= {self.sliding_window}."
            )
        if self.rope.type == "dynamic" and seq_len > self.max_position_embeddings:
            raise ModelError(
                f"dynamic RoPE scaling changes beyond max_position_embeddings ({self.max_position_embeddings}); "
                f"sequences of {seq_len} tokens are not supported; use max_length <= {self.max_position_embeddings}."
            )

    # ---- sizes -------------------------------------------------------------------------------------
    def _layer_params(self) -> tuple[int, int]:
        """(matmul weights, other params) of one block."""
        D, F, H, K, Dh = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        matmul = D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F
        other = 2 * D  # two norms
        other += (H + 2 * K) * Dh if self.qkv_bias else 0
        other += D if self.o_bias else 0
        other += 2 * F + D if self.mlp_bias else 0
        other += 2 * Dh if self.qk_norm else 0
        return matmul, other

    def num_params(self) -> int:
        """Number of parameters (the tied table counted once)."""
        matmul, other = self._layer_params()
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return embeddings + self.num_layers * (matmul + other) + self.hidden_size

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 per matmul weight (lm_head included, embedding lookup free)
        plus attention scores and context, 4 * L * H * Dh * T (full T x T, no causal discount, as in PaLM's MFU)."""
        matmul, _ = self._layer_params()
        n_matmul = self.num_layers * matmul + self.vocab_size * self.hidden_size
        attention = 4 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return float(2 * n_matmul + attention)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 * N_matmul + 12 * L * H * Dh * T."""
        return 3.0 * self.forward_flops_per_token(seq_len)


# ---- HF config parsing ------------------------------------------------------------------------------


def _require(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ModelError(f"config.json of model_type {hf.get('model_type')!r} lacks required key {key!r}.")
    return hf[key]


def parse_rope(hf: Mapping[str, Any]) -> RopeConfig:
    """RoPE from either transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ModelError("per-layer-type RoPE parameters (nested rope_parameters) are not supported.")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ModelError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}.")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ModelError(f"partial_rotary_factor={partial} is not supported (only 1.0).")
    theta = params.get("rope_theta", hf.get("rope_theta")) or 10_000.0
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if rope_type in ("llama3", "yarn") and original is None:
        original = _require(hf, "max_position_embeddings")
    if rope_type in ("linear", "dynamic", "llama3") and params.get("factor") is None:
        raise ModelError(f"RoPE type {rope_type!r} needs a 'factor'.")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                raise ModelError(f"RoPE type 'llama3' needs {key!r}.")
    factor = params.get("factor")
    if rope_type == "yarn" and factor is None:
        factor = _require(hf, "max_position_embeddings") / original
    return RopeConfig(
        type=rope_type, theta=float(theta), factor=None if factor is None else float(factor),
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=params.get("low_freq_factor"), high_freq_factor=params.get("high_freq_factor"),
        beta_fast=params.get("beta_fast"), beta_slow=params.get("beta_slow"),
        attention_factor=params.get("attention_factor"), mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"), truncate=bool(params.get("truncate", True)),
    )


def _effective_window(hf: Mapping[str, Any], window: Any, sliding_layers: bool) -> int | None:
    """The sliding window if some layer uses it and it is shorter than the context, else None."""
    if window is None or not sliding_layers:
        return None
    return None if int(window) >= int(hf["max_position_embeddings"]) else int(window)


def _common(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Fields shared by the Llama-like families (llama, mistral, qwen2, qwen3)."""
    D, H = _require(hf, "hidden_size"), _require(hf, "num_attention_heads")
    return dict(
        vocab_size=_require(hf, "vocab_size"), hidden_size=D, intermediate_size=_require(hf, "intermediate_size"),
        num_layers=_require(hf, "num_hidden_layers"), num_heads=H,
        num_kv_heads=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim") or D // H,
        max_position_embeddings=_require(hf, "max_position_embeddings"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope=parse_rope(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), activation=hf.get("hidden_act", "silu"),
    )


def _llama(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    layer_types = hf.get("layer_types") or ()
    window = _effective_window(hf, hf.get("sliding_window"), "sliding_attention" in layer_types)
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                sliding_window=window)


def _mistral(hf: Mapping[str, Any]) -> dict[str, Any]:
    window = hf.get("sliding_window")
    return dict(_common(hf), sliding_window=_effective_window(hf, window, True))


def _qwen_window(hf: Mapping[str, Any]) -> int | None:
    if not hf.get("use_sliding_window", False):
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        sliding = int(hf.get("max_window_layers", 0)) < int(hf["num_hidden_layers"])
    else:
        sliding = "sliding_attention" in layer_types
    return _effective_window(hf, hf.get("sliding_window"), sliding)


def _qwen2(hf: Mapping[str, Any]) -> dict[str, Any]:
    return dict(_common(hf), qkv_bias=True, sliding_window=_qwen_window(hf))


def _qwen3(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return dict(_common(hf), qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=_qwen_window(hf))


# model_type -> parser of the HF dict into ModelConfig fields. Add a family here (+ a table in hf.py).
FAMILIES: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
}
