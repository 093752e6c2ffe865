"""Training: building a run (`build`), the pure steps (`step`), running them (`loop`, fed by `prefetch`, its metrics
in a `window`, its periodic actions as `hooks`), `evaluation`, `export`, checkpoints, optimizers.

The public entry point is `dpojax.train(config, overrides=())` (defined in `dpojax.api`).
"""
