"""Board API on the conditional mixin: ETag/304, If-Match/412, Idempotency-Key, positions."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from board.membership import add_member, remove_member
from board.models import Item
from board.serializers import ItemSerializer
from realtime.models import Event, Stream

from .factories import ItemFactory, OrganizationFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


def client_for(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def board():
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    item = ItemFactory(project=project, title="first")
    return owner, project, item


def position(stream: str) -> int:
    return Stream.objects.get(name=stream).last_seq


def test_item_read_has_etag_position_and_private_caching(board):
    owner, project, item = board
    response = client_for(owner).get(f"/api/items/{item.pk}/")
    assert response.status_code == 200
    assert response.data["title"] == "first"
    assert response["ETag"].startswith('"')
    assert (
        response["X-Stream-Position"] == f"project:{project.pk}={position(f'project:{project.pk}')}"
    )
    assert response["Cache-Control"] == "private, no-cache"
    assert "Cookie" in response["Vary"]
    assert "Authorization" in response["Vary"]


def test_matching_if_none_match_is_304_without_running_the_serializer(board, monkeypatch):
    owner, _, item = board
    client = client_for(owner)
    etag = client.get(f"/api/items/{item.pk}/")["ETag"]

    def refuse(self, instance):
        raise AssertionError("the serializer ran for a 304")

    monkeypatch.setattr(ItemSerializer, "to_representation", refuse)
    response = client.get(f"/api/items/{item.pk}/", HTTP_IF_NONE_MATCH=etag)
    assert response.status_code == 304
    assert response["ETag"] == etag


def test_etag_changes_with_the_object_and_with_the_users_permissions(board):
    _owner, project, item = board
    member = UserFactory()
    add_member(project, member)
    client = client_for(member)
    first = client.get(f"/api/items/{item.pk}/")["ETag"]
    item.title = "renamed"
    item.save()
    second = client.get(f"/api/items/{item.pk}/")["ETag"]
    assert second != first
    from guardian.shortcuts import assign_perm

    assign_perm("board.delete_project", member, project)
    assert client.get(f"/api/items/{item.pk}/")["ETag"] != second


def test_a_user_who_cannot_see_the_object_never_gets_a_304(board):
    owner, project, item = board
    etag = client_for(owner).get(f"/api/items/{item.pk}/")["ETag"]
    stranger = UserFactory()
    response = client_for(stranger).get(f"/api/items/{item.pk}/", HTTP_IF_NONE_MATCH=etag)
    assert response.status_code == 404
    member = UserFactory()
    add_member(project, member)
    remove_member(project, member)
    assert (
        client_for(member).get(f"/api/items/{item.pk}/", HTTP_IF_NONE_MATCH=etag).status_code == 404
    )
    assert APIClient().get(f"/api/items/{item.pk}/", HTTP_IF_NONE_MATCH=etag).status_code == 403


def test_stale_if_match_is_412_and_changes_nothing(board):
    owner, _, item = board
    client = client_for(owner)
    etag = client.get(f"/api/items/{item.pk}/")["ETag"]
    ok = client.patch(
        f"/api/items/{item.pk}/", {"title": "second"}, format="json", HTTP_IF_MATCH=etag
    )
    assert ok.status_code == 200
    stale = client.patch(
        f"/api/items/{item.pk}/", {"title": "third"}, format="json", HTTP_IF_MATCH=etag
    )
    assert stale.status_code == 412
    assert client.delete(f"/api/items/{item.pk}/", HTTP_IF_MATCH=etag).status_code == 412
    item.refresh_from_db()
    assert item.title == "second"
    fresh = client.get(f"/api/items/{item.pk}/")["ETag"]
    assert client.delete(f"/api/items/{item.pk}/", HTTP_IF_MATCH=fresh).status_code == 204


def test_write_reports_the_position_of_the_event_it_caused(board):
    owner, project, item = board
    client = client_for(owner)
    response = client.patch(f"/api/items/{item.pk}/", {"done": True}, format="json")
    event = Event.objects.filter(type="v1:item.updated").latest("pk")
    assert response["X-Stream-Position"] == f"project:{project.pk}={event.seq}"
    created = client.post(f"/api/projects/{project.pk}/items/", {"title": "new"}, format="json")
    assert created.status_code == 201
    event = Event.objects.filter(type="v1:item.created").latest("pk")
    assert created["X-Stream-Position"] == f"project:{project.pk}={event.seq}"


def test_idempotency_key_makes_a_retried_post_create_nothing_twice(board):
    owner, project, _ = board
    client = client_for(owner)
    url = f"/api/projects/{project.pk}/items/"
    first = client.post(url, {"title": "once"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    again = client.post(url, {"title": "once"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.data
    assert again["Idempotent-Replayed"] == "true"
    assert again["X-Stream-Position"] == first["X-Stream-Position"]
    assert Item.objects.filter(title="once").count() == 1
    assert Event.objects.filter(type="v1:item.created", data__title="once").count() == 1
    other = client.post(url, {"title": "other"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert other.status_code == 422
    # Keys belong to their user.
    member = UserFactory()
    add_member(project, member)
    theirs = client_for(member).post(
        url, {"title": "once"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    assert theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs
    assert Item.objects.filter(title="once").count() == 2


def test_idempotency_keys_expire(board, settings):
    owner, project, _ = board
    client = client_for(owner)
    url = f"/api/projects/{project.pk}/items/"
    client.post(url, {"title": "x"}, format="json", HTTP_IDEMPOTENCY_KEY="k-2")
    settings.REALTIME = {"IDEMPOTENCY_TTL": -1}
    client.post(url, {"title": "x"}, format="json", HTTP_IDEMPOTENCY_KEY="k-2")
    assert Item.objects.filter(title="x").count() == 2


def test_list_etag_304_and_position_then_no_page_load_gap(board):
    owner, project, _ = board
    client = client_for(owner)
    url = f"/api/projects/{project.pk}/items/"
    response = client.get(url)
    assert [i["title"] for i in response.data] == ["first"]
    assert client.get(url, HTTP_IF_NONE_MATCH=response["ETag"]).status_code == 304
    since = int(response["X-Stream-Position"].split("=")[1])
    ItemFactory(project=project, title="after load")
    assert client.get(url, HTTP_IF_NONE_MATCH=response["ETag"]).status_code == 200
    later = Event.objects.filter(stream__name=f"project:{project.pk}", seq__gt=since)
    assert [e.data["title"] for e in later] == ["after load"]  # exactly what the page lacks


def test_a_list_304_costs_one_query_and_follows_every_permission_path(
    board, django_assert_num_queries
):
    """The list's 404, the reader's permissions and the position come from one statement
    (realtime.conditional.parent_state); a permission through a group counts, a superuser
    sees the list, and losing the permission is a 404, never a 304."""
    from django.contrib.auth.models import Group
    from guardian.shortcuts import assign_perm, remove_perm

    _owner, project, _item = board
    url = f"/api/projects/{project.pk}/items/"
    reader = UserFactory()
    group = Group.objects.create(name="readers")
    reader.groups.add(group)
    client = client_for(reader)
    assert client.get(url).status_code == 404
    assign_perm("board.view_project", group, project)
    etag = client.get(url)["ETag"]
    with django_assert_num_queries(1):  # force_authenticate: no session or user query
        assert client.get(url, HTTP_IF_NONE_MATCH=etag).status_code == 304
    assign_perm("board.change_project", reader, project)  # a direct permission joins in
    changed = client.get(url, HTTP_IF_NONE_MATCH=etag)
    assert changed.status_code == 200
    assert changed["ETag"] != etag
    remove_perm("board.view_project", group, project)
    assert client.get(url, HTTP_IF_NONE_MATCH=changed["ETag"]).status_code == 404
    admin = UserFactory(is_superuser=True)
    assert client_for(admin).get(url).status_code == 200
    assert client_for(admin).get("/api/projects/999999/items/").status_code == 404
    reader.is_active = False
    reader.save()
    assign_perm("board.view_project", reader, project)
    assert client_for(reader).get(url).status_code == 404  # inactive: no permissions


def test_a_permission_created_while_running_counts_in_a_list_etag(board):
    """parent_state reads permission ids and maps them to codenames from a table it keeps;
    a permission added after that table was read is found all the same."""
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType
    from guardian.shortcuts import assign_perm

    from board.models import Project
    from realtime.conditional import parent_state

    _owner, project, _item = board
    reader = UserFactory()
    assign_perm("board.view_project", reader, project)
    url = f"/api/projects/{project.pk}/items/"
    etag = client_for(reader).get(url)["ETag"]
    Permission.objects.create(
        codename="export_project",
        name="Can export project",
        content_type=ContentType.objects.get_for_model(Project),
    )
    assign_perm("board.export_project", reader, project)
    state = parent_state(reader, Project, project.pk, [])
    assert state.perms == ("export_project", "view_project")
    assert client_for(reader).get(url, HTTP_IF_NONE_MATCH=etag).status_code == 200
    admin = UserFactory(is_superuser=True)
    assert "export_project" in parent_state(admin, Project, project.pk, []).perms


def test_lists_and_objects_of_others_are_not_found(board):
    _owner, project, item = board
    stranger = UserFactory()
    client = client_for(stranger)
    assert client.get(f"/api/projects/{project.pk}/items/").status_code == 404
    assert client.get(f"/api/projects/{project.pk}/").status_code == 404
    assert client.patch(f"/api/items/{item.pk}/", {"title": "x"}, format="json").status_code == 404
    assert client.get("/api/projects/").data == []


def test_members_may_not_delete_the_project_and_only_org_members_create_projects(board):
    owner, project, _ = board
    member = UserFactory()
    add_member(project, member)
    assert client_for(member).delete(f"/api/projects/{project.pk}/").status_code == 403
    org = OrganizationFactory()
    refused = client_for(owner).post(
        "/api/projects/", {"organization": org.pk, "name": "P"}, format="json"
    )
    assert refused.status_code == 403
    org.members.add(owner)
    created = client_for(owner).post(
        "/api/projects/", {"organization": org.pk, "name": "P"}, format="json"
    )
    assert created.status_code == 201
    assert created["X-Stream-Position"].startswith(f"project:{created.data['id']}=1")


def test_a_project_cannot_be_moved_to_another_organization(board):
    owner, project, _ = board
    elsewhere = OrganizationFactory()
    response = client_for(owner).patch(
        f"/api/projects/{project.pk}/",
        {"organization": elsewhere.pk, "name": "Renamed"},
        format="json",
    )
    assert response.status_code == 200
    project.refresh_from_db()
    assert project.organization_id != elsewhere.pk
    assert project.name == "Renamed"


def test_a_body_that_is_not_an_object_is_refused_not_applied_as_nothing(board):
    owner, project, item = board
    client = client_for(owner)
    number = client.patch(f"/api/items/{item.pk}/", "2.5e16", content_type="application/json")
    assert number.status_code == 400
    form = client.patch(
        f"/api/projects/{project.pk}/",
        b"--x\r\n2--x--\r\n",
        content_type="multipart/form-data; boundary=x",
    )
    assert form.status_code == 415


def test_the_project_list_changes_when_a_listed_project_of_another_organization_does(
    django_assert_num_queries,
):
    """The owner is no member of the project's organization: its tenant stream still counts."""
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    assert not project.organization.members.filter(pk=owner.pk).exists()
    client = client_for(owner)
    first = client.get("/api/projects/")
    assert [p["name"] for p in first.data] == [project.name]
    # The listed projects' and the user's organizations, their positions, the listed pks.
    with django_assert_num_queries(3):
        assert client.get("/api/projects/", HTTP_IF_NONE_MATCH=first["ETag"]).status_code == 304
    client.patch(f"/api/projects/{project.pk}/", {"name": "Renamed"}, format="json")
    renamed = client.get("/api/projects/", HTTP_IF_NONE_MATCH=first["ETag"])
    assert renamed.status_code == 200
    assert [p["name"] for p in renamed.data] == ["Renamed"]


