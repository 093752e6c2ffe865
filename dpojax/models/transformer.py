"""The decoder: embeddings, L blocks (attention with RoPE + GQA, MLP), final norm, for every family.

Parameter tree (paths as in `nnx.split(model)`; logical axes in brackets; optional parts in parentheses):
  embed_tokens/embedding                     [V, D]          (vocab, embed)
  embed_positions/embedding                  [T_max, D]      (length, embed)          learned positions (GPT-2)
  layers/input_layernorm/{weight,bias}       [L, D]          (layers, norm)           bias: LayerNorm only
  layers/self_attn/{q,k,v}_proj/kernel       [L, D, H|G, Dh] (layers, embed, heads|kv_heads, head_dim)
  layers/self_attn/{q,k,v}_proj/bias         [L, H|G, Dh]    (qkv_bias only)
  layers/self_attn/o_proj/kernel             [L, H, Dh, D]   (layers, heads, head_dim, embed)
  layers/self_attn/o_proj/bias               [L, D]          (o_bias only)
  layers/self_attn/{q,k}_norm/weight         [L, Dh]         (qk_norm only)
  layers/self_attn/sinks                     [L, H]          (layers, heads)          attention_sinks only (gpt-oss)
  layers/attn_output_norm/weight             [L, D]          (sandwich_norms: norm of the attention output)
  layers/post_attention_layernorm/{weight,bias} [L, D]       the norm before the MLP (Llama's name)
  layers/mlp/{gate,up}_proj/kernel           [L, D, F]       (layers, embed, mlp); gate: gated MLP only
  layers/mlp/down_proj/kernel                [L, F, D]       (+ bias [L, F] / [L, D] with mlp_bias)
  layers/mlp/router/kernel, layers/mlp/experts/..., (layers/mlp/shared_expert...)
                                             an MoE block's MLP instead (num_experts > 0): `dpojax.models.moe`
  layers/mlp_output_norm/weight              [L, D]          (sandwich_norms: norm of the MLP output)
  norm/{weight,bias}                         [D]
  lm_head/weight                             [V, D]          (vocab, embed; untied models only)

Block: a = attn(norm1(x)) [-> attn_output_norm];  parallel residual: x + a + mlp(norm2(x));
otherwise h = x + a, h + mlp(norm2(h)) [-> mlp_output_norm]. What differs between layers (sliding window,
which RoPE table) is per-layer DATA scanned together with the stacked parameters, never a code path.

Remat policies (`remat=`), applied per block:
  "none"      no rematerialization (fastest, most memory)
  "full"      save only each block's input; recompute everything in the backward pass
  "dots"      save matmul outputs without batch dims (the weight projections: every Dense output, named
              layers.DENSE_OUTPUT as its custom_vjp hides the dot); recompute attention scores/softmax and
              elementwise ops (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  "dots_all"  save every matmul output including attention scores [B, H, T, T] (checkpoint_dots)
  "qkv"       save only the q/k/v projections and the attention context; recompute the MLP
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dpojax.models import context as context_lib
from dpojax.models.attention import attend, resolve_attention
from dpojax.models.config import ModelConfig
from dpojax.models.experts import RouterStats
from dpojax.models.kv_cache import KVCache, LayerCache, attend_cached
from dpojax.models.layers import DENSE_OUTPUT, Dense, RMSNorm, apply_rope, make_mlp, make_norm, make_param, rope_tables
from dpojax.models.moe import MoEMLP
from dpojax.sharding import Sharder, constrain

_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable,
                                              _policies.save_only_these_names(DENSE_OUTPUT)),
    "dots_all": _policies.save_from_both_policies(_policies.checkpoint_dots,
                                                  _policies.save_only_these_names(DENSE_OUTPUT)),
    "qkv": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "context"),
}
REMAT_NAMES = tuple(REMAT_POLICIES)  # model.remat's allowed values

ACT = ("batch", "length", "embed")


class SelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, attention: str, dtype, param_dtype, sharder: Sharder | None,
                 rngs: nnx.Rngs):
        D, H, G, Dh, L = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
        # rows split over `context`: the projections keep their [B, T] row axes apart (`dense_matmul`)
        kw = dict(dtype=dtype, param_dtype=param_dtype, num_layers=L, rngs=rngs,
                  keep_rows=sharder is not None and sharder.context > 1)
        self.attention, self.sharder, self.scale, self.softcap = attention, sharder, cfg.attention_scale, \
            cfg.attn_softcap
        self.q_proj = Dense((D,), (H, Dh), in_axes=("embed",), out_axes=("heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Dense((D,), (G, Dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Dense((D,), (G, Dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Dense((H, Dh), (D,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                            use_bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            norm_kw = dict(eps=cfg.norm_eps, offset=cfg.norm_offset, dtype=dtype, param_dtype=param_dtype,
                           num_layers=L, rngs=rngs)
            self.q_norm, self.k_norm = RMSNorm(Dh, **norm_kw), RMSNorm(Dh, **norm_kw)
        else:
            self.q_norm = self.k_norm = None
        self.sinks = (make_param(rngs, (H,), ("heads",), init="normal", param_dtype=param_dtype, num_layers=L)
                      if cfg.attention_sinks else None)
        self.context = sharder is not None and sharder.context > 1  # rows in zig-zag order over `context`

    def __call__(self, x_BxTxD, rope_cos_sin, segment_ids_BxT, window, packed=None,
                 cache: LayerCache | None = None):
        """rope_cos_sin: (cos, sin) [B, T, Dr] or None (learned positions); window: int32 scalar or None;
        packed: None, or the packed-row mask arguments of `attend` (branch_ids_BxT, positions_BxT, band).
        With a KV `cache` (decoding): attends through it and returns (out, updated cache)."""
        q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh = self.q_proj(x_BxTxD), self.k_proj(x_BxTxD), self.v_proj(x_BxTxD)
        if self.q_norm is not None:
            q_BxTxHxDh, k_BxTxGxDh = self.q_norm(q_BxTxHxDh), self.k_norm(k_BxTxGxDh)
        if rope_cos_sin is not None:
            q_BxTxHxDh = apply_rope(q_BxTxHxDh, *rope_cos_sin)
            k_BxTxGxDh = apply_rope(k_BxTxGxDh, *rope_cos_sin)
        q_BxTxHxDh = checkpoint_name(constrain(q_BxTxHxDh, self.sharder, ("batch", "length", "heads", "head_dim")),
                                     "query")
        k_BxTxGxDh = checkpoint_name(constrain(k_BxTxGxDh, self.sharder, ("batch", "length", "kv_heads", "head_dim")),
                                     "key")
        v_BxTxGxDh = checkpoint_name(constrain(v_BxTxGxDh, self.sharder, ("batch", "length", "kv_heads", "head_dim")),
                                     "value")
        sinks_H = None if self.sinks is None else self.sinks[...]
        if cache is not None:
            out_BxTxHxDh, cache = attend_cached(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, cache, scale=self.scale,
                                                implementation=self.attention, softcap=self.softcap, window=window,
                                                sharder=self.sharder, sinks_H=sinks_H)
            return self.o_proj(out_BxTxHxDh), cache
        if self.context:
            packed = packed or {}
            out_BxTxHxDh = context_lib.attend_context(
                q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT, sharder=self.sharder,
                implementation=self.attention, scale=self.scale, softcap=self.softcap, window=window,
                positions_BxT=packed.get("positions_BxT"), branch_ids_BxT=packed.get("branch_ids_BxT"), sinks_H=sinks_H)
            return self.o_proj(checkpoint_name(out_BxTxHxDh, "context"))
        out_BxTxHxDh = attend(q_BxTxHxDh, k_BxTxGxDh, v_BxTxGxDh, segment_ids_BxT, implementation=self.attention,
                              scale=self.scale, softcap=self.softcap, window=window, sharder=self.sharder,
                              sinks_H=sinks_H, **(packed or {}))
        out_BxTxHxDh = checkpoint_name(out_BxTxHxDh, "context")
        return self.o_proj(out_BxTxHxDh)


class Block(nnx.Module):
    """One decoder block (layout in the module docstring). Built with stacked [L, ...] params; called on one
    layer's slice."""

    def __init__(self, cfg: ModelConfig, *, attention: str, dtype, param_dtype, sharder: Sharder | None,
                 rngs: nnx.Rngs, grouped: str | None = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, num_layers=cfg.num_layers, rngs=rngs)
        D = cfg.hidden_size
        self.sharder, self.parallel_residual, self.is_moe = sharder, cfg.parallel_residual, cfg.is_moe
        self.input_layernorm = make_norm(cfg, D, **kw)
        self.self_attn = SelfAttention(cfg, attention=attention, dtype=dtype, param_dtype=param_dtype,
                                       sharder=sharder, rngs=rngs)
        self.attn_output_norm = make_norm(cfg, D, **kw) if cfg.sandwich_norms else None
        self.post_attention_layernorm = make_norm(cfg, D, **kw)
        context = sharder is not None and sharder.context > 1  # rows split over `context`: `dense_matmul`
        self.mlp = (MoEMLP(cfg, sharder=sharder, grouped=grouped, **kw) if cfg.is_moe
                    else make_mlp(cfg, keep_rows=context, **kw))
        self.mlp_output_norm = make_norm(cfg, D, **kw) if cfg.sandwich_norms else None

    def __call__(self, x_BxTxD, rope_cos_sin, segment_ids_BxT, window, packed=None,
                 cache: LayerCache | None = None, token_weights_BxT=None):
        """-> (out [B, T, D], RouterStats of an MoE block or None); with a KV `cache` (decoding) -> (out, updated
        cache). token_weights_BxT: the router statistics' weight of each token (0 on padding)."""
        if cache is not None:
            a_BxTxD, cache = self.self_attn(self.input_layernorm(x_BxTxD), rope_cos_sin, None, window, cache=cache)
            return self._residual(x_BxTxD, a_BxTxD, None)[0], cache
        a_BxTxD = self.self_attn(self.input_layernorm(x_BxTxD), rope_cos_sin, segment_ids_BxT, window, packed)
        return self._residual(x_BxTxD, a_BxTxD, token_weights_BxT)

    def _mlp(self, x_BxTxD, token_weights_BxT) -> tuple[jax.Array, RouterStats | None]:
        if not self.is_moe:
            return self.mlp(x_BxTxD), None
        if token_weights_BxT is None:
            token_weights_BxT = jnp.ones(x_BxTxD.shape[:2], jnp.float32)
        return self.mlp(x_BxTxD, token_weights_BxT)

    def _residual(self, x_BxTxD, a_BxTxD, token_weights_BxT):
        """The rest of the block after attention: output norm, MLP and the residual layout -> (out, stats)."""
        if self.attn_output_norm is not None:
            a_BxTxD = self.attn_output_norm(a_BxTxD)
        if self.parallel_residual:
            m_BxTxD, stats = self._mlp(self.post_attention_layernorm(x_BxTxD), token_weights_BxT)
            return constrain(m_BxTxD + a_BxTxD + x_BxTxD, self.sharder, ACT), stats
        h_BxTxD = constrain(x_BxTxD + a_BxTxD, self.sharder, ACT)
        m_BxTxD, stats = self._mlp(self.post_attention_layernorm(h_BxTxD), token_weights_BxT)
        if self.mlp_output_norm is not None:
            m_BxTxD = self.mlp_output_norm(m_BxTxD)
        return constrain(h_BxTxD + m_BxTxD, self.sharder, ACT), stats


