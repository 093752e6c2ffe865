"""Preference losses equal TRL 1.16's DPOTrainer._compute_loss (values, gradients, metrics), driven without a model.

TRL's real `_compute_loss` runs on a `SimpleNamespace` trainer and a fake LM whose fused-head outputs are
per-token tensors we craft (zero where the label is -100, like TRL's head). The same per-token tensors go
through `logprobs.sequence_stats` -> `losses.preference_loss`. Gradients are compared w.r.t. the policy's
per-token log-probs (hence w.r.t. the chosen/rejected sums) and the precomputed reference sums.
Losses TRL 1.16 lacks are compared with TRL's CPO/ORPO trainers or a transcription of the paper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpojax import losses
from dpojax.errors import ConfigError
from dpojax.logprobs import TokenStats, sequence_stats, token_metric_sums

trl = pytest.importorskip("trl")
from trl import DPOTrainer  # noqa: E402 - after importorskip, so the file skips without trl

TOL = dict(rtol=1e-5, atol=1e-5)
N_PAIRS, T = 6, 12


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Stand-in for dpojax.config.LossSection (same field names and defaults)."""

    type: tuple[str, ...] = ("sigmoid",)
    weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False
    ld_alpha: float | None = None
    rpo_alpha: float | None = None
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    reference_free: bool = False


# ------------------------------------------------------------------------------------------------ fixtures


def _make_batch(seed: int = 0, n: int = N_PAIRS) -> dict[str, np.ndarray]:
    """Random batch in TRL's layout: rows [chosen_0..n-1, rejected_0..n-1], per-token fields [2n, T-1]."""
    rng = np.random.default_rng(seed)
    completion = np.zeros((2 * n, T), np.int64)
    attention = np.zeros((2 * n, T), np.int64)
    for row in range(2 * n):
        prompt = 0 if row % 5 == 0 else int(rng.integers(1, 4))  # prompt 0: completion starts at position 0
        length = int(rng.integers(2, T - prompt + 1))
        completion[row, prompt : prompt + length] = 1
        attention[row, : prompt + length] = 1
    pol = -rng.uniform(0.05, 2.0, (2 * n, T - 1))
    return {
        "completion_mask": completion,
        "attention_mask": attention,
        "input_ids": rng.integers(0, 50, (2 * n, T)),
        "log_probs": pol,
        "ref_log_probs": pol + rng.normal(0.0, 0.4, pol.shape),
        "log_sum_sq_probs": -rng.uniform(0.3, 2.5, pol.shape),
        "mean_logits": rng.normal(0.0, 1.0, pol.shape),
        "entropy": rng.uniform(0.0, 3.0, pol.shape),
        "is_top1": rng.random(pol.shape) < 0.4,
    }


class FakeLM(torch.nn.Module):
    """Returns crafted per-token outputs of TRL's fused LM head, zeroed where the shifted label is -100."""

    def __init__(self, per_token: dict[str, torch.Tensor]):
        super().__init__()
        self.per_token = per_token
        self.is_gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, use_cache=None, labels=None, fused_lm_head=False):
        keep = labels[:, 1:] != -100
        out = {k: (v & keep if v.dtype == torch.bool else v * keep) for k, v in self.per_token.items()}
        return types.SimpleNamespace(**out)


