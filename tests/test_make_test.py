"""`make test`'s serial pass collects only the Makefile's SERIAL_TESTS: every test file outside tests/faults with a
`serial` mark is listed there (a file left out would have its serial tests run by neither pass)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _serial_tests() -> set[str]:
    make = (TESTS.parent / "Makefile").read_text()
    return set(re.search(r"^SERIAL_TESTS := (.*)$", make, re.M).group(1).split())


def test_every_file_with_serial_tests_is_in_serial_tests():
    marked = {f"tests/{p.name}" for p in TESTS.glob("test_*.py")
              if re.search(r"\bmark\.serial\b|\bpytestmark\b.*\bserial\b", p.read_text())}
    assert marked - {"tests/test_make_test.py"} == _serial_tests(), "SERIAL_TESTS in the Makefile"
    assert "add_marker(pytest.mark.serial" not in (TESTS / "conftest.py").read_text()  # marks are in the files
