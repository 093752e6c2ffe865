"""Metric aggregation (sums and counts -> TRL-named means), the metrics.jsonl writer, the curves PNG.

Steps return sums and counts; `finalize` divides once. Only process 0 writes files.

metrics.jsonl lives in output_dir, local or on object storage. Locally each record is appended; an object store
has no append, so there the writer keeps the file's lines and rewrites the whole object, at most every
`flush_every_s` seconds and at every `flush()` (the loop flushes at each checkpoint, so the file always holds
every record up to the newest checkpoint; records past it are dropped on resume either way).
"""

from __future__ import annotations

import io
import json
import os
from typing import Mapping

import numpy as np

from dpojax import paths
from dpojax.losses import BASE_METRICS, RANKING_METRICS, REWARD_METRICS

PathLike = str | os.PathLike

# TRL's names, then ranked data's (dpojax/losses/ranking.py), KTO's reference point and entropy, then a reward
# model's (dpojax/losses/reward.py), in the order a summary prints them; a summary shows only the metrics a run has.
PAIR_METRICS = (*BASE_METRICS, *RANKING_METRICS, "kl", "entropy", *REWARD_METRICS[1:])


def add_sums(acc: dict[str, tuple[float, float]] | None, new: Mapping) -> dict[str, tuple[float, float]]:
    """Accumulate `{name: (sum, count)}` on the host (float64)."""
    new = {k: (float(s), float(c)) for k, (s, c) in new.items()}
    if acc is None:
        return new
    return {k: (acc[k][0] + new[k][0], acc[k][1] + new[k][1]) for k in acc}


def finalize(sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """`{name: (sum, count)}` -> `{name: sum / count}`: per-pair metrics are divided by the number of real
    pairs, `logits/*` by completion tokens (as TRL), step-level ones (grad_norm, learning_rate) by steps."""
    return {k: (s / c if c > 0 else 0.0) for k, (s, c) in sums.items()}


class MetricsWriter:
    """Adds one JSON object per line to output_dir/metrics.jsonl (process 0 only): appended to a local file,
    buffered and rewritten whole on object storage (see the module docstring)."""

    def __init__(self, path: PathLike, enabled: bool = True, flush_every_s: float = 30.0):
        self.lines = paths.LineAppender(path, enabled, flush_every_s)
        self.path = self.lines.path

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.lines.add(json.dumps(record))

    def flush(self) -> None:
        """Make every record written so far durable (a no-op for a local file: appends are)."""
        self.lines.flush()

    close = flush


def _jsonable(v):
    v = float(v) if isinstance(v, (np.floating, np.integer)) or hasattr(v, "item") else v
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return v


def read_metrics(path: PathLike) -> list[dict]:
    path = paths.path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines and _step_of(lines[-1], -1) == -1:  # a last line torn by a crash or a full disk mid-write
        lines.pop()
    return [json.loads(line) for line in lines]


def truncate_after(path: PathLike, step: int) -> None:
    """Drop the records (metrics.jsonl, samples.jsonl lines) past `step`, and a line torn by a crash mid-write: a
    resumed run redoes them. The kept lines are rewritten as they were, atomically."""
    path = paths.path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if _step_of(line, step + 1) <= step]
    if len(keep) < len(lines):
        paths.write_text(path, "".join(line + "\n" for line in keep))


def _step_of(line: str, torn: int) -> int:
    """A record's step; `torn` for a line cut short by a crash or a full disk mid-write (dropped, then redone)."""
    try:
        return json.loads(line)["step"]
    except json.JSONDecodeError:
        return torn


def summary_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one column per split (e.g. train / eval), one row per TRL metric."""
    splits = list(rows)
    keys = [k for k in PAIR_METRICS if any(k in rows[s] for s in splits)]
    width = max(len(k) for k in keys) + 2
    lines = ["".ljust(width) + "".join(s.rjust(12) for s in splits)]
    for k in keys:
        cells = "".join((f"{rows[s][k]:.4f}" if k in rows[s] else "-").rjust(12) for s in splits)
        lines.append(k.ljust(width) + cells)
    return "\n".join(lines)


def plot_curves(records: list[dict], out_png: PathLike):
    """Loss, reward accuracy, margins and chosen/rejected rewards against step, train and eval (online runs: and
    the samples' mean reward)."""
    import matplotlib  # heavy; needed only for the curves PNG

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    accuracy = ("reward accuracy", ("rewards/accuracies", "accuracy"))  # a reward model's (task: reward) name too
    if not any("rewards/accuracies" in r for r in records) and any("kl" in r for r in records):
        accuracy = ("KL reference point (KTO)", ("kl",))
    panels = (
        ("loss", ("loss",)),
        accuracy,
        ("reward margin", ("rewards/margins", "margin")),
        ("rewards", ("rewards/chosen", "rewards/rejected", "mean_reward")),
    )
    if any("online/reward_mean" in r for r in records):  # online runs: the mean reward of the samples
        panels += (("mean reward (online samples)", ("online/reward_mean",)),)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for split, style in (("train", "-"), ("eval", "o--")):
            recs = [r for r in records if r.get("split") == split]
            for key in keys:
                pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, label=f"{split} {key}", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    paths.write_bytes(out_png, buffer.getvalue())
    return paths.path(out_png)

