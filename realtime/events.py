"""The event envelope and its wire serialization, done once per event and version."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

_TYPE = re.compile(r"^v[1-9][0-9]{0,3}:[a-z][a-z0-9_]{0,49}\.[a-z][a-z0-9_]{0,39}$")
_VERSION = re.compile(r"^v[1-9][0-9]{0,3}$")


def is_valid_type(value: object) -> bool:
    """Return whether `value` is an event type such as `v1:item.updated`."""
    return isinstance(value, str) and bool(_TYPE.fullmatch(value))


def is_valid_version(value: object) -> bool:
    """Return whether `value` is a version such as `v1`."""
    return isinstance(value, str) and bool(_VERSION.fullmatch(value))


def format_timestamp(value: dt.datetime) -> str:
    """Return an ISO 8601 UTC timestamp with milliseconds (`2026-11-27T12:00:00.123Z`)."""
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class EventJSONEncoder(DjangoJSONEncoder):
    """`DjangoJSONEncoder` that refuses NaN and infinities (`ValueError`).

    Python's json writes them as `NaN` and `Infinity`, which are not JSON: no browser parses
    such a frame, and PostgreSQL's jsonb refuses the row.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_nan"] = False
        super().__init__(*args, **kwargs)


def dumps(value: Any) -> str:
    """Serialize to compact JSON, understanding dates, decimals and UUIDs.

    Raises `ValueError` for NaN and infinite floats, which JSON cannot carry.
    """
    return json.dumps(
        value, cls=DjangoJSONEncoder, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def variant_key(version: str, audience: str | None = None) -> str:
    """The key of an event's payload for one version and audience: `v1`, or `v1/owner`."""
    return f"{version}/{audience}" if audience else version


def pick_frame(frames: dict[str, str], version: str | None, audience: str | None = None) -> str:
    """The frame of `version` among an event's serialized frames, else its primary one; of
    `audience`'s payload where the event has one, else of the default payload."""
    if audience:
        if version not in frames:
            version = next(iter(frames))  # the primary version's key
        frame = frames.get(f"{version}/{audience}")
        if frame is not None:
            return frame
    return frames.get(version or "") or next(iter(frames.values()))


def frame_field(frame: str, name: str) -> str | None:
    """A text field of a serialized event frame, read without parsing the frame.

    `Envelope.frame` writes `op`, `stream`, `seq`, `eventId`, `type`, `timestamp`,
    `correlationId`, then `data`, in that order. None of the fields before `data` can hold
    the text `"<name>":"` except the field itself (stream names and types have no quotes,
    and quotes in other strings are escaped), so the first match is the field, for every
    field up to `correlationId`. Costs a string search: the fan-out reads it per event.
    """
    marker = f'"{name}":"'
    start = frame.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = frame.find('"', start)
    return frame[start:end] if end > start else None


@dataclass(frozen=True)
class Envelope:
    """A durable event as it travels: stream position, identity, type and payload."""

    stream: str
    seq: int
    event_id: uuid.UUID
    type: str
    timestamp: dt.datetime
    correlation_id: str
    data: Any
    # Other versions and audiences of the same event, by `variant_key`:
    # {"v2": ("v2:item.updated", {...}), "v1/owner": ("v1:item.updated", {...})}.
    variants: dict[str, tuple[str, Any]] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.type.split(":", 1)[0]

    def frame(self, version: str | None = None) -> dict[str, Any]:
        """Return the `event` frame of one `variant_key` (the primary one by default)."""
        type_, data = self.type, self.data
        if version is not None and version != self.version:
            type_, data = self.variants[version]
        return {
            "op": "event",
            "stream": self.stream,
            "seq": self.seq,
            "eventId": str(self.event_id),
            "type": type_,
            "timestamp": format_timestamp(self.timestamp),
            "correlationId": self.correlation_id or None,
            "data": data,
        }

    def frames(self) -> dict[str, str]:
        """Return the serialized frame of every version and audience, by `variant_key`; the
        primary one first."""
        versions = [self.version, *self.variants]
        return {version: dumps(self.frame(version)) for version in versions}

    @classmethod
    def from_row(cls, row: Any, stream: str | None = None) -> Envelope:
        """Build an envelope from an `Event` row."""
        return cls(
            stream=stream if stream is not None else row.stream.name,
            seq=row.seq,
            event_id=row.event_id,
            type=row.type,
            timestamp=row.timestamp,
            correlation_id=row.correlation_id,
            data=row.data,
            variants={v: (p["type"], p["data"]) for v, p in (row.variants or {}).items()},
        )
