"""WebSocket handshake: origin checking that answers with a close code instead of a bare 403."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from channels.security.websocket import OriginValidator
from django.conf import settings


class RealtimeOriginValidator(OriginValidator):
    """Channels' origin check against `ALLOWED_HOSTS`; a refused socket is closed with 4403.

    Channels rejects the handshake, which a browser only sees as 1006; we mark the scope and
    let the consumer accept and close with 4403, which a client can act on.
    """

    allowed_origins: list[str]

    def __init__(self, application: Any, allowed_origins: list[str] | None = None) -> None:
        super().__init__(application, allowed_origins or [])
        # Empty: read ALLOWED_HOSTS at each handshake, so settings changes apply.
        self.configured = list(allowed_origins or [])

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            return await self.application(scope, receive, send)
        self.allowed_origins = self.configured or _allowed_from_settings()
        origin = dict(scope.get("headers") or []).get(b"origin")
        try:
            parsed = urlparse(origin.decode("latin1")) if origin else None
            allowed = self.valid_origin(parsed)
        except ValueError:  # not a URL at all ("http://[", say): refused like a foreign one
            allowed = False
        if not allowed:
            # A word, not the header: the consumer logs the origin itself, quoted (`%r`), and a
            # client's raw header in a log line could forge lines of its own.
            scope = {**scope, "realtime_origin_refused": "foreign" if origin else "none"}
        return await self.application(scope, receive, send)


def _allowed_from_settings() -> list[str]:
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = ["localhost", "127.0.0.1", "[::1]"]
    return allowed
