"""Correlation id middleware: read or make `X-Correlation-ID`, expose it, echo it back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from .conf import realtime_settings
from .context import _correlation_id, clean_correlation_id, new_correlation_id


class CorrelationIdMiddleware:
    """Give every request a correlation id that the events it causes carry."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _start(self, request: Any) -> tuple[str, Any]:
        header = realtime_settings.CORRELATION_HEADER
        meta_key = "HTTP_" + header.upper().replace("-", "_")
        value = clean_correlation_id(request.META.get(meta_key)) or new_correlation_id()
        request.correlation_id = value
        return value, _correlation_id.set(value)

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self._acall(request)
        value, token = self._start(request)
        try:
            response = self.get_response(request)
        finally:
            _correlation_id.reset(token)
        response[realtime_settings.CORRELATION_HEADER] = value
        return response

    async def _acall(self, request: Any) -> Any:
        value, token = self._start(request)
        try:
            response = await self.get_response(request)  # type: ignore[misc]
        finally:
            _correlation_id.reset(token)
        response[realtime_settings.CORRELATION_HEADER] = value
        return response