def test_a_superusers_project_list_changes_when_any_project_does():
    admin = UserFactory(is_superuser=True)
    mine = OrganizationFactory()
    mine.members.add(admin)
    project = ProjectFactory(name="Theirs")  # another organization, no permission given
    client = client_for(admin)
    first = client.get("/api/projects/")
    assert [p["name"] for p in first.data] == ["Theirs"]
    assert client.get("/api/projects/", HTTP_IF_NONE_MATCH=first["ETag"]).status_code == 304
    project.name = "Renamed"
    project.save()
    renamed = client.get("/api/projects/", HTTP_IF_NONE_MATCH=first["ETag"])
    assert renamed.status_code == 200
    assert [p["name"] for p in renamed.data] == ["Renamed"]


def test_the_schema_documents_no_409_for_an_idempotency_key_in_use():
    """A concurrent retry waits for the first request and replays it
    (tests/test_api_concurrency.py): no request is ever refused with 409."""
    from django.test import Client

    spec = Client().get("/api/schema/?format=json").json()
    for path in ("/api/projects/", "/api/projects/{project_pk}/items/"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"201", "422"} <= set(responses)
        assert "409" not in responses


def test_if_match_compares_strongly_a_weak_tag_is_412(board):
    owner, _, item = board
    client = client_for(owner)
    etag = client.get(f"/api/items/{item.pk}/")["ETag"]
    weak = client.patch(
        f"/api/items/{item.pk}/", {"title": "b"}, format="json", HTTP_IF_MATCH="W/" + etag
    )
    assert weak.status_code == 412
    item.refresh_from_db()
    assert item.title == "first"
    # If-None-Match compares weakly: the weak form of the tag is still a 304.
    assert client.get(f"/api/items/{item.pk}/", HTTP_IF_NONE_MATCH="W/" + etag).status_code == 304


