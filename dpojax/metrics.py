"""Metric aggregation (sums and counts -> TRL-named means), the metrics.jsonl writer, the curves PNG.

Steps return sums and counts; `finalize` divides once. Only process 0 writes files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

# TRL's names, in the order a summary prints them.
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "rewards/ranking_accuracy",  # ranked data (dpojax/ranking.py); a summary shows only the metrics a run has
    "rewards/kendall_tau",
)


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
    """Appends one JSON object per line to output_dir/metrics.jsonl (process 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _jsonable(v):
    v = float(v) if isinstance(v, (np.floating, np.integer)) or hasattr(v, "item") else v
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return v


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (a resumed run redoes them), rewriting the file atomically."""
    path = Path(path)
    records = read_metrics(path)
    keep = [r for r in records if r["step"] <= step]
    if len(keep) == len(records):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)


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


def plot_curves(records: list[dict], out_png: Path) -> Path:
    """Loss, reward accuracy, margins and chosen/rejected rewards against step, train and eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("loss", ("loss",)),
        ("reward accuracy", ("rewards/accuracies",)),
        ("reward margin", ("rewards/margins",)),
        ("rewards", ("rewards/chosen", "rewards/rejected")),
    )
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
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
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png

