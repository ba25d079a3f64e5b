"""The fan-out plot of docs/performance.md: delivered events/s and p99 against subscribers.

Drawn with matplotlib (the `bench` extra) from the rounds `fanout.py` reports: for each
system and subscriber count, the highest delivered events/s of its rate steps (what it
sustains) and the p99 of one event's deliveries to every subscriber.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: How each system is drawn: (label, colour, marker), in legend order.
STYLES = {
    "ours": ("ours (realtime)", "#1f77b4", "o"),
    "plain Channels": ("plain Channels", "#d62728", "s"),
    "DCRF": ("DCRF (django-channels-rest-framework)", "#2ca02c", "D"),
    "ceiling": ("ceiling (bare websockets, no Django)", "#7f7f7f", "^"),
    "ours on uvicorn": ("ours on uvicorn (diagnostic)", "#17becf", "o"),
    "daphne floor": ("daphne floor (diagnostic)", "#bcbd22", "v"),
}


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when the bench extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, figure: Any, path: Path) -> None:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def series(rounds: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, float]]]:
    """{system: [(subscribers, sustained events/s, one-event p99 ms)]} sorted by subscribers."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for one in rounds:
        if one.get("error"):
            continue
        delivered = max((s["delivered_per_s"] for s in one.get("steps", [])), default=math.nan)
        p99 = (one.get("single") or {}).get("p99", math.nan) * 1000  # seconds in the rounds
        out.setdefault(one["system"], []).append((one["subscribers"], delivered, p99))
    return {system: sorted(points) for system, points in out.items()}


def fanout_png(rounds: list[dict[str, Any]], path: Path) -> bool:
    """Draw the plot into `path`; False (and nothing written) without matplotlib or data."""
    plt = _pyplot()
    if plt is None:
        return False
    data = series(rounds)
    if not data:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, (label, colour, marker) in STYLES.items():
        points = data.get(system)
        if not points:
            continue
        counts = [n for n, _, _ in points]
        left.plot(counts, [d for _, d, _ in points], marker=marker, color=colour, label=label)
        right.plot(counts, [p for _, _, p in points], marker=marker, color=colour, label=label)
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_xlabel("subscribers (2 nodes)")
        axes.grid(True, which="both", alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("delivered events/s (highest rate step)")
    left.set_title("Sustained delivery")
    right.set_yscale("log")
    right.set_ylabel("p99 ms, one event to every subscriber")
    right.set_title("Latency of one event")
    left.legend(loc="best", fontsize="small")
    _save(plt, figure, path)
    return True


def sse_png(points: list[dict[str, Any]], path: Path) -> bool:
    """SSE: each system's highest delivered/s and its p99 at the slowest rate, per client count."""
    plt = _pyplot()
    if plt is None:
        return False
    systems: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        systems.setdefault(point["system"], []).append(point)
    if not systems:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    rates = sorted({f"{point['rate']:g}" for point in points})
    ordered = sorted(systems.items(), key=lambda item: not item[0].startswith("ours"))
    for (system, mine), colour in zip(ordered, colours, strict=False):
        mine.sort(key=lambda point: point["clients"])
        clients = [point["clients"] for point in mine]
        left.plot(clients, [p["delivered_per_s"] for p in mine], marker="o", color=colour)
        right.plot(clients, [p["p99_ms"] for p in mine], marker="o", color=colour, label=system)
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_xlabel("SSE clients (one daphne process)")
        axes.grid(True, which="both", alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("delivered events/s (highest rate step)")
    left.set_title("SSE: sustained delivery")
    right.set_yscale("log")
    right.set_ylabel(f"p99 ms at {', '.join(map(str, rates))} events/s")
    right.set_title("SSE: latency at the slowest rate")
    right.legend(loc="best", fontsize="small")
    _save(plt, figure, path)
    return True
