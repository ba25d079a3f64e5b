"""Settings of our side of the SSE benchmark: config.settings with presence off.

django-eventstream, beside it in the same run, tracks no presence, and an SSE stream of ours
makes its user present on a presence stream (`project:<pk>`): 1,000 streams of 50 users
would announce 50 joins to every reader while they connect. The WebSocket fan-out benchmark
runs with presence off for the same reason (bench/fanout_settings.py). Used by the daphne
that `bench/sse_fanout.py` starts, with bench/ on `PYTHONPATH`.
"""

from __future__ import annotations

from config.settings import *  # noqa: F403
from config.settings import PRESENCE

PRESENCE = {**PRESENCE, "ENABLED": False}  # type: ignore[assignment]
