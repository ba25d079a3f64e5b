"""`GET /api/presence/<stream>/`: who is present, with the same authorization as subscribing."""

from __future__ import annotations

import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, HttpResponseNotModified, JsonResponse
from django.views.decorators.http import require_GET

from realtime import metrics
from realtime.conditional import etag_matches, make_etag
from realtime.httpauth import Refused, Unavailable, authenticate, challenge
from realtime.policies import check_stream, stream_kinds
from realtime.protocol import Code
from realtime.streams import parse_stream

from .conf import presence_settings
from .tracker import member_list

logger = logging.getLogger("presence")


def _check(user: Any, stream: str) -> str | None:
    try:
        return check_stream(user, stream)
    except Exception:
        # As a subscribe does: a policy that raises refuses, and the error is logged.
        logger.exception("policy for %s raised; refusing", stream)
        return Code.FORBIDDEN


def _error(status: int, detail: str) -> JsonResponse:
    return JsonResponse({"detail": detail}, status=status)


def _unauthenticated(request: HttpRequest, detail: str) -> JsonResponse:
    """As a DRF view answers: `401` with the first authentication class's challenge when it
    has one, else `403`."""
    scheme = challenge(request)
    response = _error(401 if scheme else 403, detail)
    if scheme:
        response["WWW-Authenticate"] = scheme
    return response


@require_GET
async def presence_view(request: HttpRequest, stream: str) -> HttpResponse:
    """The present users of `stream`, oldest first; ETag/304 on the list."""
    try:
        user, _credentials = await authenticate(request)
    except Refused as exc:  # a bad token: DRF's answer to it, as the other API views give
        return _unauthenticated(request, exc.message)
    except Unavailable:  # an authentication class failed (logged): retry, no traceback
        return _error(503, "Authentication is unavailable; retry later.")
    if not user.is_authenticated or not user.is_active:
        return _unauthenticated(request, "Authentication credentials were not provided.")
    refusal = await database_sync_to_async(_check, thread_sensitive=False)(user, stream)
    if refusal == Code.INVALID_STREAM:
        return _error(400, f"{stream!r} is not a stream name such as 'project:42'.")
    if refusal == Code.UNKNOWN_STREAM:
        return _error(404, "No such stream kind.")
    if refusal is not None:
        # Refused and missing objects answer alike, as on the WebSocket.
        metrics.UNAUTHORIZED.labels("read").inc()
        return _error(403, "You may not read this stream.")
    kind, _key = parse_stream(stream)
    policy: Any = stream_kinds.get(kind)
    if not policy.presence or not presence_settings.ENABLED:
        return _error(404, f"Presence is not enabled for {kind!r} streams.")
    try:
        listed, total = await member_list(stream, include=str(user.pk))
    except Exception as exc:  # the backend (Redis) is down: say so, never a stack trace
        logger.warning(
            "presence of %s not read (%s: %s)", stream, type(exc).__name__, exc, exc_info=True
        )
        return _error(503, "Presence is unavailable; retry later.")
    body = {"stream": stream, "members": listed, "total": total}
    text = json.dumps(body, separators=(",", ":"), sort_keys=True)
    etag = make_etag(body)
    if etag_matches(request.headers.get("If-None-Match"), etag):
        response: HttpResponse = HttpResponseNotModified()
    else:
        response = HttpResponse(text, content_type="application/json")
    response["ETag"] = etag
    response["Cache-Control"] = "private, no-cache"
    response["Vary"] = "Cookie, Authorization"
    return response
