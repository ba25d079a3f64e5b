"""Stream names (`<kind>:<key>`) and the channel-layer group each one maps to."""

from __future__ import annotations

import hashlib
import re

from .conf import realtime_settings

KIND_PATTERN = r"[a-z][a-z0-9_]{0,31}"
KEY_PATTERN = r"[A-Za-z0-9._~@+=-]{1,128}"
_STREAM = re.compile(rf"^(?P<kind>{KIND_PATTERN}):(?P<key>{KEY_PATTERN})$")
# Channels accepts ASCII letters, digits, '-', '_' and '.' in group names, under 100 chars.
_GROUP_MAX = 99
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


class InvalidStreamName(ValueError):
    """A stream name that is not `<kind>:<key>`."""


def parse_stream(name: object) -> tuple[str, str]:
    """Split a stream name into (kind, key), raising InvalidStreamName when it is malformed."""
    if not isinstance(name, str):
        raise InvalidStreamName(f"a stream name must be a string, not {type(name).__name__}")
    match = _STREAM.fullmatch(name)
    if match is None:
        raise InvalidStreamName(
            f"invalid stream name {name[:200]!r}: expected '<kind>:<key>' where kind matches "
            f"{KIND_PATTERN} and key matches {KEY_PATTERN}"
        )
    return match["kind"], match["key"]


def is_valid_stream(name: object) -> bool:
    """Return whether `name` is a well-formed stream name."""
    try:
        parse_stream(name)
    except InvalidStreamName:
        return False
    return True


def _escape(part: str) -> str:
    # '_' is the escape character, so the mapping stays one-to-one.
    return "".join(ch if ch in _SAFE else f"_{ord(ch):02x}" for ch in part)


def group_name(stream: str) -> str:
    """Return the channel-layer group of a stream (`project:42` -> `rt.project.42`)."""
    kind, key = parse_stream(stream)
    prefix = realtime_settings.GROUP_PREFIX
    name = f"{prefix}.{_escape(kind)}.{_escape(key)}"
    if len(name) > _GROUP_MAX:
        digest = hashlib.sha256(stream.encode()).hexdigest()[:40]
        name = f"{prefix}.{_escape(kind)}.h.{digest}"
        if len(name) > _GROUP_MAX:
            # A long kind full of escapes: drop it. A lone `_` is no escaped kind (an escape
            # is `_` and two hex digits), so this form cannot be another stream's.
            name = f"{prefix}._.h.{digest}"
    return name


def wire_id(pk: object) -> int | str:
    """A user's pk as channel-layer messages carry it: an int as it is, anything else (a
    UUID) as text, which every layer's serializer takes (channels-redis packs with msgpack,
    which refuses a UUID). A received id equals `wire_id` of the same pk."""
    if isinstance(pk, int) and not isinstance(pk, bool):
        return pk
    return str(pk)
