"""`ModelConfig`: the architecture of a decoder-only LM, read from a Hugging Face `config.json` dict.

One `ModelConfig` describes every supported family with a few named options (norm kind, MLP kind, position
encoding, residual layout, biases, q/k norm, soft-caps, per-layer sliding windows). A family is one module in
`dpojax.models.families`: a parser from the HF dict to these options plus one weight-name mapping table.
The shared decoder (`transformer.py`) understands the options; no family has code paths of its own.

Dimension letters: the one glossary of `dpojax.glossary` (B sequences, T positions, D width, F MLP width,
H query heads, G kv heads, R = H / G, Dh head width, Dr rotated dims of a head, V vocabulary, L layers,
X experts of an MoE layer, Y experts each token is routed to).

Mixture of experts (`num_experts` > 0): every block's MLP is an `MoEMLP` (`dpojax.models.moe`) of X gated experts of
width `expert_intermediate_size`, each token routed to Y = `experts_per_token` of them by `router_rule`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dpojax.errors import ModelError
from dpojax.models.families import FAMILIES, unsupported_model_type
from dpojax.models.rope_config import RopeConfig

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # gelu = exact (erf); gelu_tanh = tanh approximation
EXPERT_ACTIVATIONS = ("gpt_oss",)  # MoE experts only: gpt-oss's clamped SwiGLU (dpojax.models.experts)
NORMS = ("rms", "layer")
MLPS = ("gated", "plain")
POSITIONS = ("rope", "learned")
ROUTER_RULES = ("softmax_topk", "topk_softmax")  # dpojax.models.experts.route


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only model. Hashable (the HF dict is kept but not compared)."""

    family: str  # HF model_type, a key of dpojax.models.families.FAMILIES
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # G (H % G == 0)
    head_dim: int  # Dh (may differ from D // H)
    max_position_embeddings: int  # longest context the model was configured for (P for learned positions)
    norm_eps: float = 1e-6  # norm epsilon
    rope: RopeConfig = RopeConfig()
    rotary_dim: int | None = None  # Dr: leading dims of each head that RoPE rotates (NeoX rotary_pct); None = Dh
    local_rope: RopeConfig | None = None  # RoPE of the sliding-window layers when it differs (gemma3)
    tie_embeddings: bool = False  # lm_head shares the embedding table
    qkv_bias: bool = False  # biases on q/k/v projections
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # biases on the MLP projections
    qk_norm: bool = False  # RMSNorm over Dh on q and k before RoPE (qwen3, gemma3)
    activation: str = "silu"  # MLP activation, one of ACTIVATIONS
    norm: str = "rms"  # "rms" | "layer" (LayerNorm with bias: GPT-2, NeoX)
    norm_offset: float = 0.0  # RMSNorm scale = offset + weight (Gemma: 1.0)
    mlp: str = "gated"  # "gated" = down(act(gate(x)) * up(x)); "plain" = down(act(up(x)))
    position: str = "rope"  # "rope" | "learned" (absolute position table added to the embeddings: GPT-2)
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX use_parallel_residual)
    sandwich_norms: bool = False  # also norm the attention and MLP outputs (gemma2/3)
    embed_scale: bool = False  # embeddings times sqrt(D), in the compute dtype (gemma)
    query_scale: float | None = None  # attention score scale; None = Dh ** -0.5 (gemma2/3: query_pre_attn_scalar)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (gemma2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (gemma2); the log-prob head applies it
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window (keys with q - k < w) or None; () = none
    attention_sinks: bool = False  # a learned logit per query head joins each softmax denominator (gpt-oss)
    num_experts: int = 0  # X: experts of each MoE layer; 0 = a dense MLP in every block
    experts_per_token: int = 0  # Y: experts each token is routed to (top-k)
    expert_intermediate_size: int = 0  # F of each expert
    router_rule: str = "softmax_topk"  # one of ROUTER_RULES (dpojax.models.experts.route)
    norm_topk_prob: bool = False  # softmax_topk: renormalize the top-k probabilities to sum to 1
    router_bias: bool = False  # a bias on the router's logits
    shared_expert_size: int = 0  # width of the always-on shared expert with its sigmoid gate (qwen2_moe); 0 = none
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss (config.json; used by the trainer)
    output_router_logits: bool = False  # config.json's switch for that loss in transformers
    hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def rotary_dims(self) -> int:
        """Dr: rotated dims per head."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def windows(self) -> tuple[int | None, ...]:
        """One entry per layer: the sliding window, or None for global attention."""
        return self.layer_windows or (None,) * self.num_layers

    @property
    def has_sliding_window(self) -> bool:
        return any(w is not None for w in self.windows)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def active_mlp_width(self) -> int:
        """F summed over the MLPs one token runs through: the dense MLP, or the Y routed experts and the shared
        expert of an MoE block."""
        if not self.is_moe:
            return self.intermediate_size
        return self.experts_per_token * self.expert_intermediate_size + self.shared_expert_size

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5 if self.query_scale is None else self.query_scale

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from a HF `config.json` dict; raises ModelError for anything not supported."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ModelError(unsupported_model_type(model_type))
        fields = FAMILIES[model_type].parse(hf)
        cfg = cls(family=model_type, hf_config=dict(hf), **fields)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})."
            )
        if self.position == "rope" and (self.rotary_dims % 2 or not 0 < self.rotary_dims <= self.head_dim):
            raise ModelError(f"rotary dims ({self.rotary_dims}) must be even and in 2..head_dim ({self.head_dim}).")
        allowed = ACTIVATIONS + (EXPERT_ACTIVATIONS if self.is_moe else ())
        if self.activation not in allowed:
            raise ModelError(f"hidden_act {self.activation!r} is not supported; supported: {', '.join(allowed)}.")
        for name, value, allowed in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                     ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ModelError(f"{name}={value!r} is not implemented; implemented: {', '.join(allowed)}.")
        if self.parallel_residual and self.sandwich_norms:
            raise ModelError("parallel residual blocks with sandwich (output) norms are not supported.")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ModelError(f"{len(self.layer_windows)} layer windows given for {self.num_layers} layers.")
        if any(w is not None and w < 1 for w in self.layer_windows):
            raise ModelError(f"sliding windows must be positive, got {self.layer_windows}.")
        self._validate_moe()
        longrope = [r for r in (self.rope, self.local_rope) if r is not None and r.type == "longrope"]
        for r in longrope:
            if r.short_factor is None or r.long_factor is None or r.original_max_position_embeddings is None:
                raise ModelError("RoPE type 'longrope' needs short_factor, long_factor and "
                                 "original_max_position_embeddings.")
            if not len(r.short_factor) == len(r.long_factor) == self.rotary_dims // 2:
                raise ModelError(f"longrope short/long factors must have {self.rotary_dims // 2} entries "
                                 f"(rotary dims / 2), got {len(r.short_factor)} and {len(r.long_factor)}.")

    def _validate_moe(self) -> None:
        if not self.is_moe:
            return
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ModelError(f"experts per token ({self.experts_per_token}) must be in 1..num_experts "
                             f"({self.num_experts}).")
        if self.expert_intermediate_size <= 0:
            raise ModelError(f"the experts' intermediate size must be positive, got {self.expert_intermediate_size}.")
        if self.router_rule not in ROUTER_RULES:
            raise ModelError(f"router rule {self.router_rule!r} is not implemented; implemented: "
                             f"{', '.join(ROUTER_RULES)}.")
        if self.mlp != "gated":
            raise ModelError("mixture-of-experts layers are implemented for gated MLPs only.")

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ModelError when a sequence of `seq_len` would need a feature we do not implement."""
        if self.position == "learned" and seq_len > self.max_position_embeddings:
            raise ModelError(
                f"{self.family} has {self.max_position_embeddings} learned positions; sequences of {seq_len} tokens "
                f"do not fit; use max_length <= {self.max_position_embeddings}."
            )
        if self.rope.type == "dynamic" and seq_len > self.max_position_embeddings:
            raise ModelError(
                f"dynamic RoPE scaling changes beyond max_position_embeddings ({self.max_position_embeddings}); "
                f"sequences of {seq_len} tokens are not supported; use max_length <= {self.max_position_embeddings}."
            )

    # ---- sizes -------------------------------------------------------------------------------------
    def _layer_params(self, *, active: bool = False) -> tuple[int, int]:
        """(matmul weights, other params) of one block; `active`: an MoE block counts only the Y experts a token
        runs through (plus the router and the shared expert)."""
        D, H, G, Dh = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        matmul = D * H * Dh + 2 * D * G * Dh + H * Dh * D
        norm_size = D * (2 if self.norm == "layer" else 1)  # LayerNorm has a bias
        other = norm_size * (4 if self.sandwich_norms else 2)
        other += (H + 2 * G) * Dh if self.qkv_bias else 0
        other += D if self.o_bias else 0
        other += 2 * Dh if self.qk_norm else 0
        other += H if self.attention_sinks else 0
        mlp_matmul, mlp_other = self._mlp_params(active)
        return matmul + mlp_matmul, other + mlp_other

    def _mlp_params(self, active: bool) -> tuple[int, int]:
        """(matmul weights, other params) of one block's MLP (dense or MoE)."""
        D, F = self.hidden_size, self.intermediate_size
        mlp_mats = 3 if self.mlp == "gated" else 2
        if not self.is_moe:
            return mlp_mats * D * F, ((mlp_mats - 1) * F + D if self.mlp_bias else 0)
        experts = self.experts_per_token if active else self.num_experts
        Fe, Fs = self.expert_intermediate_size, self.shared_expert_size
        matmul = D * self.num_experts + experts * 3 * D * Fe  # router + experts
        matmul += 3 * D * Fs + D if Fs else 0  # shared expert and its gate
        other = self.num_experts if self.router_bias else 0
        other += experts * (2 * Fe + D) if self.mlp_bias else 0
        return matmul, other

    def num_params(self, *, active: bool = False) -> int:
        """Number of parameters (the tied table counted once); every expert counted unless `active`."""
        matmul, other = self._layer_params(active=active)
        D = self.hidden_size
        embeddings = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        positions = self.max_position_embeddings * D if self.position == "learned" else 0
        final_norm = D * (2 if self.norm == "layer" else 1)
        return embeddings + positions + self.num_layers * (matmul + other) + final_norm

    def active_params(self) -> int:
        """Parameters one token runs through: `num_params()` less the experts it is not routed to (equal to
        num_params() for dense models)."""
        return self.num_params(active=True)

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 per matmul weight a token runs through (lm_head included, embedding lookups
        free; an MoE layer's router, its Y active experts and its shared expert) plus attention scores and
        context, 4 * H * Dh * keys per layer, keys = T (full T x T, no causal discount, as in PaLM's MFU) or the
        sliding window when shorter."""
        matmul, _ = self._layer_params(active=True)
        n_matmul = self.num_layers * matmul + self.vocab_size * self.hidden_size
        keys = sum(seq_len if w is None else min(w, seq_len) for w in self.windows)
        attention = 4 * self.num_heads * self.head_dim * keys
        return float(2 * n_matmul + attention)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 * N_matmul + 12 * H * Dh * sum(keys)."""
        return 3.0 * self.forward_flops_per_token(seq_len)
