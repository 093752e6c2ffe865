"""Reward functions for tests/test_online.py, loaded by online.reward as 'tests/online_rewards.py:NAME'."""

from __future__ import annotations


def answer_hits(prompts, completions, answer):
    """How often the row's answer word occurs in the completion, minus a small length term: deterministic, and
    it separates the samples of a prompt."""
    return [float(c.split().count(a)) - 0.01 * len(c.split()) for c, a in zip(completions, answer, strict=True)]


def raises(prompts, completions, **fields):
    raise RuntimeError("the grader crashed")


def wrong_count(prompts, completions, **fields):
    return [0.0] * (len(completions) - 1)


def not_finite(prompts, completions, **fields):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def all_equal(prompts, completions, **fields):
    return [1.0] * len(completions)
