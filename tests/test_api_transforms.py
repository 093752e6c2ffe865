"""The public pure functions under JAX transforms, on a tiny Llama: `jax.grad` of `batch_loss` is the gradient
`train_step` applies (and matches a finite difference), `jax.vmap` of `train_step` over betas (several policies in
one jitted call) equals one run per beta step for step, `jax.jit` with explicit shardings on the 8-device mesh
equals one device, and a custom loss's non-finite value is skipped by the step's guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import make_pref_rows, make_tokenizer
from tolerances import fp32_tol

import dpojax

BETAS = (0.05, 0.1, 0.5)
STEPS = 2
BATCH = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("transforms")
    policy, tok = make_tiny_checkpoint(root / "policy", "llama", seed=0), make_tokenizer(root / "tok")
    data_path = root / "pairs.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in make_pref_rows(16, "standard", seed=3)))
    one = dpojax.make_mesh(devices=jax.devices()[:1])
    ref = make_tiny_checkpoint(root / "ref", "llama", seed=1)
    pair = dpojax.load_policy_and_reference(policy, ref, tokenizer=tok, mesh=one)
    data = dpojax.load_preferences(str(data_path), pair.tokenizer, max_length=48)
    batches = list(dpojax.train_batches(data, BATCH, seed=0, stop_step=STEPS))
    cfg = dpojax.config_from_dict({"model": {"name_or_path": str(policy)}, "data": {"packing": "none"},
                                   "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.9, "schedule": "constant"},
                                   "train": {"batch_size": BATCH}})
    spec = dpojax.make_spec(cfg, pair.policy_graphdef, pair.ref_graphdef, pair.sharder, total_steps=STEPS)
    state = dpojax.init_state(pair.policy_params, spec.optimizer, pair.sharder)
    step = jax.jit(lambda s, b, hp: dpojax.train_step(s, pair.ref_params, b, spec, hp))
    hp0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dpojax.LossParams.of(cfg.loss))
    runs = {}  # beta -> [(state, metrics)] after each step, one run per beta
    for beta in BETAS:
        s, runs[beta] = state, []
        for b in batches:
            s, m = step(s, b, hp0.replace(beta=jnp.float32(beta)))
            runs[beta].append((s, m))
    return dict(cfg=cfg, pair=pair, batches=batches, spec=spec, state=state, hp0=hp0, runs=runs, policy=policy,
                ref=ref, tok=tok, step=step)


def _close(a, b, atol, rtol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


# Another program (vmapped over betas, or sharded over 8 devices) reduces in another order: measured here within
# 1 ulp of each parameter leaf's largest entry and of each metric's scale; 16 ulps leaves room for other CPUs' kernels.
ULPS = 16


def _same_params(a, b):
    """Each leaf to ULPS ulps of its largest entry."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=fp32_tol(y, ULPS),
                                   err_msg=jax.tree_util.keystr(path))


def _same_metrics(a, b, beta):
    """Each metric's (sum, count) to ULPS ulps of the magnitude it is computed from: its own for the log-prob sums
    (one sign), logits, grad norm and counts; for rewards and the loss, beta times the batch's log-prob sums (they are
    beta times differences of those sums, ~ -400: a margin of 2 is only as exact as sums of 400 are)."""
    logps = abs(float(b["logps/chosen"][0])) + abs(float(b["logps/rejected"][0]))
    for name, want in b.items():
        scale = beta * logps if name.startswith(("rewards/", "loss")) else np.abs(want)
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(want), rtol=0, atol=fp32_tol(scale, ULPS),
                                   err_msg=name)


def test_grad_of_batch_loss_is_what_train_step_applies(setup):
    pair, spec, batch = setup["pair"], setup["spec"], setup["batches"][0]
    params = setup["state"].params

    def loss(p):
        return dpojax.batch_loss(p, pair.ref_params, batch, spec)[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(params)
    assert value.shape == () and np.isfinite(value)  # a sum over the batch's prompts
    # the step divides the summed gradient once by the number of prompts, and reports its norm before clipping
    _, metrics = setup["runs"][0.1][0]
    np.testing.assert_allclose(metrics["grad_norm"][0], optax.global_norm(grads) / BATCH, rtol=1e-5)
    # a central finite difference along a random direction agrees with the directional derivative
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    direction = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    eps = 1e-3
    def shifted(s):  # the same compiled function at shifted parameters
        return value_and_grad(jax.tree.map(lambda p, d: p + s * d, params, direction))[0]

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    exact = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(fd, exact, rtol=2e-2)


def test_vmap_over_betas_equals_one_run_per_beta(setup):
    pair, spec = setup["pair"], setup["spec"]
    n = len(BETAS)
    states = jax.tree.map(lambda x: jnp.stack([x] * n), setup["state"])
    hps = jax.tree.map(lambda x: jnp.full((n,), x, jnp.float32), setup["hp0"]).replace(beta=jnp.asarray(BETAS))
    sweep = jax.jit(jax.vmap(lambda s, hp, b: dpojax.train_step(s, pair.ref_params, b, spec, hp),
                             in_axes=(0, 0, None)))
    for i, batch in enumerate(setup["batches"]):
        states, metrics = sweep(states, hps, batch)
        for j, beta in enumerate(BETAS):
            want_state, want_metrics = setup["runs"][beta][i]
            _same_params(jax.tree.map(lambda x, j=j: x[j], states.params), want_state.params)
            _same_metrics(jax.tree.map(lambda x, j=j: x[j], metrics), want_metrics, beta)
    # different betas trained different policies
    assert not np.allclose(jax.tree.leaves(states.params)[0][0], jax.tree.leaves(states.params)[0][2])


def test_jit_with_explicit_shardings_on_8_devices_equals_one_device(setup):
    mesh = dpojax.make_mesh(data=2, fsdp=2, tensor=2)
    pair = dpojax.load_policy_and_reference(setup["policy"], setup["ref"], tokenizer=setup["tok"], mesh=mesh)
    spec = dpojax.make_spec(setup["cfg"], pair.policy_graphdef, pair.ref_graphdef, pair.sharder, total_steps=STEPS)
    state = dpojax.init_state(pair.policy_params, spec.optimizer, pair.sharder)
    assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == 8

    def shardings(tree):
        return jax.tree.map(lambda x: x.sharding, tree)

    step = jax.jit(lambda s, r, b: dpojax.train_step(s, r, b, spec),
                   in_shardings=(shardings(state), shardings(pair.ref_params),
                                 NamedSharding(mesh, P(("data", "fsdp")))),
                   out_shardings=(shardings(state), NamedSharding(mesh, P())), donate_argnums=0)
    for i, batch in enumerate(setup["batches"]):
        state, metrics = step(state, pair.ref_params, batch)
        want_state, want_metrics = setup["runs"][0.1][i]  # beta 0.1 is the config's
        _same_params(state.params, want_state.params)  # reductions split over devices: fp32 rounding
        _same_metrics(metrics, want_metrics, 0.1)


def test_a_non_finite_loss_skips_the_step(setup):
    """The step's guard sees the loss sum, whatever loss made it: a NaN beta (data, so no new compile) stands for a
    user loss that returns NaN."""
    state = setup["state"]
    new, metrics = setup["step"](state, setup["batches"][0], setup["hp0"].replace(beta=jnp.float32(np.nan)))
    assert float(metrics["skipped_steps"][0]) == 1.0 and int(new.step) == 1
    _close(new.params, state.params, atol=0)
