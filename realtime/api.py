"""HTTP API of the realtime app: WebSocket tickets, and the event feed with long poll."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, HttpResponseNotModified, JsonResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import permissions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import metrics
from .conditional import etag_matches, make_etag
from .conf import realtime_settings
from .fanout import get_hub
from .feed import (
    Answer,
    BadRequest,
    SignIn,
    cursor_of,
    method_not_allowed,
    parse_cursor,
    parse_streams,
    parse_version,
    read_events,
    release_request_connections,
    signed_in,
    starting_positions,
    unavailable,
)
from .httpauth import Unavailable
from .tickets import issue

logger = logging.getLogger("realtime.api")


class TicketSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """The body of a new ticket (for the OpenAPI schema)."""

    ticket = serializers.CharField(help_text="Single use; pass it as `?ticket=`.")
    expiresIn = serializers.IntegerField(help_text="Seconds the ticket stays valid.")


class ErrorSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """DRF's error body, `{"detail": "..."}` (for the OpenAPI schema)."""

    detail = serializers.CharField()


@extend_schema(
    request=None,
    responses={
        201: TicketSerializer,
        403: OpenApiResponse(ErrorSerializer, description="Not authenticated."),
    },
)
class TicketView(APIView):
    """POST: a single-use ticket for `?ticket=` on `/ws/realtime/`, for clients without cookies."""

    permission_classes = [permissions.IsAuthenticated]
    throttle_writes = False  # a ticket writes no event (realtime.throttling)

    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        response = Response(
            {"ticket": issue(request.user), "expiresIn": int(realtime_settings.TICKET_TTL)},
            status=status.HTTP_201_CREATED,
        )
        response["Cache-Control"] = "no-store"
        return response


class _Waker:
    """A hub subscriber that only notes that something arrived."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def deliver(self, message: dict[str, Any]) -> None:
        if not message.get("ephemeral"):
            self.event.set()

    def resync(self) -> None:
        self.event.set()  # the channel layer may have lost events: read the log again


async def event_feed(request: HttpRequest) -> HttpResponse:
    """GET: events after a cursor, oldest first; with `wait`, held until one arrives (long poll)."""
    if request.method != "GET":
        return method_not_allowed(["GET"])
    try:
        streams = parse_streams(request)
        version = parse_version(request)
        cursor = parse_cursor(request.GET.get("cursor"))
        limit = _number(request, "limit", 100, 1, 500, int)
        wait = _number(request, "wait", 0, 0, 25, float)
    except BadRequest as exc:
        return exc.response(request)
    try:
        user, credentials, audiences = await signed_in(request, streams)
    except Answer as refused:
        return refused.response
    sign_in = SignIn.of(request, user, credentials)
    start = await _db(starting_positions)(streams, cursor)
    events, after, resets = await _db(read_events)(start.positions, limit, version, audiences)
    resets = [*start.resets, *resets]
    if not events and not resets and wait > 0:
        await release_request_connections()
        hub = get_hub()
        waker = _Waker()
        # A waiting poll is a live connection of its own transport, as a socket or an SSE
        # stream is: counted from here until it answers, however it ends.
        metrics.CONNECTS.labels("poll").inc()
        metrics.CONNECTIONS.labels("poll").inc()
        try:
            # Inside the try: a join that fails or is cancelled (the client left) must not
            # leave the streams joined before it holding the waker, and this node in their
            # groups, for as long as the process runs. Leaving a stream never joined is a no-op.
            try:
                for stream in streams:
                    await hub.join(stream, waker)
            except Exception:
                logger.exception(
                    "long poll of %s could not wait (channel layer)",
                    ",".join(streams),
                    extra={"user": getattr(user, "pk", None)},
                )
                return unavailable("cannot wait for events now; retry")
            # Joined first, then read again: an event committed meanwhile is in one or the other.
            events, after, resets = await _db(read_events)(
                start.positions, limit, version, audiences
            )
            if not events and not resets:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await waker.event.wait()
                # Held for up to `wait` seconds: decide again, about the user and the session
                # as they are now, before handing out what committed meanwhile (as a socket
                # is revoked, or closed by a logout or a password change).
                try:
                    audiences = await _db(sign_in.reauthorize)(user, streams)
                except Unavailable:
                    return unavailable("cannot authenticate now; retry")
                except BadRequest as exc:
                    return exc.response(request)
                events, after, resets = await _db(read_events)(
                    start.positions, limit, version, audiences
                )
        finally:
            metrics.CONNECTIONS.labels("poll").dec()
            # Shielded: a client that leaves while this runs must not cut the other leaves off.
            await asyncio.shield(asyncio.gather(*(hub.leave(s, waker) for s in streams)))
    next_cursor = cursor_of(after)
    metrics.RESETS.labels("poll").inc(len(resets))
    resets_text = json.dumps(resets)
    # The ETag names "nothing after this cursor": a poller that sends it back gets 304 while
    # nothing new has committed, with no body to parse.
    etag = make_etag(next_cursor, resets_text)
    if not events and etag_matches(request.headers.get("If-None-Match"), etag):
        response: HttpResponse = HttpResponseNotModified()
    else:
        body = (
            '{"events":['
            + ",".join(frame for _s, _q, _t, frame in events)
            + '],"resets":'
            + resets_text
            + ',"cursor":'
            + json.dumps(next_cursor)
            + "}"
        )
        response = HttpResponse(body, content_type="application/json")
    response["ETag"] = etag
    response["Cache-Control"] = "no-store"
    return response


def _number(request: HttpRequest, name: str, default: Any, low: Any, high: Any, kind: Any) -> Any:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise BadRequest("invalid_parameter", f"'{name}' must be a number") from None
    if not low <= value <= high:
        raise BadRequest("invalid_parameter", f"'{name}' must be between {low} and {high}")
    return value


def _db(func: Any) -> Any:
    return database_sync_to_async(func, thread_sensitive=False)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition, for staff or `Authorization: Bearer <REALTIME['METRICS_TOKEN']>`."""
    import hmac

    from .metrics import exposition

    token = realtime_settings.METRICS_TOKEN
    given = request.headers.get("Authorization", "")
    by_token = bool(
        token
        and given.startswith("Bearer ")
        and hmac.compare_digest(given.removeprefix("Bearer ").strip().encode(), str(token).encode())
    )
    user = getattr(request, "user", None)
    by_staff = bool(user is not None and user.is_active and user.is_staff)
    if not (by_token or by_staff):
        refusal = JsonResponse(
            {"error": {"code": "forbidden", "message": "staff or the metrics token only"}},
            status=401 if not given and not (user and user.is_authenticated) else 403,
        )
        refusal["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return refusal
    body, content_type = exposition()
    response = HttpResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