class Embed(nnx.Module):
    def __init__(self, V: int, D: int, *, dtype, param_dtype, rngs: nnx.Rngs, axes=("vocab", "embed")):
        self.dtype = dtype
        self.embedding = make_param(rngs, (V, D), axes, init="normal", param_dtype=param_dtype)

    def __call__(self, ids_BxT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids_BxT, axis=0).astype(self.dtype)


class LMHead(nnx.Module):
    def __init__(self, V: int, D: int, *, param_dtype, rngs: nnx.Rngs):
        self.weight = make_param(rngs, (V, D), ("vocab", "embed"), init="normal", param_dtype=param_dtype)


class Decoder(nnx.Module):
    """`model(input_ids_BxT, positions_BxT, segment_ids_BxT) -> hidden_BxTxD` (final-normed hidden states).

    segment_ids: 0 = padding, > 0 = segment; attention is causal within equal segment ids.
    `unembedding()` -> [V, D] (the tied table or lm_head); the logits are
    `final_softcap * tanh(hidden @ unembedding().T / final_softcap)` when `final_softcap` is set (Gemma 2),
    which the log-prob head applies (`token_logprobs(..., softcap=model.final_softcap)`);
    `logits(hidden)` -> [B, T, V] in fp32 (tests only).
    `forward(...)` -> (hidden, router statistics): for mixture-of-experts models the `RouterStats` of every layer
    stacked over layers (each field with a leading L axis), None for dense models.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "auto",
                 remat: str = "none", scan_layers: bool = True, sharder: Sharder | None = None,
                 grouped: str | None = None, rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        self.cfg, self.dtype, self.remat, self.scan_layers, self.sharder = cfg, dtype, remat, scan_layers, sharder
        self.final_softcap = cfg.final_softcap
        self.attention = resolve_attention(attention, dtype=dtype, head_dim=cfg.head_dim, softcap=cfg.attn_softcap,
                                           sliding_window=cfg.has_sliding_window, sinks=cfg.attention_sinks)
        self.context = 1 if sharder is None else sharder.context
        if self.context > 1:
            self.attention = context_lib.context_attention(attention, self.attention)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = Embed(V, D, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_positions = (Embed(cfg.max_position_embeddings, D, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs, axes=("length", "embed")) if cfg.position == "learned" else None)
        self.layers = Block(cfg, attention=self.attention, dtype=dtype, param_dtype=param_dtype, sharder=sharder,
                            rngs=rngs, grouped=grouped)
        self.norm = make_norm(cfg, D, dtype=dtype, param_dtype=param_dtype, num_layers=None, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LMHead(V, D, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids_BxT: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array,
                 branch_ids_BxT: jax.Array | None = None, band: int | None = None) -> jax.Array:
        """Packed rows (`dpojax.data.packing`): `band` (static) is the longest segment, `branch_ids_BxT` the shared-
        prompt branches (None for padding-free packing); positions then count within each sequence."""
        return self.forward(input_ids_BxT, positions_BxT, segment_ids_BxT, branch_ids_BxT, band)[0]

    def forward(self, input_ids_BxT: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array,
                branch_ids_BxT: jax.Array | None = None, band: int | None = None,
                token_weights_BxT: jax.Array | None = None) -> tuple[jax.Array, RouterStats | None]:
        """As `__call__`, -> (hidden, RouterStats stacked over layers, or None for dense models).
        token_weights_BxT: each token's weight in the router statistics (default: 1 where segment_ids > 0)."""
        T = input_ids_BxT.shape[1]
        self.cfg.check_seq_len(T if band is None else band)
        if token_weights_BxT is None and self.cfg.is_moe:
            token_weights_BxT = (segment_ids_BxT > 0).astype(jnp.float32)
        if self.context > 1:  # rows in zig-zag order, padded to 2 * context blocks (`dpojax.models.context`)
            length = context_lib.padded_length(T, self.context, self.attention)
            to = functools.partial(context_lib.to_context, C=self.context, length=length)
            input_ids_BxT, positions_BxT, segment_ids_BxT = to(input_ids_BxT), to(positions_BxT), to(segment_ids_BxT)
            branch_ids_BxT = None if branch_ids_BxT is None else to(branch_ids_BxT)
            token_weights_BxT = None if token_weights_BxT is None else to(token_weights_BxT)
        packed = None
        if band is not None:
            packed = {"branch_ids_BxT": branch_ids_BxT, "positions_BxT": positions_BxT, "band": band}
        x_BxTxD = self._embed(input_ids_BxT, positions_BxT)
        x_BxTxD, stats = self._run_layers(x_BxTxD, self._rope_tables(positions_BxT), segment_ids_BxT, packed,
                                          token_weights_BxT)
        x_BxTxD = self.norm(x_BxTxD)
        if self.context > 1:
            x_BxTxD = context_lib.from_context(x_BxTxD, self.context, T)
        return constrain(x_BxTxD, self.sharder, ACT), stats

    def _embed(self, input_ids_BxT, positions_BxT):
        x_BxTxD = self.embed_tokens(input_ids_BxT)
        if self.cfg.embed_scale:  # Gemma: sqrt(D) rounded to the compute dtype, as transformers does
            x_BxTxD = x_BxTxD * jnp.asarray(self.cfg.hidden_size**0.5, self.dtype)
        if self.embed_positions is not None:
            x_BxTxD = x_BxTxD + self.embed_positions(positions_BxT)
        return constrain(x_BxTxD, self.sharder, ACT)

    def decode(self, input_ids_BxT: jax.Array, positions_BxT: jax.Array, cache: KVCache,
               longest: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Incremental decoding (`dpojax.models.kv_cache`): T > 1 new tokens prefill the cache from slot 0, T = 1
        writes slot cache.index. -> (final-normed hidden [B, T, D], updated cache). `longest`: the longest
        sequence so far (picks LongRoPE's factors as transformers does; default: from the positions)."""
        x_BxTxD = self._embed(input_ids_BxT, positions_BxT)
        ropes = self._rope_tables(positions_BxT, longest)
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, xs):  # the whole cache is carried: each layer writes its new slots in place
            h_BxTxD, k_LxBxZxGxDh, v_LxBxZxGxDh = carry
            layer_state, data, layer = xs
            rope = None if ropes is None else (ropes[0][data.get("rope", 0)], ropes[1][data.get("rope", 0)])
            layer_cache = LayerCache(k_LxBxZxGxDh, v_LxBxZxGxDh, cache.start_B, cache.index, layer)
            h_BxTxD, layer_cache = nnx.merge(graphdef, layer_state)(h_BxTxD, rope, None, data.get("window"),
                                                                   cache=layer_cache)
            return (h_BxTxD, layer_cache.k_LxBxZxGxDh, layer_cache.v_LxBxZxGxDh), None

        xs = (stacked, self.layer_data(), jnp.arange(self.cfg.num_layers, dtype=jnp.int32))
        (x_BxTxD, k_LxBxZxGxDh, v_LxBxZxGxDh), _ = jax.lax.scan(
            body, (x_BxTxD, cache.k_LxBxZxGxDh, cache.v_LxBxZxGxDh), xs)
        T = input_ids_BxT.shape[1]
        index = cache.index + 1 if T == 1 else jnp.asarray(T, jnp.int32)  # the next slot to write
        new = KVCache(k_LxBxZxGxDh, v_LxBxZxGxDh, cache.start_B, index)
        return constrain(self.norm(x_BxTxD), self.sharder, ACT), new

    def _rope_tables(self, positions_BxT, longest=None):
        """(cos, sin), each [n_tables, B, T, Dr]: the global RoPE, then the local one when it differs; None
        without RoPE."""
        cfg = self.cfg
        if cfg.position != "rope":
            return None
        ropes = [cfg.rope] + ([cfg.local_rope] if cfg.local_rope is not None else [])
        tables = [rope_tables(r, cfg.rotary_dims, cfg.max_position_embeddings, positions_BxT, self.dtype,
                              longest=longest) for r in ropes]
        return jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])

    def layer_data(self) -> dict[str, jax.Array]:
        """Per-layer data scanned with the stacked params: `window` int32[L] (a huge value on global layers)
        and `rope` int32[L] (which RoPE table); only the entries this model needs."""
        cfg, data = self.cfg, {}
        if cfg.has_sliding_window:
            data["window"] = jnp.asarray([GLOBAL_WINDOW if w is None else w for w in cfg.windows], jnp.int32)
        if cfg.local_rope is not None:
            data["rope"] = jnp.asarray([0 if w is None else 1 for w in cfg.windows], jnp.int32)
        return data

    def _run_layers(self, x_BxTxD, ropes, segment_ids_BxT, packed=None, token_weights_BxT=None):
        """-> (x after the L blocks, RouterStats stacked over layers or None)."""
        graphdef, stacked = nnx.split(self.layers)

        def body(h_BxTxD, xs):
            layer_state, data = xs
            rope = None
            if ropes is not None:
                index = data.get("rope", 0)
                rope = (ropes[0][index], ropes[1][index])
            block = nnx.merge(graphdef, layer_state)
            return block(h_BxTxD, rope, segment_ids_BxT, data.get("window"), packed,
                         token_weights_BxT=token_weights_BxT)

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan_layers)
        xs = (stacked, self.layer_data())
        if self.scan_layers:
            return jax.lax.scan(body, x_BxTxD, xs)
        per_layer_states = unstack_layers(stacked, self.cfg.num_layers)
        stats = []
        for i, layer_state in enumerate(per_layer_states):
            data = jax.tree.map(functools.partial(_take, i=i), xs[1])
            x_BxTxD, layer_stats = body(x_BxTxD, (layer_state, data))
            stats.append(layer_stats)
        return x_BxTxD, (None if stats[0] is None else jax.tree.map(lambda *s: jnp.stack(s), *stats))

    def unembedding(self) -> jax.Array:
        """The output embedding [V, D] (the input table when tied)."""
        return (self.embed_tokens.embedding if self.lm_head is None else self.lm_head.weight)[...]

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Full logits [B, T, V] in fp32, soft-capped like the log-prob head (tests and small evals only: the
        trainer never builds these)."""
        W_VxD = self.unembedding()
        logits_BxTxV = jnp.einsum("btd,vd->btv", hidden_BxTxD.astype(self.dtype), W_VxD.astype(self.dtype),
                                  preferred_element_type=jnp.float32)
        if self.final_softcap is not None:
            logits_BxTxV = jnp.tanh(logits_BxTxV / self.final_softcap) * self.final_softcap
        return logits_BxTxV


GLOBAL_WINDOW = 2**30  # the window of a global layer: longer than any sequence


def _take(x: jax.Array, i: int) -> jax.Array:
    return x[i]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack_layers(stacked, num_layers: int) -> tuple:
    """The stacked [L, ...] parameters as L per-layer trees (static slices), for the unrolled layer loop. The
    backward stacks the L cotangents once: the plain transpose of each slice is a zero-padded [L, ...] copy of
    every parameter, summed over the layers (L full-size buffers). Each slice is a copy, unless the stacked array
    was itself stacked from per-layer arrays in the same program: the train step passes the policy's parameters
    that way (`dpojax.trainer.step.split_layers`), and XLA folds slice(stack) and its transpose away."""
    return tuple(jax.tree.map(functools.partial(_take, i=i), stacked) for i in range(num_layers))


def _unstack_fwd(stacked, num_layers):
    return unstack_layers(stacked, num_layers), None


def _unstack_bwd(num_layers, _, cotangents):
    return (jax.tree.map(lambda *layers: jnp.stack(layers), *cotangents),)


unstack_layers.defvjp(_unstack_fwd, _unstack_bwd)