def test_a_project_id_out_of_the_columns_range_is_404_not_500(board):
    client = APIClient(raise_request_exception=False)
    client.force_authenticate(board[0])
    assert client.get("/api/projects/99999999999999999999999/items/").status_code == 404
    assert client.get("/api/projects/-99999999999999999999999/items/").status_code == 404


def test_json_and_html_answers_never_share_an_etag(board):
    owner, _, item = board
    client = client_for(owner)
    for url in (f"/api/items/{item.pk}/", f"/api/projects/{item.project_id}/items/"):
        as_json = client.get(url, HTTP_ACCEPT="application/json")
        as_html = client.get(url, HTTP_ACCEPT="text/html")
        assert as_json["Content-Type"] != as_html["Content-Type"]
        assert as_json["ETag"] != as_html["ETag"]
        again = client.get(url, HTTP_ACCEPT="text/html", HTTP_IF_NONE_MATCH=as_json["ETag"])
        assert again.status_code == 200
        same = client.get(url, HTTP_ACCEPT="application/json", HTTP_IF_NONE_MATCH=as_json["ETag"])
        assert same.status_code == 304


def test_a_list_over_10000_rows_sees_a_grant_past_the_10000th(board):
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType
    from guardian.models import UserObjectPermission
    from guardian.shortcuts import assign_perm

    from board.models import Project

    user = UserFactory()
    organization = OrganizationFactory()
    Project.objects.bulk_create(
        [Project(organization=organization, name=f"p{i}", owner=user) for i in range(10_001)]
    )
    projects = list(Project.objects.filter(organization=organization).order_by("pk"))
    content_type = ContentType.objects.get_for_model(Project)
    view = Permission.objects.get(content_type=content_type, codename="view_project")
    UserObjectPermission.objects.bulk_create(
        [
            UserObjectPermission(
                user=user, permission=view, content_type=content_type, object_pk=str(p.pk)
            )
            for p in projects[:10_000]
        ]
    )
    client = client_for(user)
    first = client.get("/api/projects/")
    assert first.status_code == 200
    assert client.get("/api/projects/", HTTP_IF_NONE_MATCH=first["ETag"]).status_code == 304
    assign_perm("board.view_project", user, projects[-1])  # no event: only the rows tell
    assert client.get("/api/projects/", HTTP_IF_NONE_MATCH=first["ETag"]).status_code == 200


