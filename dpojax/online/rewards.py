"""Rewards of sampled responses: a small interface (`Reward.score`) and its function implementation.

A reward function is named `module:function` (imported like any module, the current directory searched last) or
`path/to/file.py:function`, and called once per step on this host's samples:

    fn(prompts, completions, **row_fields) -> list[float]

`prompts[i]` is the prompt of sample i as its row gives it (text or chat messages), `completions[i]` the sampled
text (special tokens left out, cut before a stop string), and each row field a list with the value of sample i's
prompt row (an answer key, say). A function that raises, returns the wrong count or a value that is not a finite
number stops the run with one line naming the function, the prompt and what it returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dpojax.errors import ConfigError, UserError


class Reward(Protocol):
    """Scores a step's samples: one float32 per completion (`completion_ids`: the sampled token ids, `rows`: the
    prompt rows' other columns, one list per column, aligned with `prompts`)."""

    name: str

    def score(self, prompts: Sequence[Any], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
              rows: dict[str, list]) -> np.ndarray: ...


def _short(value: Any, limit: int = 160, as_text: bool = False) -> str:
    """`value` (its repr, or as text) on one line, at most `limit` characters."""
    text = " ".join((str(value) if as_text else repr(value)).split())
    return text if len(text) <= limit else text[:limit] + "..."


@dataclasses.dataclass(frozen=True)
class FunctionReward:
    """A user function `fn(prompts, completions, **row_fields) -> list[float]` as a `Reward`."""

    name: str  # as the config names it
    fn: Callable[..., Any]

    def score(self, prompts, completions, completion_ids, rows) -> np.ndarray:
        what = f"online.reward '{self.name}'"
        try:
            out = self.fn(list(prompts), list(completions), **rows)
        except Exception as e:  # noqa: BLE001 - whatever user code raises is reported as one line naming it
            raise UserError(f"{what} raised {type(e).__name__}: {_short(e, as_text=True)} (first prompt of the call: "
                            f"{_short(prompts[0])})") from None
        values = list(out) if isinstance(out, (list, tuple, np.ndarray)) else None
        if values is None or len(values) != len(completions):
            count = f"{len(values)} values" if values is not None else f"{type(out).__name__} {_short(out)}"
            raise UserError(f"{what} returned {count} for {len(completions)} completions (first prompt: "
                            f"{_short(prompts[0])}); it must return one float per completion.")
        for i, v in enumerate(values):
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            if not ok or not math.isfinite(float(v)):
                raise UserError(f"{what} returned {_short(v)} for prompt {_short(prompts[i])} (completion "
                                f"{_short(completions[i])}); each reward must be a finite number.")
        return np.asarray(values, np.float32)


def _fail(spec: str, why: str) -> None:
    raise ConfigError(f"config: 'online.reward' = '{spec}' could not be loaded: {why}.") from None


def _module_of(target: str, spec: str):
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            _fail(spec, f"file '{path}' not found")
        name = f"dpojax_user_rewards.{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
        if name not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - the user's module: reported as theirs
                del sys.modules[name]
                _fail(spec, f"importing it raised {type(e).__name__}: {e}")
        return sys.modules[name]
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())  # last: an installed module of the same name wins
    try:
        return importlib.import_module(target)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        _fail(spec, f"importing '{target}' raised {type(e).__name__}: {e}")
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def load_reward(spec: str) -> FunctionReward:
    """The reward function `module:function` or `file.py:function` (ConfigError naming it when it is missing)."""
    target, _, name = spec.rpartition(":")
    fn = getattr(_module_of(target, spec), name, None)
    if not callable(fn):
        _fail(spec, f"'{target}' has no function '{name}'")
    return FunctionReward(spec, fn)
