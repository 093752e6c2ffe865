"""`MoEMLP`: the mixture-of-experts MLP of a decoder block (used instead of the dense MLP when cfg.num_experts > 0).

Parameters (stacked over layers like every block parameter; logical axes in brackets):
  router/kernel                     [L, D, X]     (layers, embed, router)      + bias [L, X] with cfg.router_bias
  experts/{gate_proj,up_proj}       [L, X, D, F]  (layers, expert, embed, mlp)
  experts/down_proj                 [L, X, F, D]  (layers, expert, mlp, embed)
  experts/{gate,up}_proj_bias       [L, X, F]     (layers, expert, mlp)         cfg.mlp_bias only
  experts/down_proj_bias            [L, X, D]     (layers, expert, embed)       cfg.mlp_bias only
  shared_expert/{gate,up,down}_proj/kernel        a GatedMLP of width cfg.shared_expert_size (qwen2_moe)
  shared_expert_gate/kernel         [L, D, 1]     (layers, embed, router)       its sigmoid gate

y = sum over the token's Y routed experts of weight * expert(x) [+ sigmoid(x @ shared_gate) * shared_expert(x)].
Routing and the dropless expert computation are the pure functions of `dpojax.models.experts`.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from dpojax.models import expert_parallel, experts
from dpojax.models.config import ModelConfig
from dpojax.models.layers import Dense, GatedMLP, make_param
from dpojax.sharding import Sharder


class Router(nnx.Module):
    """The router's parameters: kernel [D, X] (+ bias [X]); scored by `experts.route`."""

    def __init__(self, D: int, X: int, *, use_bias: bool, param_dtype, num_layers: int | None, rngs: nnx.Rngs):
        self.kernel = make_param(rngs, (D, X), ("embed", "router"), init="normal", param_dtype=param_dtype,
                                 num_layers=num_layers)
        self.bias = (make_param(rngs, (X,), ("router",), init="zeros", param_dtype=param_dtype,
                                num_layers=num_layers) if use_bias else None)


class Experts(nnx.Module):
    """X gated MLPs of width F, stored stacked: gate/up [X, D, F], down [X, F, D] (+ per-expert biases)."""

    def __init__(self, D: int, X: int, F: int, *, use_bias: bool, param_dtype, num_layers: int | None,
                 rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, num_layers=num_layers)
        self.gate_proj = make_param(rngs, (X, D, F), ("expert", "embed", "mlp"), init="normal", **kw)
        self.up_proj = make_param(rngs, (X, D, F), ("expert", "embed", "mlp"), init="normal", **kw)
        self.down_proj = make_param(rngs, (X, F, D), ("expert", "mlp", "embed"), init="normal", **kw)
        if use_bias:
            self.gate_proj_bias = make_param(rngs, (X, F), ("expert", "mlp"), init="zeros", **kw)
            self.up_proj_bias = make_param(rngs, (X, F), ("expert", "mlp"), init="zeros", **kw)
            self.down_proj_bias = make_param(rngs, (X, D), ("expert", "embed"), init="zeros", **kw)
        else:
            self.gate_proj_bias = self.up_proj_bias = self.down_proj_bias = None

    def weights(self) -> experts.ExpertWeights:
        def value(p):
            return None if p is None else p[...]

        return experts.ExpertWeights(self.gate_proj[...], self.up_proj[...], self.down_proj[...],
                                     value(self.gate_proj_bias), value(self.up_proj_bias), value(self.down_proj_bias))


class MoEMLP(nnx.Module):
    """`(x_BxTxD, token_weights_BxT) -> (y_BxTxD, experts.RouterStats)` (module docstring)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, num_layers: int | None, rngs: nnx.Rngs,
                 sharder: Sharder | None = None, grouped: str | None = None):
        # sharder: a mesh with expert > 1 runs the experts as expert_parallel.expert_ffn_sharded; grouped: the
        # grouped-matmul kernel (experts.grouped_kernel; None: this host's backend's)
        self.sharder, self.grouped = sharder, grouped
        D, X, F = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate_size
        self.dtype, self.activation = dtype, cfg.activation
        self.top_k, self.rule, self.norm_topk_prob = cfg.experts_per_token, cfg.router_rule, cfg.norm_topk_prob
        self.router = Router(D, X, use_bias=cfg.router_bias, param_dtype=param_dtype, num_layers=num_layers,
                             rngs=rngs)
        self.experts = Experts(D, X, F, use_bias=cfg.mlp_bias, param_dtype=param_dtype, num_layers=num_layers,
                               rngs=rngs)
        if cfg.shared_expert_size:
            kw = dict(dtype=dtype, param_dtype=param_dtype, num_layers=num_layers, rngs=rngs)
            self.shared_expert = GatedMLP(D, cfg.shared_expert_size, use_bias=False, activation=cfg.activation, **kw)
            self.shared_expert_gate = Dense((D,), (1,), in_axes=("embed",), out_axes=("router",), use_bias=False,
                                            **kw)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def __call__(self, x_BxTxD: jax.Array, token_weights_BxT: jax.Array) -> tuple[jax.Array, experts.RouterStats]:
        B, T, D = x_BxTxD.shape
        x_BTxD = x_BxTxD.astype(self.dtype).reshape(B * T, D)
        bias = None if self.router.bias is None else self.router.bias[...]
        routing = experts.route(x_BTxD, self.router.kernel[...], bias, top_k=self.top_k, rule=self.rule,
                                norm_topk_prob=self.norm_topk_prob)
        ffn = (experts.expert_ffn if self.sharder is None or self.sharder.experts == 1 else
               functools.partial(expert_parallel.expert_ffn_sharded, sharder=self.sharder))
        y_BTxD = ffn(x_BTxD, routing, self.experts.weights(), activation=self.activation, dtype=self.dtype,
                     kernel=self.grouped)
        y_BxTxD = y_BTxD.reshape(B, T, D)
        if self.shared_expert is not None:
            gate_BxTx1 = jax.nn.sigmoid(self.shared_expert_gate(x_BxTxD))
            y_BxTxD = y_BxTxD + gate_BxTx1 * self.shared_expert(x_BxTxD)
        return y_BxTxD, experts.router_stats(routing, token_weights_BxT.reshape(B * T))

