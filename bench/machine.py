"""Facts about this machine and the software versions a benchmark ran with."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("Django", "channels", "channels-redis", "redis", "psycopg", "daphne", "websockets")


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def memory() -> str:
    """Return the total RAM from /proc/meminfo, in GiB."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    return "unknown"


def version(package: str) -> str:
    """Return an installed package's version."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def facts() -> list[tuple[str, str]]:
    """Return (name, value) pairs: processors, CPU, RAM, OS, Python and package versions."""
    return [
        ("nproc", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu_model()),
        ("RAM", memory()),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        *((package, version(package)) for package in PACKAGES),
    ]