def test_the_range_of_a_relation_primary_key_is_its_targets():
    """A multi-table child's (or a OneToOne) pk: the range check follows the relation, on
    backends whose ranges list only integer fields (PostgreSQL's: a KeyError before)."""
    import types

    from django.db.backends.base.operations import BaseDatabaseOperations

    from board.models import Project
    from realtime.policies import fits_integer_column as _in_range

    connection = types.SimpleNamespace(ops=BaseDatabaseOperations(None))
    child_pk = types.SimpleNamespace(
        is_relation=True,
        target_field=Project._meta.pk,
        get_internal_type=lambda: "OneToOneField",
    )
    assert _in_range(connection, child_pk, 5)
    assert not _in_range(connection, child_pk, 10**30)
    odd = types.SimpleNamespace(is_relation=False, get_internal_type=lambda: "UUIDField")
    assert _in_range(connection, odd, 10**30)  # no range known: the query decides


def test_a_change_to_another_item_of_the_project_leaves_this_ones_tag_valid(board):
    """Items tag from their own version: two people editing two items of one project do not
    get each other's writes as conflicts (412), and a reader keeps its 304."""
    owner, project, item = board
    other = ItemFactory(project=project)
    client = client_for(owner)
    read = client.get(f"/api/items/{item.pk}/")
    etag = read["ETag"]
    other.title = "changed by someone else"
    other.save()
    ItemFactory(project=project)
    again = client.get(f"/api/items/{item.pk}/", HTTP_IF_NONE_MATCH=etag)
    assert again.status_code == 304
    # The position still moves: it says where to subscribe from.
    assert again["X-Stream-Position"] != read["X-Stream-Position"]
    response = client.patch(
        f"/api/items/{item.pk}/", {"title": "mine"}, format="json", HTTP_IF_MATCH=etag
    )
    assert response.status_code == 200
    assert client.delete(f"/api/items/{item.pk}/", HTTP_IF_MATCH=etag).status_code == 412


