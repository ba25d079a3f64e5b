"""The HTTP read paths for clients without cookies: the event feed, long poll and SSE by the
credentials of DRF's authentication classes (the demo: `Authorization: Token <key>`)."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from rest_framework import exceptions
from rest_framework.authentication import BasicAuthentication, TokenAuthentication
from rest_framework.authtoken.models import Token, TokenProxy

from realtime.invalidation import _send

from .factories import ItemFactory, ProjectFactory, UserFactory
from .test_sse import SSEReader

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
db = sync_to_async

FEED = "/api/realtime/events/"
SSE = "/realtime/sse/"
TOKEN_FIRST = [
    "rest_framework.authentication.TokenAuthentication",
    "rest_framework.authentication.SessionAuthentication",
]


def token_header(key: str) -> dict[str, str]:
    return {"Authorization": f"Token {key}"}


async def owner_with_token():
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    token = await db(Token.objects.create)(user=owner)
    return owner, project, token


class TokenClient:
    """GETs with `Authorization: Token <key>`, per request: AsyncClient's own `headers=`
    reaches the view as `HTTP_HTTP_AUTHORIZATION` (Django 5.2)."""

    def __init__(self, key: str) -> None:
        self.client = AsyncClient()
        self.headers = token_header(key)

    async def get(self, path: str, query: dict[str, str]):
        return await self.client.get(path, query, headers=self.headers)


async def open_sse(headers: dict[str, str], streams: str, **query: str) -> SSEReader:
    response = await AsyncClient().get(SSE, {"streams": streams, **query}, headers=headers)
    assert response.status_code == 200, response.content
    reader = SSEReader(response)
    await reader.message()  # retry:
    return reader


async def test_a_token_reads_the_feed_as_its_user_and_only_what_it_may():
    _owner, project, token = await owner_with_token()
    stream = f"project:{project.pk}"
    client = TokenClient(token.key)
    start = (await client.get(FEED, {"streams": stream})).json()
    await db(ItemFactory)(project=project, title="by token")
    body = (await client.get(FEED, {"streams": stream, "cursor": start["cursor"]})).json()
    assert [e["data"]["title"] for e in body["events"]] == ["by token"]

    other = await db(ProjectFactory)()
    refused = await client.get(FEED, {"streams": f"project:{other.pk}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("path", [FEED, SSE])
@pytest.mark.parametrize(
    ("case", "reason"),
    [("unknown key", "Invalid token."), ("inactive user", "User inactive or deleted.")],
)
async def test_a_refused_token_is_401_with_the_classes_reason(path, case, reason):
    owner, _project, token = await owner_with_token()
    key = token.key
    if case == "unknown key":
        key = "0" * 40
    else:
        owner.is_active = False
        await db(owner.save)()
    response = await TokenClient(key).get(path, {"streams": f"user:{owner.pk}"})
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "not_authenticated"
    # TokenAuthentication's own words: the header was read, not ignored as unknown.
    assert error["message"] == reason
    assert key not in response.content.decode()  # the credentials sent are not echoed
    # The demo lists the session first: a cookie has no challenge scheme.
    assert not response.has_header("WWW-Authenticate")


@pytest.mark.parametrize("path", [FEED, SSE])
async def test_a_401_names_the_first_classes_challenge(settings, path):
    settings.REALTIME = {"HTTP_AUTHENTICATION_CLASSES": TOKEN_FIRST}
    response = await AsyncClient().get(path, {"streams": "user:1"})
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


async def test_the_setting_can_leave_credentials_out(settings):
    owner, _project, token = await owner_with_token()
    client = TokenClient(token.key)
    assert (await client.get(FEED, {"streams": f"user:{owner.pk}"})).status_code == 200
    settings.REALTIME = {
        "HTTP_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"]
    }
    assert (await client.get(FEED, {"streams": f"user:{owner.pk}"})).status_code == 401


async def test_a_signed_in_session_decides_over_a_token_of_another_user():
    alice = await db(UserFactory)()
    bob = await db(UserFactory)()
    token = await db(Token.objects.create)(user=bob)
    client = TokenClient(token.key)
    await client.client.aforce_login(alice)
    assert (await client.get(FEED, {"streams": f"user:{alice.pk}"})).status_code == 200
    assert (await client.get(FEED, {"streams": f"user:{bob.pk}"})).status_code == 403


@pytest.mark.parametrize("deleted", [True, False])
async def test_a_long_poll_decides_again_on_its_token_after_the_wait(deleted):
    _owner, project, token = await owner_with_token()
    stream = f"project:{project.pk}"
    client = TokenClient(token.key)
    start = (await client.get(FEED, {"streams": stream})).json()

    async def delete_meanwhile() -> None:
        await asyncio.sleep(0.3)
        if deleted:
            await db(Token.objects.filter(key=token.key).delete)()

    meanwhile = asyncio.create_task(delete_meanwhile())
    response = await client.get(FEED, {"streams": stream, "cursor": start["cursor"], "wait": "1.5"})
    await meanwhile
    if deleted:
        assert response.status_code == 401, response.content
        assert response.json()["error"]["code"] == "not_authenticated"
    else:
        assert response.status_code == 200, response.content
        assert response.json()["events"] == []


@pytest.mark.parametrize("model", [Token, TokenProxy], ids=["Token", "TokenProxy"])
async def test_an_sse_stream_by_token_lives_while_its_token_does(model):
    owner, project, token = await owner_with_token()
    reader = await open_sse(token_header(token.key), f"project:{project.pk}")
    await db(ItemFactory)(project=project, title="first")
    assert (await reader.event("v1:item.created"))["data"]["data"]["title"] == "first"

    # A decision with the token in place keeps the stream.
    await db(_send)([owner.pk], "realtime.authz")
    await asyncio.sleep(0.3)
    await db(ItemFactory)(project=project, title="second")
    assert (await reader.event("v1:item.created"))["data"]["data"]["title"] == "second"

    # The token deleted (here or through the admin's proxy): that decides again at once,
    # and ends the stream, as a logged-out session's.
    await db(model.objects.filter(key=token.key).delete)()
    with pytest.raises(StopAsyncIteration):
        await reader.event(timeout=3)


async def test_a_password_change_leaves_a_token_stream_running_as_drf_leaves_the_token():
    owner, project, token = await owner_with_token()
    reader = await open_sse(token_header(token.key), f"project:{project.pk}")

    def change_password() -> None:
        owner.set_password("a-new-password-123")
        owner.save()

    await db(change_password)()
    await db(_send)([owner.pk], "realtime.authz")
    await asyncio.sleep(0.3)
    await db(ItemFactory)(project=project, title="after")
    assert (await reader.event("v1:item.created"))["data"]["data"]["title"] == "after"
    await reader.close()


async def test_an_sse_stream_by_token_with_a_malformed_cursor_starts_now_with_a_reset():
    _owner, project, token = await owner_with_token()
    stream = f"project:{project.pk}"
    reader = await open_sse(token_header(token.key), stream, cursor="not-a-cursor")
    reset = await reader.event("reset")
    assert reset["data"]["stream"] == stream
    await reader.close()


class Basicish(BasicAuthentication):
    """A project's own password class (W026 names subclasses too)."""


