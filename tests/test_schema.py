"""The OpenAPI schema (drf-spectacular), and the API checked against it with schemathesis."""

from __future__ import annotations

import os
import secrets
from typing import Any

import pytest
import schemathesis
from django.contrib.auth.models import User
from django.test import Client
from drf_spectacular.validation import validate_schema
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
from schemathesis.core.parameters import ParameterLocation

from board.membership import create_project
from board.models import Item, Organization, Project
from config.wsgi import application
from notifications import notify
from notifications.models import Notification
from realtime.testing import session_for

from .factories import ItemFactory

API_PATHS = {
    "/api/projects/",
    "/api/projects/{id}/",
    "/api/projects/{project_pk}/items/",
    "/api/items/{id}/",
    "/api/realtime/tickets/",
    "/api/notifications/",
    "/api/notifications/{id}/",
    "/api/notifications/{id}/read/",
    "/api/notifications/{id}/unread/",
    "/api/notifications/read-all/",
    "/api/notifications/unread-count/",
    "/api/notifications/preferences/",
}


def header_names(operation: dict[str, Any]) -> set[str]:
    return {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}


@pytest.mark.django_db
def test_schema_endpoint_serves_valid_openapi_3_with_the_drf_api_only():
    response = Client().get("/api/schema/?format=json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["openapi"].startswith("3.")
    validate_schema(spec)  # against the OpenAPI 3 JSON Schema
    # The event feed and SSE are plain async views, described in docs/protocol.md instead.
    assert set(spec["paths"]) == API_PATHS

    item = spec["paths"]["/api/items/{id}/"]
    assert header_names(item["get"]) == {"If-None-Match"}
    assert set(item["get"]["responses"]) == {"200", "304", "403", "404"}
    assert {"ETag", "X-Stream-Position"} <= set(item["get"]["responses"]["200"]["headers"])
    assert {"ETag", "X-Stream-Position"} <= set(item["get"]["responses"]["304"]["headers"])
    assert header_names(item["patch"]) == header_names(item["delete"]) == {"If-Match"}
    assert {"404", "412"} <= set(item["patch"]["responses"]) & set(item["delete"]["responses"])

    items = spec["paths"]["/api/projects/{project_pk}/items/"]
    path_params = [p for p in items["get"]["parameters"] if p["in"] == "path"]
    assert [(p["name"], p["schema"]["type"]) for p in path_params] == [("project_pk", "integer")]
    assert header_names(items["post"]) == {"Idempotency-Key"}
    assert {"201", "400", "404", "422"} <= set(items["post"]["responses"])
    assert "409" not in items["post"]["responses"]  # a retry in flight waits, then replays
    assert "X-Stream-Position" in items["post"]["responses"]["201"]["headers"]

    ticket = spec["paths"]["/api/realtime/tickets/"]["post"]["responses"]["201"]
    assert ticket["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Ticket"
    }
    assert set(spec["components"]["schemas"]["Ticket"]["properties"]) == {"ticket", "expiresIn"}


@pytest.mark.django_db
def test_swagger_ui_is_served_from_the_sidecar_not_a_cdn():
    response = Client().get("/api/docs/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "/api/schema/" in page
    assert "drf_spectacular_sidecar/swagger-ui-dist/" in page
    assert "cdn.jsdelivr.net" not in page


# -- schemathesis ------------------------------------------------------------------------------

CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            # RFC 9110 evaluates preconditions before the request content, so a stale If-Match
            # is 412 even when the body is invalid too.
            "negative_data_rejection": {
                "expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "412"]
            },
            # Off: "valid by the schema" is not "acceptable" here. The schema cannot say which
            # organization ids exist or that a project name is unique in its organization (400),
            # and a generated If-Match is a stale one (412).
            "positive_data_acceptance": {"enabled": False},
        }
    }
)
# Loaded at collection, which needs no database: without a session cookie the schema view reads
# none. (Not through schemathesis.pytest.from_fixture: its lazy loader sets `Function._nodeid`,
# which pytest 9 no longer has.)
schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", application, config=CONFIG)


class Board:
    """A user who owns a project with items; recreated after a generated DELETE removed them."""

    current: Board | None = None  # the running test's, for SessionAuth

    def __init__(self) -> None:
        self.owner = User.objects.create_user(f"owner-{secrets.token_hex(4)}")
        self.organization = Organization.objects.create(name=f"Org {secrets.token_hex(4)}")
        self.organization.members.add(self.owner)
        self.session = session_for(self.owner)
        csrf = secrets.token_hex(16)
        # The CSRF pair that session-authenticated writes need, as a browser's script sends it.
        # The cookie goes to the transport, not into the case: the schema declares no such
        # cookie, and schemathesis would take the case for a negative one.
        self.csrf_cookie = {"csrftoken": csrf}
        self.csrf_header = {"X-CSRFToken": csrf}
        self.project: Any = None
        self.item: Any = None
        self.notification: Any = None
        Board.current = self

    def ensure(self) -> tuple[Any, Any]:
        if self.project is None or not Project.objects.filter(pk=self.project.pk).exists():
            self.project = create_project(
                organization=self.organization, name=f"P {secrets.token_hex(4)}", owner=self.owner
            )
            self.item = None
        if self.item is None or not Item.objects.filter(pk=self.item.pk).exists():
            self.item = ItemFactory(project=self.project)
            ItemFactory(project=self.project)
        return self.project, self.item

    def ensure_notification(self) -> Any:
        visible = Notification.objects.for_user(self.owner)
        if self.notification is None or not visible.filter(pk=self.notification.pk).exists():
            (self.notification,) = notify(self.owner, "mentioned you in", target=self.project)
        return self.notification


