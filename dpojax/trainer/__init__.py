"""Training: building a run (`build`), the pure steps (`step`), running them (`loop`), checkpoints, optimizers.

The public entry point is `dpojax.train(config, overrides=())` (defined in `dpojax.api`).
"""