class Broken(TokenAuthentication):
    """A class whose backend fails (it raises something other than a refusal)."""

    def authenticate(self, request):
        if request.META.get("HTTP_AUTHORIZATION"):
            raise RuntimeError("token store is down")
        return None


class Structured(TokenAuthentication):
    """Refuses as simplejwt does, with a dict detail; its challenge reads DRF's request."""

    def authenticate(self, request):
        if request.META.get("HTTP_AUTHORIZATION"):
            raise exceptions.AuthenticationFailed(
                {"detail": "Given token not valid", "code": "token_not_valid", "messages": []}
            )
        return None

    def authenticate_header(self, request):
        return f'Bearer realm="{request.query_params.get("realm", "api")}"'


@pytest.mark.parametrize("path", [FEED, SSE, "/api/presence/project:1/"])
async def test_a_class_that_fails_is_503_not_a_traceback(settings, path, caplog):
    settings.REALTIME = {"HTTP_AUTHENTICATION_CLASSES": [f"{__name__}.Broken"]}
    response = await TokenClient("k" * 40).get(path, {"streams": "user:1"})
    assert response.status_code == 503
    assert "Traceback" not in response.content.decode()
    assert "token store is down" not in response.content.decode()
    assert "Broken failed authenticating" in caplog.text


async def test_a_structured_refusal_gives_its_words_and_the_challenge_sees_drfs_request(settings):
    settings.REALTIME = {"HTTP_AUTHENTICATION_CLASSES": [f"{__name__}.Structured"]}
    refused = await TokenClient("k" * 40).get(FEED, {"streams": "user:1"})
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "Given token not valid"
    anonymous = await AsyncClient().get(FEED, {"streams": "user:1", "realm": "feed"})
    assert anonymous.status_code == 401
    assert anonymous["WWW-Authenticate"] == 'Bearer realm="feed"'


async def test_a_re_decision_that_cannot_be_made_ends_the_stream(monkeypatch, caplog):
    owner, project, token = await owner_with_token()
    reader = await open_sse(token_header(token.key), f"project:{project.pk}")

    def down(self, request):
        raise RuntimeError("token store is down")

    monkeypatch.setattr(TokenAuthentication, "authenticate", down)
    await db(_send)([owner.pk], "realtime.authz")
    with pytest.raises(StopAsyncIteration):
        await reader.event(timeout=3)
    assert "TokenAuthentication failed deciding again" in caplog.text


async def test_a_held_poll_whose_class_fails_after_the_wait_is_503(monkeypatch):
    _owner, project, token = await owner_with_token()
    stream = f"project:{project.pk}"
    client = TokenClient(token.key)
    start = (await client.get(FEED, {"streams": stream})).json()
    original = TokenAuthentication.authenticate
    calls = []

    def fails_the_second_time(self, request):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("token store is down")
        return original(self, request)

    monkeypatch.setattr(TokenAuthentication, "authenticate", fails_the_second_time)
    response = await client.get(FEED, {"streams": stream, "cursor": start["cursor"], "wait": "0.3"})
    assert response.status_code == 503, response.content
    assert response["Retry-After"] == "1"