def _trl_self(cfg: Cfg, ref_model=None):
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x, autocast=contextlib.nullcontext
    )
    return types.SimpleNamespace(
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        ref_model=ref_model,
        args=types.SimpleNamespace(discopop_tau=cfg.discopop_tau, gradient_checkpointing_kwargs=None),
        accelerator=accelerator,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        beta=cfg.beta,
        loss_types=list(cfg.type),
        loss_weights=list(cfg.weights) if cfg.weights else [1.0] * len(cfg.type),
        ld_alpha=cfg.ld_alpha,
        f_divergence_type=cfg.f_divergence_type,
        f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
        label_smoothing=cfg.label_smoothing,
        use_weighting=cfg.use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _run_trl(cfg: Cfg, batch, rows=None):
    """TRL's loss, gradients (w.r.t. per-token policy log-probs and reference sums) and logged metrics."""
    n = batch["completion_mask"].shape[0] // 2
    rows = np.arange(n) if rows is None else np.asarray(rows)
    rows = np.concatenate([rows, rows + n])
    inputs = {k: torch.tensor(batch[k][rows]) for k in ("input_ids", "attention_mask", "completion_mask")}
    per_token = {k: torch.tensor(batch[k][rows]) for k in ("mean_logits", "entropy", "is_top1", "log_sum_sq_probs")}
    per_token = {k: v.float() if v.dtype == torch.float64 else v for k, v in per_token.items()}
    ref_lm = FakeLM({"log_probs": torch.tensor(batch["ref_log_probs"][rows], dtype=torch.float32)})
    trainer = _trl_self(cfg, ref_lm)
    ref_c, ref_r = DPOTrainer.compute_ref_log_probs(trainer, ref_lm, inputs)
    ref_c, ref_r = ref_c.detach().requires_grad_(), ref_r.detach().requires_grad_()
    pol = torch.tensor(batch["log_probs"][rows], dtype=torch.float32, requires_grad=True)
    inputs = {**inputs, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}  # precomputed reference
    loss = DPOTrainer._compute_loss(trainer, FakeLM({"log_probs": pol, **per_token}), inputs, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    d_ref = tuple(np.zeros(len(r)) if r.grad is None else r.grad.numpy() for r in (ref_c, ref_r))
    return dict(loss=loss.item(), d_pol=pol.grad.numpy(), d_ref=d_ref,
                ref=(ref_c.detach().numpy(), ref_r.detach().numpy()), metrics=metrics)


def _ours_layout(x_2nxS: np.ndarray, width: int = T) -> np.ndarray:
    """TRL rows [c..., r...] (per-token: shifted, T-1 wide) -> ours c0, r0, c1, r1, ..., T wide (last = 0)."""
    n = x_2nxS.shape[0] // 2
    out = np.zeros((2 * n, width), x_2nxS.dtype)
    out[0::2, : x_2nxS.shape[1]] = x_2nxS[:n]
    out[1::2, : x_2nxS.shape[1]] = x_2nxS[n:]
    return out


def _ours_to_trl(x_BxT: np.ndarray) -> np.ndarray:
    return np.concatenate([x_BxT[0::2, : T - 1], x_BxT[1::2, : T - 1]])


def _tokens(batch, logps_BxT):
    f32 = lambda k: jnp.asarray(_ours_layout(batch[k]), jnp.float32)
    return TokenStats(
        logps_BxT=logps_BxT,
        mean_logit_BxT=f32("mean_logits"),
        log_sum_sq_probs_BxT=f32("log_sum_sq_probs"),
        entropy_BxT=f32("entropy"),
        is_top1_BxT=jnp.asarray(_ours_layout(batch["is_top1"])),
    )


def _run_ours(cfg: Cfg, batch, ref_sums):
    """Our mean loss, gradients and finalised metrics on the same per-token data."""
    cm_BxT = jnp.asarray(_ours_layout(batch["completion_mask"]))
    am_BxT = jnp.asarray(_ours_layout(batch["attention_mask"]))
    n = cm_BxT.shape[0] // 2

    def mean_loss(pol_BxT, ref_c=None, ref_r=None):
        stats = sequence_stats(_tokens(batch, pol_BxT), cm_BxT, ld_alpha=cfg.ld_alpha, lm_mask_BxT=am_BxT)
        ref = None if ref_c is None else jnp.stack([ref_c, ref_r], axis=1)  # [N, K = 2]: chosen, rejected
        x = losses.loss_inputs_from_stats(stats).replace(ref_logps_NxK=ref)
        loss_sum, sums = losses.preference_loss(x, cfg)
        return loss_sum / n, (sums | token_metric_sums(stats), x)

    pol = jnp.asarray(_ours_layout(batch["log_probs"]), jnp.float32)
    refs = () if ref_sums is None else tuple(jnp.asarray(r) for r in ref_sums)
    argnums = tuple(range(1 + len(refs)))
    (loss, (sums, x)), grads = jax.value_and_grad(mean_loss, argnums=argnums, has_aux=True)(pol, *refs)
    metrics = {k: float(v) for k, v in losses.finalize_metrics(sums).items()}
    return dict(loss=float(loss), d_pol=_ours_to_trl(np.asarray(grads[0])), d_ref=tuple(map(np.asarray, grads[1:])),
                metrics=metrics, inputs=x)


def _our_ref_sums(cfg: Cfg, batch):
    stats = sequence_stats(
        TokenStats(logps_BxT=jnp.asarray(_ours_layout(batch["ref_log_probs"]), jnp.float32)),
        jnp.asarray(_ours_layout(batch["completion_mask"])),
        ld_alpha=cfg.ld_alpha,
    )
    sums = stats.ld_logps_B if stats.ld_logps_B is not None else stats.logps_B
    return np.asarray(sums[0::2]), np.asarray(sums[1::2])


# ------------------------------------------------------------------------------------------ TRL parity cases

ALL_TRL = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
           "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIV_SET = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def _smoothing(name: str) -> float:
    return {"exo_pair": 1e-3, "robust": 0.1}.get(name, 0.0)


CASES = [Cfg(type=(name,), label_smoothing=_smoothing(name)) for name in ALL_TRL]
CASES += [Cfg(type=(name,), beta=0.5, label_smoothing=_smoothing(name))
          for name in ("sigmoid", "ipo", "exo_pair", "sppo_hard", "apo_down", "discopop", "aot_unpaired")]
CASES += [Cfg(type=("aot",), label_smoothing=0.2), Cfg(type=("aot_unpaired",), label_smoothing=0.2)]
# Modifiers: several losses per case (TRL's MPO sum, distinct weights) keep the suite fast; label smoothing is
# only combined with losses that read it in TRL 1.16 (not `sigmoid`, where ours is cDPO).
F_GROUPS = ((("sigmoid", "hinge", "ipo", "sft"), 0.0), (("sigmoid_norm", "exo_pair", "robust", "discopop"), 0.1))
CASES += [
    Cfg(type=types_, weights=(1.0, 0.7, 0.4, 0.9), f_divergence_type=f, label_smoothing=eps, beta=0.3)
    for f in ("forward_kl", "js_divergence", "alpha_divergence")
    for types_, eps in F_GROUPS
]
CASES += [Cfg(type=("sigmoid", "ipo"), f_divergence_type="alpha_divergence", f_alpha_divergence_coef=c)
          for c in (1.0, 0.3, 1.7)]
CASES += [
    Cfg(type=("sigmoid", "ipo", "nca_pair"), weights=(1.0, 0.5, 0.3), use_weighting=True),
    Cfg(type=("apo_zero", "discopop", "sigmoid_norm", "exo_pair"), weights=(1.0, 0.5, 0.3, 0.8), use_weighting=True,
        label_smoothing=1e-3),
]
CASES += [Cfg(type=("sigmoid", "ipo", "sft", "sigmoid_norm", "aot"), weights=(1.0, 0.2, 0.5, 0.7, 0.3), ld_alpha=a)
          for a in (0.0, 0.5)]
CASES += [Cfg(type=("sigmoid",), ld_alpha=0.5)]
CASES += [
    Cfg(type=("sigmoid", "bco_pair", "sft"), weights=(0.8, 0.2, 1.0)),
    Cfg(type=("sigmoid", "bco_pair"), weights=(0.8, 0.2), use_weighting=True, ld_alpha=0.7),
    Cfg(type=("ipo", "hinge"), f_divergence_type="js_divergence"),
    Cfg(type=("sigmoid", "sigmoid")),
]


def _case_id(cfg: Cfg) -> str:
    extras = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
              if f.name != "type" and getattr(cfg, f.name) != f.default]
    return "+".join(cfg.type) + ("[" + ",".join(extras) + "]" if extras else "")


def _assert_match(ours, theirs):
    np.testing.assert_allclose(ours["loss"], theirs["loss"], **TOL)
    np.testing.assert_allclose(ours["d_pol"], theirs["d_pol"], **TOL)
    for a, b in zip(ours["d_ref"], theirs["d_ref"], strict=True):  # d loss / d ref_chosen, ref_rejected
        np.testing.assert_allclose(a, b, **TOL)


@pytest.fixture(scope="module")
def batch():
    return _make_batch(0)


@pytest.mark.parametrize("cfg", CASES, ids=_case_id)
def test_matches_trl(cfg: Cfg, batch):
    theirs = _run_trl(cfg, batch)
    np.testing.assert_allclose(_our_ref_sums(cfg, batch), theirs["ref"], **TOL)  # LD-weighted reference sums
    ours = _run_ours(cfg, batch, theirs["ref"])
    _assert_match(ours, theirs)
    for key, value in theirs["metrics"].items():
        np.testing.assert_allclose(ours["metrics"][key], value, err_msg=key, **TOL)
    if not set(cfg.type) & {"sft", "aot", "aot_unpaired"}:  # per-pair losses, pair by pair
        per_pair, _ = losses.per_pair_losses(ours["inputs"], cfg)
        single = [_run_trl(cfg, batch, rows=[i])["loss"] for i in range(N_PAIRS)]
        np.testing.assert_allclose(np.asarray(per_pair), single, **TOL)


RPO_CASES = [
    Cfg(type=("sigmoid",), rpo_alpha=0.5),
    Cfg(type=("ipo",), rpo_alpha=1.0, f_divergence_type="js_divergence"),
    Cfg(type=("sigmoid",), rpo_alpha=1.0, ld_alpha=0.5),
]


@pytest.mark.parametrize("cfg", RPO_CASES, ids=_case_id)
def test_rpo_alpha_matches_trl_sft_composite(cfg: Cfg, batch):
    """RPO (Pang et al. 2024, arXiv:2404.19733): loss + alpha * NLL(chosen), NLL the token mean over the batch's
    chosen completions (TRL 0.x `rpo_alpha`) == TRL 1.16 loss_type [..., "sft"] with weight alpha.
    """
    trl_cfg = dataclasses.replace(cfg, type=(*cfg.type, "sft"), weights=(1.0, cfg.rpo_alpha), rpo_alpha=None)
    theirs = _run_trl(trl_cfg, batch)
    ours = _run_ours(cfg, batch, theirs["ref"])
    _assert_match(ours, theirs)


def test_sft_with_wpo_weights(batch):
    """sft * WPO weights: TRL 1.16 crashes here (in-place multiply of an expanded tensor); its intent, and ours:
    mean over pairs of NLL_batch * w_w * w_l, w = exp(mean_t(log p_t - log sum_v p_v^2)) (WPO Eq. 2, no grad).
    """
    cfg = Cfg(type=("sft",), use_weighting=True)
    pol, (sc, _), (nc, nr) = _torch_sums(batch)
    lssp = torch.tensor(batch["log_sum_sq_probs"], dtype=torch.float32)
    mask = torch.tensor(batch["completion_mask"][:, 1:], dtype=torch.float32)
    w_c, w_r = torch.exp(((pol.detach() - lssp) * mask).sum(1) / mask.sum(1)).chunk(2)
    loss = (-sc.sum() / nc.sum() * w_c * w_r).mean()
    loss.backward()
    ours = _run_ours(cfg, batch, _our_ref_sums(cfg, batch))
    np.testing.assert_allclose(ours["loss"], loss.item(), **TOL)
    np.testing.assert_allclose(ours["d_pol"], pol.grad.numpy(), **TOL)


def _torch_sums(batch):
    """Per-token policy leaf and (chosen, rejected) sums / counts over completion_mask[:, 1:] (TRL's layout)."""
    pol = torch.tensor(batch["log_probs"], dtype=torch.float32, requires_grad=True)
    mask = torch.tensor(batch["completion_mask"][:, 1:], dtype=torch.float32)
    sums, counts = (pol * mask).sum(1), mask.sum(1)
    return pol, sums.chunk(2), counts.chunk(2)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_label_smoothing_matches_paper(eps, batch):
    """cDPO (Mitchell 2023, 'A note on DPO with noisy preferences'): -(1-e) log s(b D) - e log s(-b D).

    TRL 1.16 ignores label_smoothing for `sigmoid`; TRL <= 0.x applied exactly this formula.
    """
    cfg = Cfg(type=("sigmoid",), label_smoothing=eps, beta=0.5)
    pol, (sc, sr), _ = _torch_sums(batch)
    ref_c, ref_r = _our_ref_sums(cfg, batch)
    z = cfg.beta * ((sc - torch.tensor(ref_c)) - (sr - torch.tensor(ref_r)))
    loss = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    loss.backward()
    ours = _run_ours(cfg, batch, (ref_c, ref_r))
    np.testing.assert_allclose(ours["loss"], loss.item(), **TOL)
    np.testing.assert_allclose(ours["d_pol"], pol.grad.numpy(), **TOL)


def _trainer_stub(cfg: Cfg, loss_type: str):
    return types.SimpleNamespace(alpha=0.0, loss_type=loss_type, simpo_gamma=cfg.simpo_gamma, beta=cfg.beta,
                                 label_smoothing=cfg.label_smoothing, accelerator=types.SimpleNamespace(device="cpu"))


@pytest.mark.parametrize("cfg", [Cfg(type=("simpo",), beta=2.0, simpo_gamma=1.0), Cfg(type=("simpo",),
                                 label_smoothing=0.1)], ids=_case_id)
def test_simpo_matches_cpo_trainer_and_paper(cfg: Cfg, batch):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): -log s(b/|y_w| log pi(y_w) - b/|y_l| log pi(y_l) - g);
    TRL's CPOTrainer.cpo_loss (loss_type='simpo', cpo_alpha=0) adds cDPO label smoothing.
    """
    from trl.experimental.cpo import CPOTrainer

    pol, (sc, sr), (nc, nr) = _torch_sums(batch)
    per_pair, rewards_w, rewards_l = CPOTrainer.cpo_loss(_trainer_stub(cfg, "simpo"), sc / nc, sr / nr)
    per_pair.mean().backward()
    if cfg.label_smoothing == 0:
        paper = -F.logsigmoid(cfg.beta / nc * sc - cfg.beta / nr * sr - cfg.simpo_gamma)
        np.testing.assert_allclose(per_pair.detach().numpy(), paper.detach().numpy(), **TOL)
    assert losses.reference_free(cfg)
    ours = _run_ours(cfg, batch, None)
    np.testing.assert_allclose(ours["loss"], per_pair.mean().item(), **TOL)
    np.testing.assert_allclose(ours["d_pol"], pol.grad.numpy(), **TOL)
    np.testing.assert_allclose(ours["metrics"]["rewards/chosen"], rewards_w.mean().item(), **TOL)
    np.testing.assert_allclose(ours["metrics"]["rewards/margins"], (rewards_w - rewards_l).mean().item(), **TOL)


def test_orpo_matches_orpo_trainer(batch):
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eq. 6): NLL(chosen prompt+response) - lambda * log s(log odds
    ratio), with TRL's ORPOTrainer.odds_ratio_loss and its NLL over attention_mask[:, 1:] of the chosen rows.
    """
    from trl.experimental.orpo import ORPOTrainer

    cfg = Cfg(type=("orpo",), beta=0.25)
    pol, (sc, sr), (nc, nr) = _torch_sums(batch)
    lm_mask = torch.tensor(batch["attention_mask"][:, 1:], dtype=torch.float32)
    lm_chosen, lm_tokens = (pol * lm_mask).sum(1).chunk(2)[0], lm_mask.sum(1).chunk(2)[0]
    nll = -lm_chosen.sum() / lm_tokens.sum()
    ratio_loss, _, _, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        _trainer_stub(cfg, "orpo"), sc / nc, sr / nr
    )
    loss = nll - ratio_loss.mean()
    loss.backward()
    ours = _run_ours(cfg, batch, None)
    np.testing.assert_allclose(ours["loss"], loss.item(), **TOL)
    np.testing.assert_allclose(ours["d_pol"], pol.grad.numpy(), **TOL)
    for key, value in {"nll_loss": nll, "log_odds_ratio": log_odds_ratio, "log_odds_chosen": log_odds_chosen}.items():
        np.testing.assert_allclose(ours["metrics"][key], value.item(), err_msg=key, **TOL)


