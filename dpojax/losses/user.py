"""Losses from user code: `loss.import` names modules (or .py files) that register losses with `register_loss`.

`dpojax train|eval|compile` import them while the config is validated, before the loss names are checked, so a
research loss trains with no edit to dpojax:

    # my_losses.py                                    # config.yaml
    from dpojax import register_loss                  loss:
                                                        import: [my_losses]      # or a path: [lib/my_losses.py]
    @register_loss("margin_sigmoid")                    type: margin_sigmoid
    def margin_sigmoid(t, hp): ...

A dotted name is imported like any module, with the current directory also searched (last), since the `dpojax`
script does not put it on sys.path; a name ending in `.py` is loaded from that file (relative to the current
directory, like every path in a config). Each is imported once per process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from dpojax.errors import ConfigError


def import_loss_modules(names: tuple[str, ...] | list[str]) -> list[ModuleType]:
    """Import each of `names` (module names or .py paths) once; a failure raises ConfigError naming it."""
    return [_import_one(name) for name in names]


def _import_one(name: str) -> ModuleType:
    if name.endswith(".py") or os.sep in name or "/" in name:
        return _import_file(name)
    try:
        return _import_with_cwd(name)
    except ModuleNotFoundError as e:
        if e.name is not None and name.split(".")[0] != e.name.split(".")[0]:
            _fail(name, f"it imports '{e.name}', which is not installed ({e})")
        _fail(name, f"no module named '{name}' on sys.path or in the current directory {os.getcwd()}; give a "
                    "module name (my_losses) or a path to a .py file (path/to/my_losses.py)")
    except Exception as e:  # noqa: BLE001  (user code: any error is reported with its module)
        _fail(name, f"importing it raised {type(e).__name__}: {e}")
    raise AssertionError("unreachable")


def _import_with_cwd(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)  # last: an installed module of the same name wins
    try:
        return importlib.import_module(name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_file(path_text: str) -> ModuleType:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        _fail(path_text, f"file '{path}' not found")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"dpojax_user_losses.{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises is reported as theirs
        del sys.modules[module_name]
        _fail(path_text, f"importing it raised {type(e).__name__}: {e}")
    return module


def _fail(name: str, why: str) -> None:
    raise ConfigError(f"config: 'loss.import' entry '{name}' could not be imported: {why}.") from None
