"""The JS client's unit tests (tests/js/, Node's built-in runner), run as part of the suite."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .conftest import need

ROOT = Path(__file__).resolve().parent.parent


def test_node_unit_tests_of_realtime_js_pass():
    node = shutil.which("node")
    need(node is not None, "Node.js is not installed (the JS client's unit tests need it)")
    done = subprocess.run(
        [node, "--experimental-detect-module", "--test", "tests/js/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    summary = [line for line in done.stdout.splitlines() if line.startswith(("# pass", "# fail"))]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert summary[0].split()[-1] != "0", summary  # tests ran
    assert summary[1] == "# fail 0", summary
