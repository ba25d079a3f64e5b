"""Correlation ids: read or made per request, echoed, and carried by the events it causes."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from django.http import HttpResponse
from django.test import AsyncRequestFactory, RequestFactory

from realtime.context import get_correlation_id
from realtime.middleware import CorrelationIdMiddleware


def view(request):
    return HttpResponse(get_correlation_id())


async def async_view(request):
    return HttpResponse(get_correlation_id())


def test_incoming_id_is_used_and_echoed():
    response = CorrelationIdMiddleware(view)(
        RequestFactory().get("/", HTTP_X_CORRELATION_ID="req-42")
    )
    assert response["X-Correlation-ID"] == "req-42"
    assert response.content == b"req-42"
    assert get_correlation_id() is None  # reset after the request


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "new\nline", "final-newline\n"])
def test_missing_or_unsafe_id_is_replaced(bad):
    response = CorrelationIdMiddleware(view)(RequestFactory().get("/", HTTP_X_CORRELATION_ID=bad))
    made = response["X-Correlation-ID"]
    assert made != bad
    assert len(made) == 32
    assert response.content.decode() == made


def test_async_stack_gets_an_id_too():
    middleware = CorrelationIdMiddleware(async_view)
    request = AsyncRequestFactory().get("/", headers={"X-Correlation-ID": "async-1"})
    response = async_to_sync(middleware)(request)
    assert response["X-Correlation-ID"] == "async-1"
    assert response.content == b"async-1"


def test_header_name_follows_settings(settings):
    settings.REALTIME = {"CORRELATION_HEADER": "X-Request-ID"}
    response = CorrelationIdMiddleware(view)(RequestFactory().get("/", HTTP_X_REQUEST_ID="r-1"))
    assert response["X-Request-ID"] == "r-1"


@pytest.mark.django_db(transaction=True)
def test_events_caused_by_a_request_carry_its_id(client):
    from realtime.models import Event
    from realtime.testing import flush

    from .factories import ProjectFactory, UserFactory

    owner = UserFactory(is_staff=True, is_superuser=True)
    project = ProjectFactory(owner=owner)
    client.force_login(owner)
    response = client.post(
        "/admin/board/item/add/",
        {"project": project.pk, "title": "from admin", "position": 0, "version": 0},
        HTTP_X_CORRELATION_ID="admin-req-1",
    )
    assert response.status_code == 302, response.content[:500]
    assert response["X-Correlation-ID"] == "admin-req-1"
    flush()
    event = Event.objects.get(type="v1:item.created")
    assert event.correlation_id == "admin-req-1"
