"""Protocol v1 frames: inbound frames parsed into typed values, error and close codes named."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .events import is_valid_type, is_valid_version
from .streams import is_valid_stream

PROTOCOL = "v1"


class Close:
    """WebSocket close codes; docs/protocol.md says which ones a client should reconnect after."""

    NORMAL = 1000
    GOING_AWAY = 1001
    # Not 1011: daphne (autobahn) sends only 1000 and 3000-4999, and raises for any other.
    INTERNAL_ERROR = 4500
    DISCONNECTED = 4000  # closed by an operator (admin "disconnect"); reconnect with backoff
    MALFORMED = 4400
    UNAUTHENTICATED = 4401
    FORBIDDEN = 4403
    HEARTBEAT_TIMEOUT = 4408
    SLOW_CONSUMER = 4409
    TOO_LARGE = 4413
    RATE_LIMITED = 4429


class Code:
    """Error codes in `reply` frames."""

    INVALID_JSON = "invalid_json"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    TOO_LARGE = "frame_too_large"
    TOO_DEEP = "too_deep"
    UNKNOWN_OP = "unknown_op"
    INVALID_FRAME = "invalid_frame"
    INVALID_STREAM = "invalid_stream"
    UNKNOWN_STREAM = "unknown_stream"
    FORBIDDEN = "forbidden"
    NOT_SUBSCRIBED = "not_subscribed"
    ALREADY_SUBSCRIBED = "already_subscribed"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    EVENT_NOT_ALLOWED = "event_not_allowed"
    RATE_LIMITED = "rate_limited"
    UNSUPPORTED_VERSION = "unsupported_version"
    INTERNAL_ERROR = "internal_error"


class ProtocolError(Exception):
    """An inbound frame that cannot be handled; becomes an error reply, never a traceback."""

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


@dataclass(frozen=True)
class Subscribe:
    ref: str | None
    stream: str
    since: int | None
    epoch: str | None
    version: str | None


@dataclass(frozen=True)
class Unsubscribe:
    ref: str | None
    stream: str


@dataclass(frozen=True)
class Publish:
    ref: str | None
    stream: str
    type: str
    data: Any


@dataclass(frozen=True)
class Ping:
    ref: str | None


@dataclass(frozen=True)
class Pong:
    ref: str | None


Frame = Subscribe | Unsubscribe | Publish | Ping | Pong


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def _field(
    frame: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    ref: str | None,
    *,
    required: bool = True,
) -> Any:
    value = frame.get(name)
    if value is None:
        if required:
            raise ProtocolError(Code.INVALID_FRAME, f"'{name}' is required", ref)
        return None
    # bool is an int in Python; a JSON true is never a valid number here.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        expected = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise ProtocolError(Code.INVALID_FRAME, f"'{name}' must be {expected}", ref)
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _stream(frame: dict[str, Any], ref: str | None) -> str:
    stream = _field(frame, "stream", str, ref)
    if not is_valid_stream(stream):
        raise ProtocolError(Code.INVALID_STREAM, "stream must be '<kind>:<key>'", ref)
    return str(stream)


def _not_json(name: str) -> Any:
    # Python's json reads NaN, Infinity and -Infinity; JSON has no such values.
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    # `1e999` is valid JSON text for a number no double holds: Python reads it as infinity,
    # which nothing could send on (events refuse NaN and infinities).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _encodable(value: Any) -> bool:
    """Whether every string in `value` can be sent as UTF-8 (no lone surrogate).

    Iterative, as `_depth_ok` is: it runs before the depth check, on whatever nesting the
    parser took, and a recursion here would fail a deep frame with an internal error instead
    of `too_deep`.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def parse(text: str, *, max_bytes: int, max_depth: int) -> Frame:
    """Parse and validate one inbound text frame, raising ProtocolError with a documented code."""
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError(Code.TOO_LARGE, f"frames are limited to {max_bytes} bytes")
    try:
        frame = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ProtocolError(Code.TOO_DEEP, f"JSON nesting is limited to {max_depth}") from None
    except ValueError:
        raise ProtocolError(Code.INVALID_JSON, "the frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError(Code.INVALID_FRAME, "a frame must be a JSON object")
    # A text frame arrives as UTF-8, so a lone surrogate can only come from a `\ud8xx`-style
    # escape: valid JSON, but no reply or event holding it could be sent.
    if "\\u" in text and not _encodable(frame):
        raise ProtocolError(Code.INVALID_FRAME, "strings must not hold lone surrogates")
    raw_ref = frame.get("ref")
    ref = raw_ref if isinstance(raw_ref, str) and len(raw_ref) <= 64 else None
    if raw_ref is not None and ref is None:
        raise ProtocolError(Code.INVALID_FRAME, "'ref' must be a string of at most 64 characters")
    if not _depth_ok(frame, max_depth):
        raise ProtocolError(Code.TOO_DEEP, f"JSON nesting is limited to {max_depth}", ref)
    op = frame.get("op")
    if op == "subscribe":
        since = _field(frame, "since", int, ref, required=False)
        if since is not None and since < 0:
            raise ProtocolError(Code.INVALID_FRAME, "'since' must not be negative", ref)
        epoch = _field(frame, "epoch", str, ref, required=False)
        version = _field(frame, "version", str, ref, required=False)
        if version is not None and not is_valid_version(version):
            raise ProtocolError(Code.UNSUPPORTED_VERSION, "'version' must look like 'v1'", ref)
        return Subscribe(ref, _stream(frame, ref), since, epoch, version)
    if op == "unsubscribe":
        return Unsubscribe(ref, _stream(frame, ref))
    if op == "publish":
        stream = _stream(frame, ref)
        type_ = _field(frame, "type", str, ref)
        if not is_valid_type(type_):
            raise ProtocolError(
                Code.INVALID_FRAME, "'type' must look like 'v1:typing.started'", ref
            )
        data = frame.get("data", {})
        if not isinstance(data, dict):
            raise ProtocolError(Code.INVALID_FRAME, "'data' must be an object", ref)
        return Publish(ref, stream, type_, data)
    if op == "ping":
        return Ping(ref)
    if op == "pong":
        return Pong(ref)
    raise ProtocolError(
        Code.UNKNOWN_OP, "'op' must be subscribe, unsubscribe, publish, ping or pong", ref
    )


def dumps(frame: dict[str, Any]) -> str:
    """Serialize an outbound frame compactly."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def reply(ref: str | None, data: Any = None) -> str:
    return dumps({"op": "reply", "ref": ref, "ok": True, "data": data if data is not None else {}})


def error(ref: str | None, code: str, message: str) -> str:
    return dumps(
        {"op": "reply", "ref": ref, "ok": False, "error": {"code": code, "message": message}}
    )
