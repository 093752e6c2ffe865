"""Every script in examples/ runs as its docstring says (short settings), offline on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dpojax
from dpojax.losses import core

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.serial
def test_custom_loss_example_trains_next_to_sigmoid(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "XLA_FLAGS": ""}  # one CPU device, as a user runs it (conftest's 8 fake devices compile slower)
    out = subprocess.run([sys.executable, "examples/custom_loss.py", "--steps", "4", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout.split("held-out eval after 4 steps on the demo data\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["loss.type", "loss", "rewards/accuracies"]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table[1:3]}
    assert set(rows) == {"sigmoid", "margin_sigmoid"}
    assert all(np.isfinite(v).all() for v in rows.values())
    assert rows["margin_sigmoid"][0] > rows["sigmoid"][0]  # the margin keeps its loss above DPO's
    for loss in rows:
        assert (tmp_path / loss / "metrics.jsonl").is_file()


def test_custom_loss_example_is_a_loss_import_module(monkeypatch):
    """What the example's docstring runs with the CLI: the file registers its loss through loss.import."""
    before = dict(core.LOSSES)
    monkeypatch.chdir(REPO)
    try:
        cfg = dpojax.load_config("configs/demo.yaml", ["loss.import=[examples/custom_loss.py]",
                                                       "loss.type=margin_sigmoid"])
        assert cfg.loss.type == ("margin_sigmoid",) and "margin_sigmoid" in dpojax.LOSSES
    finally:
        core.LOSSES.clear()
        core.LOSSES.update(before)
        core._validated.cache_clear()
        for name in [m for m in sys.modules if m.startswith("dpojax_user_losses")]:
            del sys.modules[name]
