"""Run the benchmarks in bench/, print their tables and write docs/performance.md.

Each benchmark script is run as a subprocess once per argument set (so each run configures
Django afresh, e.g. on its own database) and prints one JSON object on stdout: `benchmark`,
`about`, `title`, `columns`, `rows`, `verdict` and `notes`, or `skipped` with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import machine
import report
from services import redact

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DOC = ROOT / "docs" / "performance.md"
#: Each benchmark script and the argument sets it runs with, one subprocess per set.
BENCHMARKS: list[tuple[str, list[list[str]]]] = [
    ("write_path.py", [["--database", "sqlite"], ["--database", "postgresql"]]),
]
#: Environment variables that change what the benchmarks measure, shown in the command.
ENVIRONMENT = ("DATABASE_URL", "REDIS_URL", "CONN_MAX_AGE")
TIMEOUT_SECONDS = 600


def run_script(script: str, args: list[str]) -> dict[str, Any]:
    """Run one benchmark script and return the JSON it printed."""
    command = [sys.executable, str(BENCH / script), *args]
    print(f"$ {shlex.join([script, *args])}", file=sys.stderr, flush=True)
    done = subprocess.run(
        command, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=TIMEOUT_SECONDS, check=False
    )
    if done.returncode != 0:
        sys.exit(f"{script} {shlex.join(args)} failed with exit status {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def command_line() -> str:
    """Return the command as it was run, relative to the repository root."""
    python = Path(sys.executable)
    if python.is_relative_to(ROOT):
        python = python.relative_to(ROOT)
    settings = [f"{name}={redact(os.environ[name])}" for name in ENVIRONMENT if name in os.environ]
    return shlex.join([*settings, str(python), *sys.argv])


def main() -> None:
    """Run every benchmark, print the tables and write the document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=2000, help="timed saves per mode and save")
    args = parser.parse_args()
    started = time.monotonic()
    body = []
    for script, argument_sets in BENCHMARKS:
        results = [run_script(script, [*one, "--saves", str(args.saves)]) for one in argument_sets]
        text = report.benchmark(results)
        print(f"\n{text}\n")
        body.append(text)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(report.document(machine.facts(), command_line(), body))
    print(f"Wrote {DOC.relative_to(ROOT)} in {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    main()
