"""Run the benchmarks in bench/, print their tables and write docs/performance.md.

Each benchmark script is run as a subprocess once per argument set (so each run configures
Django afresh, e.g. on its own database) and prints one JSON object on stdout: `benchmark`,
`about`, `title`, `columns`, `rows`, `verdict` and `notes` (or `tables` and `verdicts` for a
run with several tables, see report.section), or `skipped` with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import machine
import plot
import report
from services import redact

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DOC = ROOT / "docs" / "performance.md"
#: Each benchmark script, the argument sets it runs with (one subprocess per set), and the
#: options of this script that it is given too.
BENCHMARKS: list[tuple[str, list[list[str]], tuple[str, ...]]] = [
    ("write_path.py", [["--database", "sqlite"], ["--database", "postgresql"]], ("saves",)),
    ("fanout.py", [[]], ("subscribers",)),
]
#: Benchmarks that print their own Markdown tables: (script, arguments).
TABLE_BENCHMARKS: list[tuple[str, list[str]]] = [
    ("http_conditional.py", ["--requests", "1000"]),
    ("sse_fanout.py", ["--clients", "200"]),
    ("sse_fanout.py", ["--clients", "1000"]),
    ("notify_bulk.py", []),
    ("presence_bench.py", []),
    ("replay_bench.py", []),
    ("connections.py", []),
]
#: Environment variables that change what the benchmarks measure, shown in the command.
ENVIRONMENT = ("DATABASE_URL", "REDIS_URL", "CONN_MAX_AGE")
TIMEOUT_SECONDS = 1500  # the fan-out run: four systems x three sizes, then the interleaved
# blocks of four systems at 1,000 and 5,000 subscribers; 12-14 minutes in all
#: The plots, written beside the document.
PLOT = "performance-fanout.png"
SSE_PLOT = "performance-sse.png"
#: Table benchmarks that append plot points to a JSON-lines file given as `--data`.
PLOTTED = {"sse_fanout.py"}
#: A verdict line of a benchmark's output, gathered into the summary at the top.
VERDICT = re.compile(r"^\**(PASS|MISS|NOT MEASURED)\b.*?\**$")


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


def run_table_script(script: str, args: list[str]) -> str:
    """Run a benchmark that prints Markdown, and return what it printed."""
    print(f"$ {shlex.join([script, *args])}", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"{script} {shlex.join(args)} failed with exit status {done.returncode}")
    return done.stdout.strip()


def demoted(markdown: str) -> str:
    """A table benchmark's Markdown with its headings one level down, under the document's."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


def verdicts(body: list[str]) -> str:
    """The summary: every PASS/MISS line of every benchmark, in the order they ran."""
    found = [
        "- " + line.strip().strip("*")
        for text in body
        for line in text.splitlines()
        if VERDICT.match(line.strip())
    ]
    return "## Targets\n\n" + ("\n".join(found) or "No benchmark reported a verdict.")


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
    parser.add_argument(
        "--subscribers", default="100,1000,5000", help="fan-out: subscriber counts, comma-separated"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[script for script, _, _ in BENCHMARKS]
        + [script for script, _ in TABLE_BENCHMARKS],
        help="run only this benchmark (repeatable)",
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="where to write the document")
    args = parser.parse_args()
    started = time.monotonic()
    body = []
    for script, argument_sets, options in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        extra = [f"--{name}={getattr(args, name)}" for name in options]
        results = [run_script(script, [*one, *extra]) for one in argument_sets]
        text = report.benchmark(results)
        rounds = [r for result in results for r in result.get("rounds", [])]
        if rounds and plot.fanout_png(rounds, args.doc.resolve().parent / PLOT):
            text += (
                f"\n\n![Delivered events/s and one-event p99 against subscribers]({PLOT})"
                f"\n\n{PLOT}: ours, plain Channels, DCRF and the ceiling from the rounds above."
            )
        print(f"\n{text}\n")
        body.append(text)
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        data = Path(scratch) / "points.jsonl"
        for script, arguments in TABLE_BENCHMARKS:
            if args.only and script not in args.only:
                continue
            extra = ["--data", str(data)] if script in PLOTTED else []
            text = demoted(run_table_script(script, [*arguments, *extra]))
            print(f"\n{text}\n")
            body.append(text)
        points = (
            [json.loads(line) for line in data.read_text().splitlines()] if data.exists() else []
        )
    if points and plot.sse_png(points, args.doc.resolve().parent / SSE_PLOT):
        body.append(
            f"## SSE plot\n\n![SSE delivered events/s and p99 against clients]({SSE_PLOT})\n\n"
            f"{SSE_PLOT}: ours beside django-eventstream, from the SSE runs above."
        )
    doc = args.doc.resolve()
    doc.parent.mkdir(exist_ok=True)
    summary = verdicts(body)
    print(f"\n{summary}\n")
    doc.write_text(report.document(machine.facts(), command_line(), [summary, *body]))
    shown = doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc
    print(f"Wrote {shown} in {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    main()
