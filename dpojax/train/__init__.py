"""Training: building a run (`build`), the pure steps (`step`), running them (`loop`), checkpoints, optimizers.

The package is also the public `dpojax.train(config, overrides=())` (README "Python API"): Python sets a
subpackage as an attribute of its parent whenever it is imported, so `dpojax.train` is always this module; calling
it trains (`dpojax.api.train`: a Config, a dict of sections or a YAML path).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, config, overrides=()):
        """Train as `dpojax train` does; see `dpojax.api.train`."""
        from dpojax.api import train

        return train(config, overrides)


sys.modules[__name__].__class__ = _CallablePackage
