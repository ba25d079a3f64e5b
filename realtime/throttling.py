"""A DRF throttle for the REST writes whose changes become events.

A socket's publishes have their own buckets (`PUBLISH_RATE`, per socket and per user). A REST
write (a save, a delete) reaches every subscriber of its streams as well, through the ORM and
the event log, and without a limit one client could write, and fan out, as fast as the
server answers. `WriteRateThrottle` counts a user's unsafe requests only: reads, the ETag
revalidations and long polls of the fallbacks, cost nothing.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS
from rest_framework.settings import api_settings
from rest_framework.throttling import UserRateThrottle

#: The rate when `REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]` names none for the scope.
DEFAULT_RATE = "300/min"


class WriteRateThrottle(UserRateThrottle):
    """A user's POST, PUT, PATCH and DELETE requests, at most the `realtime_writes` rate.

    The rate is `REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["realtime_writes"]` (`"300/min"`
    when unset; `None` turns it off). As DRF's own throttles, it counts in Django's default
    cache: per process unless that cache is shared (Redis), so give the nodes one to make it
    a limit across them. An anonymous request is counted by its address. A view with
    `throttle_writes = False` is not counted (the WebSocket ticket view).
    """

    scope = "realtime_writes"

    def get_rate(self) -> str | None:
        # Read now, not from the class attribute DRF fills at import: settings may change.
        rates = api_settings.DEFAULT_THROTTLE_RATES or {}
        rate = rates.get(self.scope, DEFAULT_RATE)
        return None if rate is None else str(rate)  # realtime.E024 checks its form

    def allow_request(self, request: Any, view: Any) -> bool:
        # A view whose POST changes nothing (a WebSocket ticket) says so: a reconnect storm of
        # ticket clients must not spend their writes, nor busy writers block their sockets.
        if request.method in SAFE_METHODS or not getattr(view, "throttle_writes", True):
            return True
        return super().allow_request(request, view)
