"""Reading streams over HTTP: parameters, authorization and log reads shared by SSE and the feed."""

from __future__ import annotations

import heapq
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.http import HttpRequest, HttpResponseNotAllowed, JsonResponse

from . import metrics
from .cursor import CursorError, Position, decode, encode
from .events import Envelope, is_valid_version, pick_frame
from .httpauth import Credentials, Refused, Unavailable, authenticate, challenge
from .policies import auth_hash, reload_user, same_password, signed_out, streams_access
from .protocol import Code
from .replay import StreamPosition, position  # noqa: F401 (position: for callers)

MAX_STREAMS = 20


class BadRequest(Exception):
    """A request parameter that cannot be used; answered with 400 and a message."""

    def __init__(
        self, code: str, message: str, status: int = 400, streams: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.streams = streams

    def response(self, request: HttpRequest | None = None) -> JsonResponse:
        """The answer; a `401` to `request` carries the challenge of the first authentication
        class that has one (`httpauth.challenge`)."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.streams is not None:
            error["streams"] = self.streams
        response = JsonResponse({"error": error}, status=self.status)
        if self.status == 401 and request is not None:
            scheme = challenge(request)
            if scheme:
                response["WWW-Authenticate"] = scheme
        return response


def unavailable(message: str) -> JsonResponse:
    """503 `internal_error` with `Retry-After`: the request cannot be answered now (the
    channel layer, or an authentication class that failed, logged); retry later."""
    response = BadRequest("internal_error", message, 503).response()
    response["Retry-After"] = "1"
    response["Cache-Control"] = "no-store"
    return response


async def signed_in(request: HttpRequest, streams: list[str]) -> tuple[Any, Any, dict[str, str]]:
    """(user, credentials, audiences) of a read of `streams` (`httpauth.authenticate`, then
    `authorize`); raises `Answer` with the response that refuses it otherwise."""
    from channels.db import database_sync_to_async

    try:
        user, credentials = await authenticate(request)
        audiences = await database_sync_to_async(authorize, thread_sensitive=False)(user, streams)
    except Refused as exc:
        raise Answer(BadRequest("not_authenticated", exc.message, 401).response(request)) from None
    except Unavailable:
        raise Answer(unavailable("cannot authenticate now; retry")) from None
    except BadRequest as exc:
        raise Answer(exc.response(request)) from None
    return user, credentials, audiences


class Answer(Exception):
    """A response that ends a request early (`signed_in`)."""

    def __init__(self, response: JsonResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


def method_not_allowed(allowed: Sequence[str]) -> HttpResponseNotAllowed:
    """A 405 with the `Allow` header RFC 9110 (15.5.6) asks for, and the endpoints' error body."""
    body = {"error": {"code": "method_not_allowed", "message": f"{', '.join(allowed)} only"}}
    return HttpResponseNotAllowed(allowed, json.dumps(body), content_type="application/json")


def parse_streams(request: HttpRequest) -> list[str]:
    raw = request.GET.get("streams", "")
    streams = list(dict.fromkeys(s.strip() for s in raw.split(",") if s.strip()))
    if not streams:
        raise BadRequest(Code.INVALID_FRAME, "'streams' is required: ?streams=project:42,user:7")
    if len(streams) > MAX_STREAMS:
        raise BadRequest(Code.INVALID_FRAME, f"at most {MAX_STREAMS} streams per request")
    return streams


def parse_cursor(token: str | None) -> dict[str, Position] | None:
    if not token:
        return None
    try:
        return decode(token)
    except CursorError as exc:
        raise BadRequest("invalid_cursor", str(exc)) from None


def parse_version(request: HttpRequest) -> str | None:
    """The `?version=` of the logged events' frames; None gives each event its primary one."""
    raw = request.GET.get("version")
    if not raw:
        return None
    if not is_valid_version(raw):  # as a socket's subscribe (`Subscribe.version`)
        raise BadRequest(Code.UNSUPPORTED_VERSION, "'version' must look like 'v1'")
    return raw


def authorize(user: Any, streams: list[str]) -> dict[str, str]:
    """Raise BadRequest (403 for refused or missing alike) unless every stream is readable.

    Returns each stream's audience: whose payload variant the user gets ("": the default).
    """
    if user is None or not user.is_authenticated or not user.is_active:
        raise BadRequest("not_authenticated", "authentication required", 401)
    audiences = {}
    decided = streams_access(user, streams)  # the streams of one kind together
    for stream in streams:
        code, audience = decided[stream]
        if code is not None and code != Code.FORBIDDEN:
            raise BadRequest(code, f"cannot read {stream!r}: {code}")
        audiences[stream] = audience or ""
    refused = [stream for stream in streams if decided[stream][0] == Code.FORBIDDEN]
    if refused:
        # Every refused stream named, so a client can drop them and ask again for the rest
        # (refused and missing alike: existence does not leak).
        metrics.UNAUTHORIZED.labels("read").inc()
        raise BadRequest(Code.FORBIDDEN, f"not allowed: {', '.join(refused)}", 403, refused)
    return audiences


@dataclass(frozen=True)
class SignIn:
    """What a request was authenticated with, to decide again after it waited (a long poll,
    an SSE stream's re-decisions)."""

    session: Any
    session_key: str | None
    auth_hash: str | None
    at: float
    #: Set when it came with credentials (a token) rather than its session.
    credentials: Credentials | None = None

    @classmethod
    def of(cls, request: HttpRequest, user: Any, credentials: Credentials | None = None) -> SignIn:
        if credentials is not None:
            return cls(None, None, auth_hash(user), time.time(), credentials)
        session = getattr(request, "session", None)
        key = getattr(session, "session_key", None)
        return cls(session, key, auth_hash(user), time.time())

    def still_signed_in(self, user: Any) -> bool:
        """Whether `user` (as stored now) is still signed in by what the request came with.

        Credentials decide as on a new request: they must still authenticate as this user
        (a deleted token, an expired JWT: no). A session must still exist, hold this user and
        the password it was signed in with (Django's session auth hash), as
        `policies.signed_out` and `same_password` check.
        """
        if self.credentials is not None:
            return self.credentials.still_valid()
        return same_password(user, self.auth_hash) and not signed_out(
            self.session, self.session_key, user, self.at
        )

    def reauthorize(self, user: Any, streams: list[str]) -> dict[str, str]:
        """Authorize the user as stored now again for every stream, and return its audiences
        (as `authorize`); BadRequest (401) when it was deleted or deactivated, or is no
        longer signed in (`still_signed_in`), as an SSE stream decides
        (`SSEConnection._recheck`)."""
        fresh = reload_user(user)
        if fresh is None or not fresh.is_active or not self.still_signed_in(fresh):
            raise BadRequest("not_authenticated", "no longer signed in", 401)
        return authorize(fresh, streams)


@dataclass
class Start:
    """Where a reader starts in each stream, and the streams whose history is gone."""

    positions: dict[str, Position]
    resets: list[dict[str, Any]] = field(default_factory=list)
    #: Streams the cursor gave no position for: they start at the current position, which
    #: the reader has not been told yet.
    unplaced: list[str] = field(default_factory=list)


def positions_of(streams: Sequence[str]) -> dict[str, StreamPosition]:
    """Each stream's position (as `replay.position`), all in one query, however many streams."""
    rows = _stream_rows(streams)
    empty = StreamPosition(seq=0, epoch=None, first_kept=1)  # no row yet, as `position` says
    return {stream: rows[stream][1] if stream in rows else empty for stream in streams}


def _stream_rows(streams: Sequence[str]) -> dict[str, tuple[int, StreamPosition]]:
    """{stream: (its row's pk, its position)} of the streams that have a row, in one query.

    The oldest kept seq is a correlated subquery per stream row: one probe of the
    (stream, seq) index each, where a GROUP BY would scan every kept event of the streams.
    """
    from django.db.models import OuterRef, Subquery

    from .models import Event, Stream

    first = Event.objects.filter(stream_id=OuterRef("pk")).order_by("seq").values("seq")[:1]
    rows = (
        Stream.objects.filter(name__in=list(streams))
        .annotate(first_kept=Subquery(first))
        .values_list("name", "pk", "last_seq", "epoch", "first_kept")
    )
    return {
        name: (pk, StreamPosition(last_seq, epoch, last_seq + 1 if first is None else first))
        for name, pk, last_seq, epoch, first in rows
    }


def starting_positions(streams: list[str], cursor: dict[str, Position] | None) -> Start:
    """Resume from the cursor where the log still covers it; elsewhere start now (a reset)."""
    start = Start(positions={})
    current = positions_of(streams)
    for stream in streams:
        now = current[stream]
        given = (cursor or {}).get(stream)
        if given is not None and now.covers(given.seq, given.epoch):
            start.positions[stream] = Position(given.seq, now.epoch)
            continue
        start.positions[stream] = Position(now.seq, now.epoch)
        if given is None:
            start.unplaced.append(stream)
        else:  # a cursor we cannot resume: tell the client to refetch
            start.resets.append(
                {"op": "reset", "stream": stream, "epoch": now.epoch, "seq": now.seq}
            )
    return start


def read_events(
    positions: dict[str, Position],
    limit: int,
    version: str | None = None,
    audiences: dict[str, str] | None = None,
) -> tuple[list[tuple[str, int, str, str]], dict[str, Position], list[dict[str, Any]]]:
    """Read up to `limit` events after the positions, oldest first across streams.

    Returns (events as (stream, seq, type, frame text), the positions after them, resets).
    Each frame is the event's `version` one when it has it, else its primary one, and of
    the stream's audience in `audiences` where the event has a payload for it, as for a
    socket's subscription. Within a stream the events keep their seq order, so the new
    positions never skip one. A stream whose next event was pruned after its position was
    checked gives a reset at its position now instead of its events. Two queries, however
    many streams: their positions, then their events.
    """
    after = dict(positions)
    resets = []
    # Read before the events: every seq up to a stream's `last_seq` read here was committed
    # (with it), so one of them missing from the read below was pruned, not not-yet-written.
    current = _stream_rows(list(positions))
    rows = _read_after(
        {current[s][0]: (s, pos.seq) for s, pos in positions.items() if s in current}, limit
    )
    per_stream = []
    for stream, pos in positions.items():
        if stream not in current:
            continue  # no row: nothing logged yet
        now = current[stream][1]
        read = rows.get(stream, [])
        if (read and read[0][0] > pos.seq + 1) or (not read and now.seq > pos.seq):
            # The log has no hole but its pruned front.
            after[stream] = Position(now.seq, now.epoch)
            resets.append({"op": "reset", "stream": stream, "epoch": now.epoch, "seq": now.seq})
            continue
        audience = (audiences or {}).get(stream)
        per_stream.append(
            [
                (ts, stream, seq, kind, pick_frame(frames, version, audience))
                for seq, kind, frames, ts in read
            ]
        )
    events = []
    for _ts, stream, seq, type_, frame in itertools.islice(
        heapq.merge(*per_stream, key=lambda event: event[0]), limit
    ):
        events.append((stream, seq, type_, frame))
        after[stream] = Position(seq, after[stream].epoch)
    return events, after, resets


def _read_after(
    after: dict[int, tuple[str, int]], limit: int
) -> dict[str, list[tuple[int, str, dict[str, str], Any]]]:
    """Up to `limit` (seq, type, frames by version, timestamp) after a seq for each stream, in
    seq order, in one query; `after` is {stream pk: (stream name, seq)}.

    A stream's seqs have no hole but its pruned front, so its next `limit` events are the
    seqs in (seq, seq + limit]: one range of the (stream, seq) index per stream, OR'ed,
    rather than a LIMIT per stream (which SQLite cannot put in a UNION).
    """
    from django.db.models import Q

    from .models import Event

    if not after:
        return {}
    window = Q()
    for pk, (_name, seq) in after.items():
        window |= Q(stream_id=pk, seq__gt=seq, seq__lte=seq + limit)
    query = (
        Event.objects.filter(window)
        .order_by("stream_id", "seq")
        .only(
            "stream_id",
            "seq",
            "event_id",
            "type",
            "timestamp",
            "correlation_id",
            "data",
            "variants",
        )
    )
    read: dict[str, list[tuple[int, str, dict[str, str], Any]]] = {}
    for row in query:
        name = after[row.stream_id][0]
        read.setdefault(name, []).append(
            (row.seq, row.type, Envelope.from_row(row, stream=name).frames(), row.timestamp)
        )
    return read


def cursor_of(positions: dict[str, Position]) -> str:
    return encode(positions)


async def release_request_connections() -> None:
    """Close the database connections of this request's own thread.

    Under ASGI, Django gives each request a thread for its sync work (`request.auser()`,
    sessions); its connection would otherwise stay open for as long as an SSE stream or a long
    poll lasts: one server connection per waiting client. Later reads use worker threads.
    """
    from asgiref.sync import sync_to_async
    from django.db import connections

    await sync_to_async(connections.close_all)()