def test_an_item_made_again_under_the_same_pk_does_not_match_the_old_tag(board):
    """SQLite gives the highest rowid again once its row is deleted: a new item with the pk
    and the version of a deleted one is another object."""
    owner, project, item = board
    client = client_for(owner)
    etag = client.get(f"/api/items/{item.pk}/")["ETag"]
    pk = item.pk
    Item.objects.filter(pk=pk).delete()
    Item.objects.create(pk=pk, project=project, title="first")
    assert client.get(f"/api/items/{pk}/", HTTP_IF_NONE_MATCH=etag).status_code == 200


def served(view, request, **kwargs):
    """The view's answer as Django's handler sends it: rendered if it renders (a DRF
    `Response`). The test client would hide a 304's body (`conditional_content_removal`)."""
    response = view(request, **kwargs)
    return response.render() if callable(getattr(response, "render", None)) else response


def test_a_304_has_no_body_as_the_server_sends_it(board):
    """DRF renders a Response's None in the negotiated media type: the browsable API's is a
    whole HTML page. A 304 keeps the headers of the 200 but has no body or Content-Type."""
    from rest_framework.test import APIRequestFactory, force_authenticate

    from board.api import ItemViewSet

    owner, project, item = board
    factory = APIRequestFactory()
    views = [
        (ItemViewSet.as_view({"get": "retrieve"}), f"/api/items/{item.pk}/", {"pk": item.pk}),
        (
            ItemViewSet.as_view({"get": "list"}),
            f"/api/projects/{project.pk}/items/",
            {"project_pk": project.pk},
        ),
    ]
    for view, url, kwargs in views:
        for accept in ("application/json", "text/html"):
            request = factory.get(url, HTTP_ACCEPT=accept)
            force_authenticate(request, owner)
            first = served(view, request, **kwargs)
            assert first.status_code == 200
            request = factory.get(url, HTTP_ACCEPT=accept, HTTP_IF_NONE_MATCH=first["ETag"])
            force_authenticate(request, owner)
            again = served(view, request, **kwargs)
            assert again.status_code == 304, (url, accept)
            assert again.content == b"", (url, accept, again.content[:80])
            assert not again.has_header("Content-Type"), (url, accept)
            for header in ("ETag", "Cache-Control", "Vary", "X-Stream-Position"):
                assert again[header] == first[header], (url, accept, header)


