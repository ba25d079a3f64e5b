"""Run the test suite as `make test` does: in parallel, then the fault tests one at a time.

Most tests wait on sockets, servers and timeouts more than they compute, so they run in
pytest-xdist workers (`TEST_WORKERS`; by default one per CPU, at most 4), each with its own
test database (pytest-django's suffix) and its own names in a shared Redis (REDIS_PREFIX,
tests/settings_test.py). The fault tests (`-m fault`, tests/faults/) kill, pause or flood
servers and time their recovery, and a flood of another test beside them slows that recovery
past their bounds: they run afterwards, one at a time, in one process.

Arguments are pytest's and go to both runs (`make test PYTEST_ARGS="tests/test_ws.py -x"`);
a marker expression of theirs (`-m redis`) is combined with each run's.
The exit status is the first failing run's, and 0 when one run selected no test but the
other passed (pytest's 5, "no tests collected", only when neither ran any).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

NO_TESTS = 5


def split_marker(args: list[str]) -> tuple[str | None, list[str]]:
    """The last `-m EXPR` (or `-mEXPR`, `-m=EXPR`) of `args`, and the other arguments."""
    marker, rest = None, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m" and i + 1 < len(args):
            marker, i = args[i + 1], i + 2
            continue
        if arg.startswith("-m") and len(arg) > 2 and not arg.startswith("--"):
            marker = arg[2:].removeprefix("=")
        else:
            rest.append(arg)
        i += 1
    return marker, rest


#: Workers when TEST_WORKERS is not set: one per CPU, at most this many. Each worker holds a
#: few PostgreSQL connections of its own (threads, daphne children), and PostgreSQL's
#: default `max_connections` is 100.
MAX_DEFAULT_WORKERS = 4


def default_workers() -> str:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return str(max(1, min(MAX_DEFAULT_WORKERS, cpus)))


def main(args: list[str]) -> int:
    workers = os.environ.get("TEST_WORKERS", "").strip() or default_workers()
    marker, args = split_marker(args)

    def only(expression: str) -> list[str]:
        return ["-m", f"({marker}) and {expression}" if marker else expression]

    runs = [
        (
            f"tests not marked fault, {workers} workers",
            ["-n", workers, "--dist", "worksteal", *only("not fault")],
        ),
        ("fault tests, one at a time", ["-p", "no:xdist", *only("fault")]),
    ]
    if workers in {"0", "1"}:  # one process for all, as plain pytest does
        runs = [("all tests, one process", ["-p", "no:xdist", *(["-m", marker] if marker else [])])]
    statuses = []
    for number, (title, options) in enumerate(runs, 1):
        print(f"== run {number}/{len(runs)}: {title}", flush=True)
        started = time.monotonic()
        status = subprocess.call([sys.executable, "-m", "pytest", *options, *args])
        took = time.monotonic() - started
        print(f"== run {number}/{len(runs)}: exit {status} after {took:.0f} s", flush=True)
        statuses.append(status)
    return combined(statuses)


def combined(statuses: list[int]) -> int:
    """The first failing run's status; 0 if one passed and the others selected nothing."""
    failed = [s for s in statuses if s not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return 0 if 0 in statuses else NO_TESTS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
