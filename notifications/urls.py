"""URLs of the notifications API: /api/notifications/..."""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from .api import NotificationViewSet

app_name = "notifications"
router = SimpleRouter()
router.register("notifications", NotificationViewSet, basename="notification")

urlpatterns = [path("api/", include(router.urls))]
