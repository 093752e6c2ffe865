"""Optimizer and learning-rate schedule from the `optim:` config section.

Conventions follow PyTorch / HF Trainer so that training parity with TRL holds: the schedule is read
at the number of updates already applied (the first update uses schedule(0)); linear warm-up from 0;
after warm-up constant, linear decay to 0 at `total_steps`, or cosine decay to 0; RMSprop adds eps
outside the square root and has no bias correction (torch.optim.RMSprop); weight decay is decoupled
for AdamW and added to the gradient for the others (torch's `weight_decay` argument).
"""

from __future__ import annotations

import optax

from dpojax.config import OptimSection


def make_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    warm = cfg.warmup_steps
    decay_steps = max(total_steps - warm, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def make_optimizer(cfg: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip by global norm, then the named optimizer driven by the schedule."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        core = optax.chain(_coupled_decay(cfg), optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    elif cfg.name == "rmsprop":
        rms = optax.rmsprop(
            schedule, decay=cfg.rmsprop_decay, eps=cfg.eps, eps_in_sqrt=False, momentum=cfg.momentum or None
        )
        core = optax.chain(_coupled_decay(cfg), rms)
    else:  # sgd
        core = optax.chain(_coupled_decay(cfg), optax.sgd(schedule, momentum=cfg.momentum or None))
    if cfg.max_grad_norm is not None:
        core = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), core)
    return core, schedule


def _coupled_decay(cfg: OptimSection) -> optax.GradientTransformation:
    return optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay else optax.identity()