class SessionAuth:
    """Schemathesis auth: the owner's session cookie (the schema's cookieAuth) and CSRF header.

    As an auth provider, schemathesis knows the credentials are real: its negative cases that
    drop the session cookie go without them, and `ignored_auth` probes without them.
    """

    def get(self, case: Any, ctx: Any) -> Board:
        assert Board.current is not None
        return Board.current

    def set(self, case: Any, board: Board, ctx: Any) -> None:
        case.cookies["sessionid"] = board.session
        case.headers.update(board.csrf_header)


@pytest.fixture
def board(transactional_db):
    yield Board()
    Board.current = None


def unrouted(case: Any) -> bool:
    """Whether a path parameter is invalid, e.g. no integer: then Django's URL resolver, not the
    API, answers with its HTML 404."""
    return case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH)


def aim_at_real_objects(case: Any, board: Board) -> None:
    """Point the path at the user's own project or item, so not every case is a 404."""
    project, item = board.ensure()
    params = case.path_parameters
    if "project_pk" in params:
        params["project_pk"] = project.pk
    elif "id" in params:
        if case.path.startswith("/api/notifications/"):
            params["id"] = board.ensure_notification().pk
        else:
            params["id"] = project.pk if case.path.startswith("/api/projects/") else item.pk


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@schema.parametrize()
@schema.given(real=st.booleans())
@schema.auth(SessionAuth, refresh_interval=None)
@settings(
    max_examples=20,
    deadline=None,
    # Fixed examples by default, so CI is repeatable; HYPOTHESIS_RANDOM=1 explores anew.
    derandomize=not os.environ.get("HYPOTHESIS_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_schema(case, real, board):
    """Every operation, positive and negative cases: no 5xx; status codes, content types,
    headers and bodies as documented; invalid input rejected; auth enforced."""
    if real and not unrouted(case):
        aim_at_real_objects(case, board)
    transport = {"cookies": board.csrf_cookie}
    response = case.call(**transport)
    excluded = []
    if unrouted(case) and response.status_code == 404:
        excluded = [checks.content_type_conformance, checks.response_schema_conformance]
    case.validate_response(response, excluded_checks=excluded, transport_kwargs=transport)


@pytest.mark.django_db(transaction=True)
def test_documented_success_answers_conform(board):
    """The happy paths, which random generation reaches only now and then, checked each time."""
    project, item = board.ensure()
    transport = {"cookies": board.csrf_cookie}

    def call(path: str, method: str, status: int, **kwargs: Any) -> Any:
        case = schema[path][method].Case(**kwargs)
        SessionAuth().set(case, board, None)
        response = case.call(**transport)
        assert response.status_code == status, response.text
        # ignored_auth would take these hand-set credentials for generated ones; the
        # generated test checks auth.
        case.validate_response(
            response, excluded_checks=[checks.ignored_auth], transport_kwargs=transport
        )
        return response

    items = "/api/projects/{project_pk}/items/"
    listed = call(items, "GET", 200, path_parameters={"project_pk": project.pk})
    etag = listed.headers["etag"][0]
    call(
        items,
        "GET",
        304,
        path_parameters={"project_pk": project.pk},
        headers={"If-None-Match": etag},
    )
    created = call(
        items,
        "POST",
        201,
        path_parameters={"project_pk": project.pk},
        headers={"Idempotency-Key": "k"},
        body={"title": "new"},
        media_type="application/json",
    )
    assert created.json()["project"] == project.pk
    item_id = {"id": item.pk}
    etag = call("/api/items/{id}/", "GET", 200, path_parameters=item_id).headers["etag"][0]
    call(
        "/api/items/{id}/",
        "PATCH",
        200,
        path_parameters=item_id,
        headers={"If-Match": etag},
        body={"done": True},
        media_type="application/json",
    )
    call("/api/items/{id}/", "DELETE", 412, path_parameters=item_id, headers={"If-Match": etag})
    call("/api/items/{id}/", "DELETE", 204, path_parameters=item_id)
    call("/api/items/{id}/", "GET", 404, path_parameters=item_id)
    call("/api/projects/", "GET", 200)
    call("/api/projects/{id}/", "GET", 200, path_parameters={"id": project.pk})
    call("/api/realtime/tickets/", "POST", 201)

    note = board.ensure_notification()
    listed = call("/api/notifications/", "GET", 200, query={"unread": "true"})
    assert [n["id"] for n in listed.json()["results"]] == [note.pk]
    etag = listed.headers["etag"][0]
    call(
        "/api/notifications/", "GET", 304, query={"unread": "true"}, headers={"If-None-Match": etag}
    )
    call("/api/notifications/unread-count/", "GET", 200)
    call("/api/notifications/{id}/", "GET", 200, path_parameters={"id": note.pk})
    call("/api/notifications/{id}/read/", "POST", 200, path_parameters={"id": note.pk})
    call("/api/notifications/{id}/unread/", "POST", 200, path_parameters={"id": note.pk})
    call("/api/notifications/read-all/", "POST", 200)
    call(
        "/api/notifications/preferences/",
        "PUT",
        200,
        body={"muted_verbs": ["liked"], "muted_levels": ["info"]},
        media_type="application/json",
    )
    call("/api/notifications/preferences/", "GET", 200)
    call("/api/notifications/{id}/", "DELETE", 204, path_parameters={"id": note.pk})
    call("/api/notifications/{id}/", "GET", 404, path_parameters={"id": note.pk})
