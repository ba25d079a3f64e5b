"""OpenAPI (drf-spectacular) annotations for views on `RealtimeResourceMixin`.

Parameters and response headers that the mixin adds to every view using it (If-None-Match,
If-Match, Idempotency-Key, ETag, X-Stream-Position), for `extend_schema(parameters=[...])`.
They document; they change no behaviour.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse

from .api import ErrorSerializer

IF_NONE_MATCH = OpenApiParameter(
    "If-None-Match",
    str,
    OpenApiParameter.HEADER,
    description="An ETag from an earlier read: 304 without a body while it still matches.",
)
IF_MATCH = OpenApiParameter(
    "If-Match",
    str,
    OpenApiParameter.HEADER,
    description="The ETag the change is based on: 412 (and nothing changed) when it is stale.",
)
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "maxLength": 128},
    OpenApiParameter.HEADER,
    description=(
        "Makes a retried POST happen once: the same key and body replay the first answer "
        "(with `Idempotent-Replayed: true`), and a retry while the first is still running "
        "waits for it and replays it; the same key with another body is 422. Keys belong to "
        "their user."
    ),
)
_POSITION = "The streams' positions (`project:42=131, tenant:7=9`)"


def read_headers() -> list[OpenApiParameter]:
    codes: list[int | str] = [200, 304]
    return [
        OpenApiParameter(
            "ETag",
            str,
            OpenApiParameter.HEADER,
            required=True,
            response=codes,
            description="From the streams' positions, the version and the user's permissions.",
        ),
        OpenApiParameter(
            "X-Stream-Position",
            str,
            OpenApiParameter.HEADER,
            required=True,
            response=codes,
            description=f"{_POSITION} read before the data: resume the feed from them.",
        ),
    ]


def write_headers(code: int) -> list[OpenApiParameter]:
    headers = [
        OpenApiParameter(
            "X-Stream-Position",
            str,
            OpenApiParameter.HEADER,
            response=[code],
            description=f"{_POSITION} of the events this write caused.",
        )
    ]
    if code == 201:
        headers.append(
            OpenApiParameter(
                "Idempotent-Replayed",
                str,
                OpenApiParameter.HEADER,
                response=[code],
                enum=["true"],
                description="Present on the replayed answer to a retried Idempotency-Key.",
            )
        )
    return headers


def error(description: str) -> OpenApiResponse:
    """A documented error answer with DRF's `{"detail": ...}` body."""
    return OpenApiResponse(ErrorSerializer, description=description)


NOT_MODIFIED = OpenApiResponse(description="If-None-Match matched: not modified, no body.")