def test_reference_free_is_dpo_with_zero_reference(batch):
    cfg = Cfg(type=("sigmoid", "ipo"), reference_free=True)
    assert losses.reference_free(cfg) and not losses.reference_free(Cfg())
    zero = np.zeros(N_PAIRS, np.float32)
    zero_ref_batch = {**batch, "ref_log_probs": 0 * batch["log_probs"]}
    theirs = _run_trl(dataclasses.replace(cfg, reference_free=False), zero_ref_batch)
    ours = _run_ours(cfg, batch, None)
    np.testing.assert_allclose(theirs["ref"][0], zero)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], **TOL)
    np.testing.assert_allclose(ours["d_pol"], theirs["d_pol"], **TOL)


@pytest.mark.parametrize("name", ["sigmoid", "sft", "aot", "aot_unpaired", "orpo", "ipo", "simpo"])
def test_padding_pairs_do_not_count(name, batch):
    """Padding pairs (all-zero rows: zero log-probs and tokens) change neither the loss sum, its gradient, nor the
    metrics, even for batch-level losses, and bring no NaN.
    """
    cfg = Cfg(type=(name,), use_weighting=name not in ("aot", "aot_unpaired"))
    x = _run_ours(cfg, batch, _our_ref_sums(cfg, batch))["inputs"]
    order = np.asarray([0, 6, 1, 2, 3, 7, 4, 5])  # padding pairs in the middle
    fields = [f.name for f in dataclasses.fields(x) if getattr(x, f.name) is not None]

    def pad(v):  # two all-zero filler prompts, placed in the middle
        return jnp.concatenate([v, jnp.zeros((2, *v.shape[1:]), v.dtype)])[order]

    padded = x.replace(**{k: pad(getattr(x, k)) for k in fields},
                       prompt_mask_N=jnp.asarray((order < N_PAIRS).astype(np.float32)))

    def loss(inputs):
        return losses.preference_loss(inputs, cfg)

    (s0, m0), g0 = jax.value_and_grad(loss, has_aux=True)(x)
    (s1, m1), g1 = jax.value_and_grad(loss, has_aux=True)(padded)
    np.testing.assert_allclose(s1, s0, **TOL)
    for key in m0:
        np.testing.assert_allclose(losses.finalize_metrics(m1)[key], losses.finalize_metrics(m0)[key], **TOL)
    for k in ("logps_NxK", "raw_logps_NxK"):
        grad = np.asarray(getattr(g1, k))
        assert np.all(np.isfinite(grad)) and not np.any(grad[order >= N_PAIRS]), k
        np.testing.assert_allclose(grad[order < N_PAIRS], getattr(g0, k), **TOL)


