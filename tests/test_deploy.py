"""The example deployment files in deploy/ agree with the code they run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.core.management import get_commands

from realtime.conf import realtime_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def nginx_locations() -> dict[str, str]:
    """Each `location` block of deploy/nginx.conf, by its path (blocks hold no nested braces)."""
    text = (DEPLOY / "nginx.conf").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"location\s+(\S+)\s*\{([^}]*)\}", text)}


def seconds(block: str, directive: str) -> float:
    match = re.search(rf"{directive}\s+(\d+)s;", block)
    assert match, f"no {directive}"
    return float(match.group(1))


def test_every_proxied_location_passes_the_host_and_the_scheme():
    locations = nginx_locations()
    assert {"/ws/", "/realtime/sse/", "/realtime/metrics", "/"} <= set(locations)
    for path, block in locations.items():
        if "proxy_pass" not in block:
            continue
        # Django checks Host against ALLOWED_HOSTS (and WebSocket origins against it), and
        # SECURE_PROXY_SSL_HEADER reads the scheme: the upstream's name and plain HTTP fail.
        assert "proxy_set_header Host $host;" in block, path
        assert "proxy_set_header X-Forwarded-Proto $scheme;" in block, path
        assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in block, path


def test_proxy_timeouts_outlast_heartbeats_and_long_polls():
    locations = nginx_locations()
    heartbeat = float(realtime_settings.HEARTBEAT)
    assert seconds(locations["/ws/"], "proxy_read_timeout") > 2 * heartbeat
    assert seconds(locations["/realtime/sse/"], "proxy_read_timeout") > 2 * 15  # SSE comments
    assert "proxy_buffering off;" in locations["/realtime/sse/"]
    assert seconds(locations["/"], "proxy_read_timeout") > 25  # the feed's longest wait


def commands_in(path: Path) -> list[str]:
    return re.findall(r"manage\.py\s+([a-z_]+)", path.read_text())


@pytest.mark.parametrize(
    "name", sorted(p.name for p in DEPLOY.iterdir() if p.suffix in {".service", ""})
)
def test_the_management_commands_the_files_run_exist(name):
    found = commands_in(DEPLOY / name)
    known = get_commands()
    assert all(command in known for command in found), (name, found)


def test_every_process_and_job_of_operations_has_a_unit():
    units = {p.name: p.read_text() for p in DEPLOY.glob("*.service")}
    run = [c for text in units.values() for c in re.findall(r"manage\.py\s+([a-z_]+)", text)]
    assert sorted(run) == ["presence_sweep", "realtime_prune", "realtime_relay"]
    assert "daphne" in units["realtime-web@.service"]
    timer = (DEPLOY / "realtime-prune.timer").read_text()
    assert "OnCalendar=hourly" in timer  # docs/operations.md: retention hourly
    assert "Type=oneshot" in units["realtime-prune.service"]
    procfile = commands_in(DEPLOY / "Procfile")
    assert {"realtime_relay", "presence_sweep", "migrate", "check"} <= set(procfile)
