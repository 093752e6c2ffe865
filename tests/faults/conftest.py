"""Every test of tests/faults is marked `faults`; those that start several processes are `serial` too (see
tests/conftest.py). `make test` runs the cheap ones (single process, in the parallel pool); `make test-faults`
runs them all."""

from pathlib import Path

import pytest
import yaml
from procs import finished, two_processes
from trl_harness import dpojax_overrides, make_assets

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("dead_peer")
    assets = make_assets(root, n_rows=16)
    raw = dpojax_overrides(
        assets, assets["standard"], root / "unused",
        train={"batch_size": 8, "log_every": 1}, mesh={"data": 2, "fsdp": 2},
        optim={"name": "adamw", "lr": 1e-3, "schedule": "constant"},
    )
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def uninterrupted(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("dead_peer_ref") / "run"
    assert two_processes(config, out) == 0
    return finished(out)
