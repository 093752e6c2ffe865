"""The `online` config section's cross-field checks (the section itself is `dpojax.config.OnlineSection`; config
validation calls `validate_online`)."""

from __future__ import annotations

import dataclasses

from dpojax import losses
from dpojax.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"config: {message}")


_ITERATIVE_KEYS = ("rounds", "prompts_per_round", "epochs_per_round", "reference")


def validate_online(cfg) -> None:
    """ConfigError unless the online section is consistent: off, nothing of it set; on, a prompt set, a reward,
    sampling that draws distinct responses, a loss that fits online.pairs, and the iterative keys only where they
    apply (`cfg`: a `dpojax.config.Config`)."""
    o, s = cfg.online, cfg.online.sampling
    changed = [f.name for f in dataclasses.fields(o) if f.name != "enabled" and getattr(o, f.name) != f.default]
    if not o.enabled:
        _require(not changed, f"'online.{changed[0] if changed else ''}' is set but 'online.enabled' is false; set "
                              "online.enabled=true to sample the training data from the policy.")
        return
    _require(bool(o.prompts), "'online.prompts' is required with online.enabled: a prompt file, dataset folder or "
                              "hub id (rows with a 'prompt' column, text or chat messages).")
    _require(not cfg.data.train, f"'data.train' = {cfg.data.train!r}: an online run samples its training data "
                                 "from the policy; remove data.train (the prompts come from online.prompts).")
    _require((o.reward is None) != (o.reward_model is None),
             f"give exactly one reward: 'online.reward' (a function, = {o.reward!r}) or 'online.reward_model' (a "
             f"*ForSequenceClassification folder or hub id, = {o.reward_model!r}).")
    _require(o.reward is None or (o.reward.count(":") == 1 and all(o.reward.split(":"))),
             f"'online.reward' = {o.reward!r} must name a function as 'module:function' or 'path/to/file.py:function' "
             "(called fn(prompts, completions, **row_fields) -> list[float]).")
    _require(o.samples_per_prompt >= 2, f"'online.samples_per_prompt' = {o.samples_per_prompt} must be at least 2: "
                                        "a preference needs two responses to compare.")
    _require(s.temperature > 0, f"'online.sampling.temperature' = {s.temperature} must be > 0: greedy decoding "
                                "would sample the same response K times.")
    _require(s.top_k >= 0 and 0 < s.top_p <= 1 and s.max_new_tokens >= 1 and all(s.stop),
             f"'online.sampling': top_k = {s.top_k} must be >= 0, top_p = {s.top_p} in (0, 1], max_new_tokens = "
             f"{s.max_new_tokens} >= 1 and stop strings non-empty.")
    kwise = losses.is_kwise(cfg.loss)
    _require(kwise == (o.pairs == "ranking"),
             f"'online.pairs' = {o.pairs!r} does not fit loss.type={cfg.loss.type[0]}: a ranking loss trains on "
             "online.pairs=ranking, a pair loss on best_vs_worst or all_pairs.")
    _require(not cfg.ref_model.precompute, "'ref_model.precompute' cannot precompute an online run's reference: its "
                                           "data is sampled during training; remove it.")
    _require(cfg.train.steps_per_dispatch == 1, "'train.steps_per_dispatch' must be 1 in an online run: each step's "
                                                "batch is sampled from the policy the step before updated.")
    if o.schedule == "online":
        bad = [k for k in _ITERATIVE_KEYS if k in changed]
        _require(not bad, f"'online.{bad[0] if bad else ''}' applies to online.schedule=iterative only; remove it "
                          "or set online.schedule=iterative.")
        return
    n = cfg.train.batch_size
    _require(o.rounds >= 1 and o.epochs_per_round >= 1,
             f"'online.rounds' = {o.rounds} and 'online.epochs_per_round' = {o.epochs_per_round} must be >= 1.")
    _require(o.prompts_per_round is None or (o.prompts_per_round >= n and o.prompts_per_round % n == 0),
             f"'online.prompts_per_round' = {o.prompts_per_round} must be a multiple of train.batch_size = {n} "
             "(a round trains on whole batches of its prompts).")
    _require(cfg.train.steps is None, "'train.steps' is set by online.rounds x online.epochs_per_round in an "
                                      "iterative run; remove train.steps.")
    if o.reference == "previous_round":
        _require(not cfg.model.lora.enabled, "'online.reference' = 'previous_round' needs a full reference copy, "
                                             "but with LoRA the reference is the frozen base; use 'initial'.")
        _require(not cfg.ref_model.sync_every and not losses.reference_free(cfg.loss),
                 "'online.reference' = 'previous_round' moves the reference once per round: it excludes "
                 "ref_model.sync_every (TR-DPO) and reference-free losses.")
