"""Every test of tests/faults is marked `faults`; those that start several processes are `serial` too (see
tests/conftest.py). `make test` runs the cheap ones (single process, in the parallel pool); `make test-faults`
runs them all."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "faults" in item.path.parts:
            item.add_marker(pytest.mark.faults)
