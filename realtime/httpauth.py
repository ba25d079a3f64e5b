"""Who an HTTP read is from (event feed and long poll, SSE, presence): the session, or for a
client without cookies the credentials one of DRF's authentication classes accepts.

The views are plain async Django views (a long poll and an SSE stream must not hold a
thread), so DRF's `APIView` does not authenticate them. They use DRF's authentication
classes the way it does: each class's `authenticate()` on a DRF `Request`, the first that
returns a user wins, `AuthenticationFailed` refuses, and the first class's
`authenticate_header()` is the challenge of a `401`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest
from django.utils.module_loading import import_string

from .conf import realtime_settings

logger = logging.getLogger("realtime.httpauth")


class Refused(Exception):
    """Credentials were sent and an authentication class refused them (a bad token)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unavailable(Exception):
    """An authentication class failed with something other than a refusal (its backend is
    down, a bug): logged, and answered `503` (retry), never a traceback."""


def _reason(detail: Any) -> str:
    """The words of a DRF exception's `detail`: a string, or the first message of a dict or
    list (simplejwt's `{"detail": ..., "code": ..., "messages": [...]}`)."""
    while isinstance(detail, dict | list) and detail:
        detail = (
            detail.get("detail", next(iter(detail.values())))
            if isinstance(detail, dict)
            else detail[0]
        )
    return str(detail) if detail else "Authentication failed."


@dataclass
class Credentials:
    """What a request authenticated with other than its session, to decide again later (a
    held long poll, an SSE stream's re-decisions): they must still name the same user."""

    authenticator: Any
    request: Any  # DRF's Request around the original request: the headers as sent
    user_pk: Any
    scheme: str  # the class's name, for logs (never the credentials themselves)

    def still_valid(self) -> bool:
        """Whether the credentials still authenticate as the same user: False once the token
        is deleted, a JWT has expired, or the user it names is now inactive (the class's own
        check, as on a new request)."""
        from rest_framework import exceptions

        try:
            result = self.authenticator.authenticate(self.request)
        except exceptions.APIException:
            return False
        except Exception as exc:
            logger.exception("%s failed deciding again", self.scheme)
            raise Unavailable(self.scheme) from exc
        if result is None:
            return False
        user = result[0]
        return bool(getattr(user, "is_active", True)) and str(user.pk) == str(self.user_pk)


def authentication_classes() -> list[type]:
    """`REALTIME["HTTP_AUTHENTICATION_CLASSES"]`, classes or dotted paths; `None` (the
    default) takes DRF's `DEFAULT_AUTHENTICATION_CLASSES`, as the ticket view does."""
    configured = realtime_settings.HTTP_AUTHENTICATION_CLASSES
    if configured is None:
        from rest_framework.settings import api_settings

        return list(api_settings.DEFAULT_AUTHENTICATION_CLASSES)
    return [import_string(c) if isinstance(c, str) else c for c in configured]


def _credential_classes() -> list[type]:
    """The classes that read credentials of their own: the session is the view's first try."""
    from rest_framework.authentication import SessionAuthentication

    return [c for c in authentication_classes() if not issubclass(c, SessionAuthentication)]


def challenge(request: HttpRequest) -> str | None:
    """The `WWW-Authenticate` value of a `401`: the first class's, as DRF sends it; none when
    that is the session (a cookie has no challenge scheme, and a browser shown `Basic`
    would pop up its own sign-in dialog)."""
    from rest_framework.request import Request

    classes = authentication_classes()
    if not classes:
        return None
    header = getattr(classes[0](), "authenticate_header", None)
    if not callable(header):
        return None
    try:
        value = header(Request(request))  # DRF's request, as DRF passes it
    except Exception:
        logger.exception("%s.authenticate_header failed; no challenge sent", classes[0].__name__)
        return None
    return str(value) if value else None


def _by_credentials(request: HttpRequest) -> tuple[Any, Credentials | None]:
    from rest_framework import exceptions
    from rest_framework.request import Request

    classes = _credential_classes()
    if not classes:
        return AnonymousUser(), None
    authenticators = [cls() for cls in classes]
    drf_request = Request(request, authenticators=authenticators)
    for authenticator in authenticators:
        try:
            result = authenticator.authenticate(drf_request)
        except exceptions.APIException as exc:  # AuthenticationFailed, or a class's own
            raise Refused(_reason(exc.detail)) from None
        except Exception as exc:
            logger.exception("%s failed authenticating", type(authenticator).__name__)
            raise Unavailable(type(authenticator).__name__) from exc
        if result is not None:
            user: Any = result[0]
            scheme = type(authenticator).__name__
            return user, Credentials(authenticator, drf_request, user.pk, scheme)
    return AnonymousUser(), None


async def authenticate(request: HttpRequest) -> tuple[Any, Credentials | None]:
    """The request's user, and its credentials unless it came by its session.

    The session decides when it holds a user; otherwise each configured class that is not
    DRF's `SessionAuthentication` is tried in order. Raises `Refused` when credentials were
    sent and refused, `Unavailable` when a class failed otherwise; a request with none is
    anonymous, for the caller to answer.
    """
    user = await request.auser()  # type: ignore[attr-defined]
    if user.is_authenticated:
        return user, None
    return await database_sync_to_async(_by_credentials, thread_sensitive=False)(request)