def test_a_304_a_view_builds_itself_has_no_body_either():
    """The notifications' unread count answers its own `Response(status=304)` through the
    mixin's headers: it is sent without a body too."""
    from rest_framework.test import APIRequestFactory, force_authenticate

    from notifications.api import NotificationViewSet

    user = UserFactory()
    view = NotificationViewSet.as_view({"get": "unread_count"})
    factory = APIRequestFactory()
    request = factory.get("/api/notifications/unread-count/", HTTP_ACCEPT="text/html")
    force_authenticate(request, user)
    first = served(view, request)
    request = factory.get(
        "/api/notifications/unread-count/",
        HTTP_ACCEPT="text/html",
        HTTP_IF_NONE_MATCH=first["ETag"],
    )
    force_authenticate(request, user)
    again = served(view, request)
    assert again.status_code == 304
    assert again.content == b"", again.content[:80]
    assert not again.has_header("Content-Type")
    assert again["ETag"] == first["ETag"]
    assert again["X-Stream-Position"] == first["X-Stream-Position"]


def test_a_retrieve_whose_representation_depends_on_a_query_parameter_changes_its_etag(board):
    """The object's tag holds `get_object_state()` (the query parameters, by default): a 304
    names the body the client holds. A write's If-Match compares the object's state only, so
    the tag of an expanded read still guards a plain PATCH."""
    from rest_framework import serializers
    from rest_framework.test import APIRequestFactory, force_authenticate

    from board.api import ItemViewSet

    class Expanding(serializers.ModelSerializer):
        class Meta:
            model = Item
            fields = ["id", "title"]

        def to_representation(self, instance):
            data = super().to_representation(instance)
            if "project" in self.context["request"].query_params.get("expand", ""):
                data["project"] = {"id": instance.project_id, "name": instance.project.name}
            return data

    class View(ItemViewSet):
        def get_serializer_class(self):
            return Expanding

    owner, _project, item = board
    view = View.as_view({"get": "retrieve", "patch": "partial_update"})
    factory = APIRequestFactory()

    def get(query="", **headers):
        request = factory.get(
            f"/api/items/{item.pk}/{query}", HTTP_ACCEPT="application/json", **headers
        )
        force_authenticate(request, owner)
        return served(view, request, pk=item.pk)

    plain = get()
    expanded = get("?expand=project", HTTP_IF_NONE_MATCH=plain["ETag"])
    assert expanded.status_code == 200, "304 for a body the client never received"
    assert "project" in expanded.data
    assert expanded["ETag"] != plain["ETag"]
    assert get("?expand=project", HTTP_IF_NONE_MATCH=expanded["ETag"]).status_code == 304
    assert get(HTTP_IF_NONE_MATCH=expanded["ETag"]).status_code == 200
    # If-Match is about the object, not about which of its bodies the client read.
    assert get(HTTP_IF_MATCH=expanded["ETag"]).status_code == 200
    request = factory.patch(
        f"/api/items/{item.pk}/", {"title": "x"}, format="json", HTTP_IF_MATCH=expanded["ETag"]
    )
    force_authenticate(request, owner)
    assert served(view, request, pk=item.pk).status_code == 200
    request = factory.patch(
        f"/api/items/{item.pk}/", {"title": "y"}, format="json", HTTP_IF_MATCH=expanded["ETag"]
    )
    force_authenticate(request, owner)
    assert served(view, request, pk=item.pk).status_code == 412  # changed since that read


def test_a_tag_from_the_browsable_api_guards_a_json_write(board):
    """The media type is part of the representation, not of the object's state."""
    owner, _project, item = board
    client = client_for(owner)
    html = client.get(f"/api/items/{item.pk}/", HTTP_ACCEPT="text/html")["ETag"]
    response = client.patch(
        f"/api/items/{item.pk}/", {"title": "x"}, format="json", HTTP_IF_MATCH=html
    )
    assert response.status_code == 200


def test_if_none_match_on_an_unsafe_method_is_412_when_it_matches(board):
    """RFC 9110, 13.2.2, step 3: a write whose If-None-Match names the object (or is `*`, and
    the object exists) is refused, and nothing changes."""
    owner, _project, item = board
    client = client_for(owner)
    etag = client.get(f"/api/items/{item.pk}/")["ETag"]
    r = client.patch(
        f"/api/items/{item.pk}/", {"title": "x"}, format="json", HTTP_IF_NONE_MATCH=etag
    )
    assert r.status_code == 412, r.status_code
    r = client.delete(f"/api/items/{item.pk}/", HTTP_IF_NONE_MATCH="*")
    assert r.status_code == 412, r.status_code
    item.refresh_from_db()
    assert item.title == "first"
    # A tag of another state does not match: the write goes ahead.
    r = client.patch(
        f"/api/items/{item.pk}/", {"title": "x"}, format="json", HTTP_IF_NONE_MATCH='"other"'
    )
    assert r.status_code == 200, r.status_code


