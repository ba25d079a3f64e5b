"""The correlation id of the work in progress, carried by the events it causes."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar

_correlation_id: ContextVar[str | None] = ContextVar("realtime_correlation_id", default=None)

_VALID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def new_correlation_id() -> str:
    """Return a fresh correlation id."""
    return uuid.uuid4().hex


def clean_correlation_id(value: str | None) -> str | None:
    """Return `value` if it is an acceptable correlation id, else None."""
    if value and _VALID.fullmatch(value):
        return value
    return None


def get_correlation_id() -> str | None:
    """Return the correlation id of the current context, if any."""
    return _correlation_id.get()


@contextlib.contextmanager
def correlation(correlation_id: str | None = None) -> Iterator[str]:
    """Run the block with a correlation id (a new one unless given); yields it."""
    value = clean_correlation_id(correlation_id) or new_correlation_id()
    token = _correlation_id.set(value)
    try:
        yield value
    finally:
        _correlation_id.reset(token)


_written: ContextVar[dict[str, int] | None] = ContextVar("realtime_written", default=None)


@contextlib.contextmanager
def collect_positions() -> Iterator[dict[str, int]]:
    """Collect {stream: seq} of the events logged in the block (for `X-Stream-Position`)."""
    positions: dict[str, int] = {}
    token = _written.set(positions)
    try:
        yield positions
    finally:
        _written.reset(token)


def note_position(stream: str, seq: int) -> None:
    """Record a logged event's position for the innermost `collect_positions` block."""
    positions = _written.get()
    if positions is not None:
        positions[stream] = max(seq, positions.get(stream, 0))