def test_jit_and_registry(batch):
    assert set(ALL_TRL) | {"simpo", "orpo", "plackett_luce", "kto", "apo_zero_unpaired"} == set(losses.LOSSES)
    for name, loss in losses.LOSSES.items():
        assert loss.fn.__doc__ and ("arXiv" in loss.fn.__doc__ or "TRL" in loss.fn.__doc__), name
    cfg = Cfg(type=("sigmoid", "sft"), weights=(1.0, 0.5), use_weighting=True)
    x = _run_ours(cfg, batch, _our_ref_sums(cfg, batch))["inputs"]
    eager = losses.preference_loss(x, cfg)[0]
    np.testing.assert_allclose(jax.jit(losses.preference_loss, static_argnums=1)(x, cfg)[0], eager, **TOL)


INVALID = [
    (Cfg(type=("dpo",)), "valid types: sigmoid, hinge"),
    (Cfg(type=()), "empty"),
    (Cfg(type=("sigmoid", "sft"), weights=(1.0,)), "weights"),
    (Cfg(type=("nca_pair",), f_divergence_type="forward_kl"), "f_divergence_type"),
    (Cfg(type=("simpo",), f_divergence_type="js_divergence"), "f_divergence_type"),
    (Cfg(f_divergence_type="kl"), "f_divergence_type must be one of"),
    (Cfg(type=("aot",), use_weighting=True), "use_weighting"),
    (Cfg(type=("aot_unpaired", "sigmoid"), use_weighting=True), "use_weighting"),
    (Cfg(type=("exo_pair",)), "exo_pair needs 0 < label_smoothing"),
    (Cfg(type=("robust",), label_smoothing=0.5), "robust"),
    (Cfg(ld_alpha=1.5), "ld_alpha must be in"),
    (Cfg(type=("orpo",), ld_alpha=0.5), "ld_alpha does not apply"),
    (Cfg(beta=0.0), "beta"),
    (Cfg(label_smoothing=-0.1), "label_smoothing"),
    (Cfg(type=("discopop",), discopop_tau=0.0), "discopop_tau"),
]


@pytest.mark.parametrize("cfg,match", INVALID, ids=[m for _, m in INVALID])
def test_invalid_configs_raise(cfg, match, batch):
    with pytest.raises(ConfigError, match=match):
        losses.validate_loss_config(cfg)
    x = losses.LossInputs(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.ones((2, 2)))
    with pytest.raises(ConfigError):
        losses.preference_loss(x, cfg)