def test_stale_if_match_on_get_is_412(board):
    """RFC 9110, 13.2.2, step 1, on reads too, and before If-None-Match."""
    owner, project, item = board
    client = client_for(owner)
    for url in (f"/api/items/{item.pk}/", f"/api/projects/{project.pk}/items/"):
        etag = client.get(url)["ETag"]
        r = client.get(url, HTTP_IF_MATCH='"stale"')
        assert r.status_code == 412, (url, r.status_code)
        r = client.get(url, HTTP_IF_MATCH='"stale"', HTTP_IF_NONE_MATCH=etag)
        assert r.status_code == 412, (url, r.status_code)
        assert client.get(url, HTTP_IF_MATCH=etag).status_code == 200
        assert client.get(url, HTTP_IF_MATCH="*").status_code == 200
        assert client.get(url, HTTP_IF_MATCH=etag, HTTP_IF_NONE_MATCH=etag).status_code == 304


# -- review: project names, organizations of others, a deleted member ------------------------


def org_with(*users):
    organization = OrganizationFactory()
    organization.members.add(*users)
    return organization


def test_a_rename_to_a_name_taken_in_the_organization_is_a_400_not_a_500():
    from board.serializers import NAME_TAKEN

    owner = UserFactory()
    organization = org_with(owner)
    ProjectFactory(owner=owner, organization=organization, name="Taken")
    project = ProjectFactory(owner=owner, organization=organization, name="Mine")
    ProjectFactory(name="Elsewhere")  # another organization's name is free
    client = client_for(owner)
    client.raise_request_exception = False
    url = f"/api/projects/{project.pk}/"
    refused = client.patch(url, {"name": "Taken"}, format="json")
    assert refused.status_code == 400
    assert refused.json() == {"non_field_errors": [NAME_TAKEN]}
    project.refresh_from_db()
    assert project.name == "Mine"
    assert client.patch(url, {"name": "Mine"}, format="json").status_code == 200  # its own
    assert client.patch(url, {"name": "Elsewhere"}, format="json").status_code == 200


@pytest.mark.parametrize("write", ["create", "rename"])
def test_a_name_taken_past_the_serializers_check_is_a_400_not_a_500(monkeypatch, write):
    """A concurrent write took the name after the check (tests/test_api_concurrency.py runs
    the race on PostgreSQL): the unique constraint's IntegrityError answers as the check."""
    from rest_framework.validators import UniqueTogetherValidator

    from board.models import Project
    from board.serializers import NAME_TAKEN

    owner = UserFactory()
    organization = org_with(owner)
    ProjectFactory(owner=owner, organization=organization, name="Taken")
    project = ProjectFactory(owner=owner, organization=organization, name="Mine")
    monkeypatch.setattr(UniqueTogetherValidator, "__call__", lambda self, attrs, serializer: None)
    client = client_for(owner)
    client.raise_request_exception = False
    if write == "create":
        response = client.post(
            "/api/projects/", {"organization": organization.pk, "name": "Taken"}, format="json"
        )
    else:
        response = client.patch(f"/api/projects/{project.pk}/", {"name": "Taken"}, format="json")
    assert response.status_code == 400
    assert response.json() == {"non_field_errors": [NAME_TAKEN]}
    assert Project.objects.filter(organization=organization, name="Taken").count() == 1
    assert client.get(f"/api/projects/{project.pk}/").json()["name"] == "Mine"


