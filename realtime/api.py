"""HTTP API of the realtime app: WebSocket tickets (the event feed arrives with its issue)."""

from __future__ import annotations

from typing import Any

from rest_framework import permissions, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .conf import realtime_settings
from .tickets import issue


class TicketView(APIView):
    """POST: a single-use ticket for `?ticket=` on `/ws/realtime/`, for clients without cookies."""

    permission_classes = [permissions.IsAuthenticated]

    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        response = Response(
            {"ticket": issue(request.user), "expiresIn": int(realtime_settings.TICKET_TTL)},
            status=status.HTTP_201_CREATED,
        )
        response["Cache-Control"] = "no-store"
        return response
