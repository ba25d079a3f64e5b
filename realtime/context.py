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
    if value and _VALID.match(value):
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
