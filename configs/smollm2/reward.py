"""Rewards for the online arithmetic run (configs/smollm2-135m_arithmetic_online.yaml), loaded as
`online.reward: configs/smollm2/reward.py:exact_match`. Each prompt row of train_prompts.jsonl carries its
"answer", which dpojax passes as the `answer` list (one value per completion).

    exact_match       1.0 when the last number of the completion's first sentence is the answer (arithmetic.py's
                      `right`, the rule `arithmetic.py score` counts by), else 0.0
    exact_then_short  exact_match, minus 0.01 per word beyond the first sentence: a right answer that stops there
                      beats a right answer that rambles on (and a group of K right answers is rarely a tie)
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

_spec = importlib.util.spec_from_file_location("smollm2_arithmetic", Path(__file__).with_name("arithmetic.py"))
arithmetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arithmetic)


def exact_match(prompts, completions, answer, **_):
    return [1.0 if arithmetic.right(c, int(a)) else 0.0 for c, a in zip(completions, answer, strict=True)]


def exact_then_short(prompts, completions, answer, **_):
    def rest(c: str) -> int:  # words after the first sentence
        parts = re.split(r"\.(?:\s|$)|\n", c.strip(), maxsplit=1)
        return len(parts[1].split()) if len(parts) > 1 else 0

    return [r - 0.01 * rest(c) for r, c in zip(exact_match(prompts, completions, answer), completions, strict=True)]