def test_an_outsider_cannot_tell_which_project_names_or_organizations_exist():
    from board.models import Organization

    owner, outsider = UserFactory(), UserFactory()
    organization = org_with(owner)
    ProjectFactory(owner=owner, organization=organization, name="Secret")
    org_with(outsider)  # a member of another one
    client = client_for(outsider)
    missing = (Organization.objects.order_by("-pk").values_list("pk", flat=True).first()) + 100
    answers = [
        client.post("/api/projects/", {"organization": org, "name": name}, format="json")
        for org, name in (
            (organization.pk, "Secret"),  # taken there
            (organization.pk, "Fresh"),
            (missing, "Secret"),  # no such organization
        )
    ]
    assert [r.status_code for r in answers] == [403, 403, 403]
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert answers[0].json() == {"detail": "You are not a member of that organization."}
    # A member still hears that the name is taken.
    taken = client_for(owner).post(
        "/api/projects/", {"organization": organization.pk, "name": "Secret"}, format="json"
    )
    assert taken.status_code == 400


def test_the_owner_sees_a_deleted_member_go_and_gets_no_stale_304():
    """A deleted user's memberships go by cascade, with no m2m_changed: the project's event
    (and so its ETag) comes from the user's deletion itself."""
    owner, bob = UserFactory(), UserFactory()
    project = ProjectFactory(owner=owner)
    from guardian.shortcuts import assign_perm

    assign_perm("board.delete_project", owner, project)  # the owner's payload has the members
    add_member(project, bob)
    client = client_for(owner)
    url = f"/api/projects/{project.pk}/"
    first = client.get(url)
    assert first.json()["members"] == [bob.pk]
    before = position(f"project:{project.pk}")
    bob.delete()
    after = client.get(url, HTTP_IF_NONE_MATCH=first["ETag"])
    assert after.status_code == 200
    assert after.json()["members"] == []
    assert position(f"project:{project.pk}") == before + 1
    event = Event.objects.filter(stream__name=f"project:{project.pk}").latest("seq")
    assert event.type == "v1:project.updated"
    assert event.variants["v1/owner"]["data"]["members"] == []


def test_a_users_writes_are_throttled_and_reads_are_not(board, settings):
    owner, project, _ = board
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"realtime_writes": "3/min"},
    }
    client = client_for(owner)
    url = f"/api/projects/{project.pk}/items/"
    answers = [client.post(url, {"title": f"t{n}"}, format="json") for n in range(4)]
    assert [a.status_code for a in answers] == [201, 201, 201, 429]
    assert int(answers[-1]["Retry-After"]) > 0
    assert Item.objects.filter(project=project).count() == 4  # the fixture's and three
    assert (
        Event.objects.filter(type="v1:item.created", stream__name=f"project:{project.pk}").count()
        == 4
    )
    for _ in range(5):  # reads (and revalidations) cost nothing
        assert client.get(url).status_code == 200
    other = UserFactory()
    add_member(project, other)
    assert client_for(other).post(url, {"title": "theirs"}, format="json").status_code == 201


def test_write_throttle_off_with_a_none_rate(board, settings):
    owner, project, _ = board
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"realtime_writes": None},
    }
    client = client_for(owner)
    url = f"/api/projects/{project.pk}/items/"
    assert all(
        client.post(url, {"title": f"t{n}"}, format="json").status_code == 201 for n in range(5)
    )


def test_websocket_tickets_spend_no_writes(board, settings):
    owner, project, _ = board
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"realtime_writes": "2/min"},
    }
    client = client_for(owner)
    assert all(client.post("/api/realtime/tickets/").status_code == 201 for _ in range(4))
    url = f"/api/projects/{project.pk}/items/"
    answers = [client.post(url, {"title": f"t{n}"}, format="json").status_code for n in range(3)]
    assert answers == [201, 201, 429]


def test_a_body_nested_too_deep_to_decode_is_a_400_and_writes_nothing(board):
    """DRF's JSONParser lets the decoder's RecursionError through (a 500 with a traceback);
    the demo's parser (realtime.parsers.JSONParser) answers it as any malformed body."""
    owner, _project, item = board
    client = client_for(owner)
    deep = "[" * 100_000
    events = Event.objects.count()
    for method, url in (
        ("post", f"/api/projects/{item.project_id}/items/"),
        ("patch", f"/api/items/{item.pk}/"),
        ("post", "/api/projects/"),
        ("put", "/api/notifications/preferences/"),
    ):
        response = getattr(client, method)(url, deep, content_type="application/json")
        assert response.status_code == 400, (method, url, response.status_code)
        assert "nested too deeply" in response.json()["detail"]
    assert Event.objects.count() == events
