"""The decoder: embedding, L pre-norm blocks (attention with RoPE + GQA, gated MLP), final norm.

Parameter tree (paths as in `nnx.split(model)`; logical axes in brackets):
  embed_tokens/embedding                     [V, D]          (vocab, embed)
  layers/input_layernorm/weight              [L, D]          (layers, norm)
  layers/self_attn/{q,k,v}_proj/kernel       [L, D, H|K, Dh] (layers, embed, heads|kv_heads, head_dim)
  layers/self_attn/{q,k,v}_proj/bias         [L, H|K, Dh]    (qkv_bias only)
  layers/self_attn/o_proj/kernel             [L, H, Dh, D]   (layers, heads, head_dim, embed)
  layers/self_attn/o_proj/bias               [L, D]          (o_bias only)
  layers/self_attn/{q,k}_norm/weight         [L, Dh]         (qk_norm only)
  layers/post_attention_layernorm/weight     [L, D]
  layers/mlp/{gate,up}_proj/kernel           [L, D, F]       (layers, embed, mlp); down_proj [L, F, D]
  norm/weight                                [D]
  lm_head/weight                             [V, D]          (vocab, embed; untied models only)

Remat policies (`remat=`), applied per block:
  "none"      no rematerialization (fastest, most memory)
  "full"      save only each block's input; recompute everything in the backward pass
  "dots"      save matmul outputs without batch dims (the weight projections); recompute attention
              scores/softmax and elementwise ops (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  "dots_all"  save every matmul output including attention scores [B, H, T, T] (checkpoint_dots)
  "qkv"       save only the q/k/v projections and the attention context; recompute the MLP
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dpojax.models.attention import attend, resolve_attention
from dpojax.models.config import ModelConfig
from dpojax.models.layers import Dense, GatedMLP, RMSNorm, apply_rope, make_param, rope_cos_sin, rope_frequencies
from dpojax.sharding import Sharder, constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
    "qkv": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "context"),
}

ACT = ("batch", "length", "embed")


class SelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, attention: str, dtype, param_dtype, sharder: Sharder | None,
                 rngs: nnx.Rngs):
        D, H, K, Dh, L = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
        kw = dict(dtype=dtype, param_dtype=param_dtype, num_layers=L, rngs=rngs)
        self.attention, self.sharder, self.scale = attention, sharder, Dh**-0.5
        self.q_proj = Dense((D,), (H, Dh), in_axes=("embed",), out_axes=("heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Dense((D,), (K, Dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Dense((D,), (K, Dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Dense((H, Dh), (D,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                            use_bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(Dh, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, num_layers=L, rngs=rngs)
            self.k_norm = RMSNorm(Dh, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, num_layers=L, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x_BxTxD, cos_BxTxDh, sin_BxTxDh, segment_ids_BxT):
        q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh = self.q_proj(x_BxTxD), self.k_proj(x_BxTxD), self.v_proj(x_BxTxD)
        if self.q_norm is not None:
            q_BxTxHxDh, k_BxTxKxDh = self.q_norm(q_BxTxHxDh), self.k_norm(k_BxTxKxDh)
        q_BxTxHxDh = apply_rope(q_BxTxHxDh, cos_BxTxDh, sin_BxTxDh)
        k_BxTxKxDh = apply_rope(k_BxTxKxDh, cos_BxTxDh, sin_BxTxDh)
        q_BxTxHxDh = checkpoint_name(constrain(q_BxTxHxDh, self.sharder, ("batch", "length", "heads", "head_dim")),
                                     "query")
        k_BxTxKxDh = checkpoint_name(constrain(k_BxTxKxDh, self.sharder, ("batch", "length", "kv_heads", "head_dim")),
                                     "key")
        v_BxTxKxDh = checkpoint_name(constrain(v_BxTxKxDh, self.sharder, ("batch", "length", "kv_heads", "head_dim")),
                                     "value")
        out_BxTxHxDh = attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT,
                              implementation=self.attention, scale=self.scale)
        out_BxTxHxDh = checkpoint_name(out_BxTxHxDh, "context")
        return self.o_proj(out_BxTxHxDh)


class Block(nnx.Module):
    """One pre-norm decoder block. Built with stacked [L, ...] params; called on one layer's slice."""

    def __init__(self, cfg: ModelConfig, *, attention: str, dtype, param_dtype, sharder: Sharder | None,
                 rngs: nnx.Rngs):
        L, D = cfg.num_layers, cfg.hidden_size
        norm_kw = dict(eps=cfg.norm_eps, offset=cfg.norm_offset, dtype=dtype, param_dtype=param_dtype,
                       num_layers=L, rngs=rngs)
        self.sharder = sharder
        self.input_layernorm = RMSNorm(D, **norm_kw)
        self.self_attn = SelfAttention(cfg, attention=attention, dtype=dtype, param_dtype=param_dtype,
                                       sharder=sharder, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(D, **norm_kw)
        self.mlp = GatedMLP(D, cfg.intermediate_size, use_bias=cfg.mlp_bias, activation=cfg.activation,
                            dtype=dtype, param_dtype=param_dtype, num_layers=L, rngs=rngs)

    def __call__(self, x_BxTxD, cos_BxTxDh, sin_BxTxDh, segment_ids_BxT):
        h_BxTxD = x_BxTxD + self.self_attn(self.input_layernorm(x_BxTxD), cos_BxTxDh, sin_BxTxDh, segment_ids_BxT)
        h_BxTxD = constrain(h_BxTxD, self.sharder, ACT)
        out_BxTxD = h_BxTxD + self.mlp(self.post_attention_layernorm(h_BxTxD))
        return constrain(out_BxTxD, self.sharder, ACT)


class Embed(nnx.Module):
    def __init__(self, V: int, D: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = make_param(rngs, (V, D), ("vocab", "embed"), init="normal", param_dtype=param_dtype)

    def __call__(self, ids_BxT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids_BxT, axis=0).astype(self.dtype)


class LMHead(nnx.Module):
    def __init__(self, V: int, D: int, *, param_dtype, rngs: nnx.Rngs):
        self.weight = make_param(rngs, (V, D), ("vocab", "embed"), init="normal", param_dtype=param_dtype)


class Decoder(nnx.Module):
    """`model(input_ids_BxT, positions_BxT, segment_ids_BxT) -> hidden_BxTxD` (final-normed hidden states).

    segment_ids: 0 = padding, > 0 = segment; attention is causal within equal segment ids.
    `unembedding()` -> [V, D] (the tied table or lm_head); `logits(hidden)` -> [B, T, V] in fp32 (tests).
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "auto",
                 remat: str = "none", scan_layers: bool = True, sharder: Sharder | None = None, rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        self.cfg, self.dtype, self.remat, self.scan_layers, self.sharder = cfg, dtype, remat, scan_layers, sharder
        self.attention = resolve_attention(attention, dtype=dtype, head_dim=cfg.head_dim)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = Embed(V, D, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = Block(cfg, attention=self.attention, dtype=dtype, param_dtype=param_dtype, sharder=sharder,
                            rngs=rngs)
        self.norm = RMSNorm(D, eps=cfg.norm_eps, offset=cfg.norm_offset, dtype=dtype, param_dtype=param_dtype,
                            num_layers=None, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LMHead(V, D, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids_BxT: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
        self.cfg.check_seq_len(input_ids_BxT.shape[1])
        inv_freq, scale = rope_frequencies(self.cfg.rope, self.cfg.head_dim, self.cfg.max_position_embeddings)
        cos_BxTxDh, sin_BxTxDh = rope_cos_sin(positions_BxT, inv_freq, scale, self.dtype)
        x_BxTxD = constrain(self.embed_tokens(input_ids_BxT), self.sharder, ACT)
        x_BxTxD = self._run_layers(x_BxTxD, cos_BxTxDh, sin_BxTxDh, segment_ids_BxT)
        return constrain(self.norm(x_BxTxD), self.sharder, ACT)

    def _run_layers(self, x_BxTxD, cos_BxTxDh, sin_BxTxDh, segment_ids_BxT):
        graphdef, stacked = nnx.split(self.layers)

        def body(h_BxTxD, layer_state):
            return nnx.merge(graphdef, layer_state)(h_BxTxD, cos_BxTxDh, sin_BxTxDh, segment_ids_BxT), None

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:
            x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, stacked)
            return x_BxTxD
        for i in range(self.cfg.num_layers):
            x_BxTxD, _ = body(x_BxTxD, jax.tree.map(functools.partial(_take, i=i), stacked))
        return x_BxTxD

    def unembedding(self) -> jax.Array:
        """The output embedding [V, D] (the input table when tied)."""
        return (self.embed_tokens.embedding if self.lm_head is None else self.lm_head.weight)[...]

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Full logits [B, T, V] in fp32 (tests and small evals only: the trainer never builds these)."""
        W_VxD = self.unembedding()
        return jnp.einsum("btd,vd->btv", hidden_BxTxD.astype(self.dtype), W_VxD.astype(self.dtype),
                          preferred_element_type=jnp.float32)


def _take(x: jax.Array, i: int) -> jax.Array:
    return x[i]
