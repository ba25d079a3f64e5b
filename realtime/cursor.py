"""Opaque cursors holding a position in several streams at once (SSE ids, the event feed)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from .streams import is_valid_stream

_MAX_STREAMS = 100


class CursorError(ValueError):
    """A cursor that is not one of ours."""


@dataclass(frozen=True)
class Position:
    """A stream's position: the last seq seen, and the epoch it belongs to."""

    seq: int
    epoch: str | None


def encode(positions: dict[str, Position]) -> str:
    """Encode {stream: Position} as a short URL-safe token."""
    payload = {s: [p.seq, p.epoch] for s, p in sorted(positions.items())}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str) -> dict[str, Position]:
    """Decode a cursor, raising CursorError for anything we did not make."""
    if not token or len(token) > 16_000:
        raise CursorError("cursor is empty or too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested 10,000 deep: RecursionError
        raise CursorError("cursor is not valid") from None
    if not isinstance(payload, dict) or len(payload) > _MAX_STREAMS:
        raise CursorError("cursor is not valid")
    positions: dict[str, Position] = {}
    for stream, value in payload.items():
        if (
            not is_valid_stream(stream)
            or not isinstance(value, list)
            or len(value) != 2
            or not isinstance(value[0], int)
            or isinstance(value[0], bool)
            or value[0] < 0
            or not (value[1] is None or isinstance(value[1], str))
        ):
            raise CursorError("cursor is not valid")
        positions[stream] = Position(value[0], value[1])
    return positions


def header(positions: dict[str, int]) -> str:
    """The `X-Stream-Position` header value: `project:42=131, user:7=9`."""
    return ", ".join(f"{stream}={seq}" for stream, seq in sorted(positions.items()))
