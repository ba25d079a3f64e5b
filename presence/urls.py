"""URLs of the presence app: /api/presence/<stream>/."""

from __future__ import annotations

from django.urls import path

from .api import presence_view

app_name = "presence"
urlpatterns = [path("api/presence/<str:stream>/", presence_view, name="members")]
