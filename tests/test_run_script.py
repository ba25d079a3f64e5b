"""tests/run.py, what `make test` runs: its marker handling and its exit status."""

from __future__ import annotations

import pytest

from .run import NO_TESTS, combined, split_marker


@pytest.mark.parametrize(
    ("args", "marker", "rest"),
    [
        ([], None, []),
        (["-x", "tests/test_ws.py"], None, ["-x", "tests/test_ws.py"]),
        (["-m", "redis", "-x"], "redis", ["-x"]),
        (["-mredis"], "redis", []),
        (["-m=redis or postgres", "-k", "relay"], "redis or postgres", ["-k", "relay"]),
        (["-m", "a", "-m", "b"], "b", []),  # pytest takes the last one too
        (["--maxfail=1"], None, ["--maxfail=1"]),
        (["-m"], None, ["-m"]),  # no expression: left for pytest to refuse
    ],
)
def test_split_marker_takes_out_the_marker_expression(args, marker, rest):
    assert split_marker(args) == (marker, rest)


def test_the_status_is_the_first_failure_and_a_run_that_selected_nothing_is_no_failure():
    assert combined([0, 0]) == 0
    assert combined([0, NO_TESTS]) == 0  # e.g. PYTEST_ARGS=tests/test_ws.py: no fault test
    assert combined([NO_TESTS, 0]) == 0
    assert combined([NO_TESTS, NO_TESTS]) == NO_TESTS  # nothing ran at all
    assert combined([1, 0]) == 1
    assert combined([0, 1]) == 1
    assert combined([NO_TESTS, 2]) == 2
    assert combined([3, 1]) == 3
