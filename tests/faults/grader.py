"""A reward function for tests/faults/test_reward_fails.py (online.reward 'tests/faults/grader.py:answer_hits'):
tests/online_rewards.py's, except that its call number $DPOJAX_GRADER_DOWN_AT (one call per step) raises, as a
grader service that went away would."""

from __future__ import annotations

import itertools
import os

_calls = itertools.count(1)


def answer_hits(prompts, completions, answer):
    if str(next(_calls)) == os.environ.get("DPOJAX_GRADER_DOWN_AT"):
        raise ConnectionError("the grader at http://grader:8000 does not answer")
    return [float(c.split().count(a)) - 0.01 * len(c.split()) for c, a in zip(completions, answer, strict=True)]
