"""End to end in real headless Chromium (Debian's package) against daphne: the demo board.

Playwright drives /usr/bin/chromium (never a downloaded browser). A failing test leaves a
screenshot of every open page in test-artifacts/.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from django.conf import settings
from guardian.shortcuts import assign_perm

from board.membership import add_member
from board.models import Item
from realtime.testing import session_for

from .conftest import need
from .factories import ProjectFactory, UserFactory
from .live import Daphne, database_url

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT = 15_000  # ms, for each expectation

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def browser(monkeypatch):
    # Playwright's sync API runs an event loop in this thread; the test's ORM calls are
    # still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
    need(os.path.exists(CHROMIUM), "Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright is not installed (the dev extra has it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def server(tmp_path):
    env = {"DATABASE_URL": database_url(), "DEBUG": "1"}
    if os.environ.get("REDIS_URL"):
        env["REDIS_URL"] = os.environ["REDIS_URL"]
    with Daphne(env, tmp_path / "daphne.log") as node:
        node.env_used = env
        yield node


@pytest.fixture
def pages(browser, server, request):
    """Open a logged-in page as a user: pages(user, path) -> Page."""
    opened = []

    def open_page(user, path, *, init_script=None, route=None):
        context = browser.new_context(base_url=server.url(""))
        context.add_cookies(
            [
                {
                    "name": settings.SESSION_COOKIE_NAME,
                    "value": session_for(user),
                    "url": server.url("/"),
                },
                {"name": "csrftoken", "value": "e2e" * 10 + "ab", "url": server.url("/")},
            ]
        )
        if init_script:
            context.add_init_script(init_script)
        page = context.new_page()
        if route:
            page.route(*route)
        page.set_default_timeout(TIMEOUT)
        page.goto(path)
        opened.append((user.username, page))
        return page

    yield open_page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        for n, (name, page) in enumerate(opened):
            with contextlib.suppress(Exception):  # a closed page has nothing to show
                page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{n}-{name}.png"))
        (ARTIFACTS / f"{request.node.name}-daphne.log").write_text(server.output())


def call_api(server, user, method, path, body=None):
    """Call the server's API as `user` (so this node publishes the change live); the status."""
    import json
    import urllib.request

    token = "e2e" * 10 + "ab"
    request = urllib.request.Request(
        server.url(path),
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "Content-Type": "application/json",
            "X-CSRFToken": token,
            "Cookie": f"{settings.SESSION_COOKIE_NAME}={session_for(user)}; csrftoken={token}",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def create_item(server, user, project, title, position=0):
    """POST an item through the server's API."""
    path = f"/api/projects/{project.pk}/items/"
    assert call_api(server, user, "POST", path, {"title": title, "position": position}) == 201


def board(page):
    page.wait_for_selector("[data-board][data-ready=true]")
    return page


def item_titles(page):
    return page.locator("[data-items] li[data-id] .title").all_inner_texts()


def expect_titles(page, titles):
    from playwright.sync_api import expect

    expect(page.locator("[data-items] li[data-id] .title")).to_have_text(titles)


def team():
    alice = UserFactory(username="alice-e2e", first_name="Alice")
    bob = UserFactory(username="bob-e2e", first_name="Bob")
    project = ProjectFactory(owner=alice, name="Launch")
    add_member(project, bob)
    return alice, bob, project


def test_an_edit_by_one_user_appears_for_the_other_with_presence_and_typing(pages):
    from playwright.sync_api import expect

    alice, bob, project = team()
    a = board(pages(alice, f"/projects/{project.pk}/"))
    b = board(pages(bob, f"/projects/{project.pk}/"))
    expect(a.locator("[data-realtime-status]")).to_have_attribute("data-status", "open")
    # Presence: both see both, once each.
    expect(a.locator("[data-presence] .avatar")).to_have_count(2)
    expect(b.locator("[data-presence] .avatar")).to_have_count(2)

    a.fill("#new-item", "Book the venue")
    # Typing reaches bob, not alice, and says who.
    expect(b.locator("[data-typing]")).to_have_text("Alice is typing…")
    expect(a.locator("[data-typing]")).to_have_text("")
    a.click("form.add button")
    expect_titles(b, ["Book the venue"])
    expect_titles(a, ["Book the venue"])
    expect(b.locator("[data-typing]")).to_have_text("")  # stopped on submit

    b.locator("[data-items] li[data-id] input[type=checkbox]").first.check()
    expect(a.locator("[data-items] li.done .title")).to_have_text(["Book the venue"])
    item = Item.objects.get(project=project)
    assert item.done is True
    b.close()
    expect(a.locator("[data-presence] .avatar")).to_have_count(1)  # bob left


def test_typing_indicator_expires_without_a_stop(pages):
    from playwright.sync_api import expect

    alice, bob, project = team()
    a = board(pages(alice, f"/projects/{project.pk}/"))
    b = board(pages(bob, f"/projects/{project.pk}/"))
    expect(b.locator("[data-presence] .avatar")).to_have_count(2)
    # A typing.started with no stop (the tab went away): gone after expiresIn (3 s).
    a.evaluate(
        "async () => { const m = await import('/static/realtime/page.js');"
        f" await m.client.publish('project:{project.pk}', 'v1:typing.started', {{}}); }}"
    )
    expect(b.locator("[data-typing]")).to_have_text("Alice is typing…")
    started = time.monotonic()
    expect(b.locator("[data-typing]")).to_have_text("", timeout=6000)
    assert 2.0 < time.monotonic() - started < 6.0


def test_server_restart_reconnects_and_nothing_made_meanwhile_is_missing(pages, server, tmp_path):
    from playwright.sync_api import expect

    alice, bob, project = team()
    b = board(pages(bob, f"/projects/{project.pk}/"))
    status = b.locator("[data-realtime-status]")
    expect(status).to_have_attribute("data-status", "open")
    for n in range(3):
        create_item(server, alice, project, f"before {n}", n)
    expect_titles(b, ["before 0", "before 1", "before 2"])

    server.__exit__(None, None, None)  # stop the server
    expect(status).to_have_attribute("data-status", "reconnecting")
    expect(status).to_have_text(re.compile(r"Reconnecting"))
    for n in range(5):  # changes while the page is cut off (logged; nobody hears them live)
        Item.objects.create(project=project, title=f"while down {n}", position=10 + n)
    Item.objects.filter(title="before 1").delete()
    with Daphne(server.env_used, tmp_path / "restarted.log", port=server.port):
        expect(status).to_have_attribute("data-status", re.compile("open|fallback"), timeout=40_000)
        expected = ["before 0", "before 2"] + [f"while down {n}" for n in range(5)]
        expect_titles(b, expected)
        create_item(server, alice, project, "after", 99)
        expect_titles(b, [*expected, "after"])


NO_WEBSOCKET = """
window.WebSocket = class BlockedWebSocket {
  constructor() {
    this.readyState = 3;
    setTimeout(() => this.onclose && this.onclose({code: 1006}), 5);
  }
  send() {}
  close() {}
};
"""


def test_without_websocket_the_page_updates_through_sse_then_through_polling(pages, server):
    from playwright.sync_api import expect

    alice, bob, project = team()
    sse = board(pages(bob, f"/projects/{project.pk}/", init_script=NO_WEBSOCKET))
    expect(sse.locator("[data-realtime-status]")).to_have_attribute(
        "data-status", "fallback-sse", timeout=30_000
    )
    create_item(server, alice, project, "over sse", 0)
    expect_titles(sse, ["over sse"])

    polled = board(
        pages(
            alice,
            f"/projects/{project.pk}/",
            init_script=NO_WEBSOCKET,
            route=("**/realtime/sse/**", lambda route: route.abort()),
        )
    )
    expect(polled.locator("[data-realtime-status]")).to_have_attribute(
        "data-status", "fallback-polling", timeout=30_000
    )
    expect(polled.locator("[data-realtime-status]")).to_have_text("Live (fallback: polling)")
    create_item(server, alice, project, "over polling", 1)
    expect_titles(polled, ["over sse", "over polling"])
    expect_titles(sse, ["over sse", "over polling"])


def test_optimistic_add_is_rolled_back_with_a_message_when_refused(pages):
    from playwright.sync_api import expect

    alice, _bob, project = team()
    viewer = UserFactory(username="viewer-e2e")
    assign_perm("board.view_project", viewer, project)  # may read, may not change
    page = board(pages(viewer, f"/projects/{project.pk}/"))
    page.fill("#new-item", "Not allowed")
    page.click("form.add button")
    message = page.locator("[data-board] [data-message]")
    expect(message).to_be_visible()
    expect(message).to_contain_text('Could not add "Not allowed"')
    expect(message).to_contain_text("permission")
    expect(page.locator("[data-items] li[data-id]")).to_have_count(0)
    assert not Item.objects.filter(title="Not allowed").exists()

    # A stale rename (412) is rolled back too: alice renames with an If-Match that no longer
    # matches, because bob's change landed first.
    item = Item.objects.create(project=project, title="Original", position=0)
    a = board(pages(alice, f"/projects/{project.pk}/"))
    expect_titles(a, ["Original"])
    result = a.evaluate(
        """async (id) => {
          const m = await import('/static/realtime/page.js');
          try {
            await m.client.optimistic({
              request: () => m.client.request(`/api/items/${id}/`,
                {method: 'PATCH', body: {title: 'Mine'}, headers: {'If-Match': '"stale"'}}),
            });
            return 'no error';
          } catch (error) { return `${error.status} ${error.message}`; }
        }""",
        item.pk,
    )
    assert result.startswith("412 ")
    assert Item.objects.get(pk=item.pk).title == "Original"


def test_tabs_of_one_browser_share_one_connection_and_hand_it_over(browser, server):
    from playwright.sync_api import expect

    from realtime.models import Connection

    alice, bob, project = team()
    context = browser.new_context(base_url=server.url(""))
    context.add_cookies(
        [{"name": settings.SESSION_COOKIE_NAME, "value": session_for(bob), "url": server.url("/")}]
    )
    first = context.new_page()
    first.set_default_timeout(TIMEOUT)
    first.goto(f"/projects/{project.pk}/")
    board(first)
    expect(first.locator("[data-realtime-status]")).to_have_attribute("data-status", "open")
    second = context.new_page()
    second.set_default_timeout(TIMEOUT)
    second.goto(f"/projects/{project.pk}/")
    board(second)
    expect(second.locator("[data-realtime-status]")).to_have_attribute("data-status", "open")
    create_item(server, alice, project, "seen by both", 0)
    expect_titles(first, ["seen by both"])
    expect_titles(second, ["seen by both"])
    assert Connection.objects.filter(user=bob).count() == 1  # two tabs, one socket
    first.close()  # the leader tab goes; the other takes the connection over
    create_item(server, alice, project, "after the handover", 1)
    expect_titles(second, ["seen by both", "after the handover"])
    deadline = time.monotonic() + 10
    while Connection.objects.filter(user=bob).count() != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert Connection.objects.filter(user=bob).count() == 1
    context.close()


def held_requests(page, pattern):
    """Hold the page's requests matching `pattern` until the test continues them."""
    held = []
    page.route(pattern, lambda route: held.append(route))
    return held


def wait_for(page, condition):
    deadline = time.monotonic() + TIMEOUT / 1000
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        page.wait_for_timeout(50)  # lets Playwright dispatch the page's requests meanwhile


def test_a_late_answer_does_not_bring_back_an_item_deleted_meanwhile(pages, server):
    from playwright.sync_api import expect

    alice, bob, project = team()
    item = Item.objects.create(project=project, title="Doomed", position=0)
    b = board(pages(bob, f"/projects/{project.pk}/"))
    expect(b.locator("[data-realtime-status]")).to_have_attribute("data-status", "open")
    expect_titles(b, ["Doomed"])
    held = held_requests(b, f"**/api/items/{item.pk}/")
    b.locator("[data-items] li[data-id] input[type=checkbox]").first.click()  # bob's PATCH
    wait_for(b, lambda: held)
    # Alice deletes the item while bob's change is on its way; the event reaches bob first.
    assert call_api(server, alice, "DELETE", f"/api/items/{item.pk}/") == 204
    expect(b.locator("[data-items] li[data-id]")).to_have_count(0)
    held[0].continue_()  # the server answers 404: bob's change is rolled back...
    message = b.locator("[data-board] [data-message]")
    expect(message).to_contain_text('Could not update "Doomed"')
    # ...and the rollback does not re-add the item alice deleted.
    expect(b.locator("[data-items] li[data-id]")).to_have_count(0)


def test_the_bell_counts_a_notification_made_between_render_and_subscribe(browser, server):
    from playwright.sync_api import expect

    from notifications import notify
    from notifications.service import unread_count

    alice, bob, _project = team()
    context = browser.new_context(base_url=server.url(""))
    context.add_cookies(
        [{"name": settings.SESSION_COOKIE_NAME, "value": session_for(bob), "url": server.url("/")}]
    )
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    held = held_requests(page, "**/static/realtime/page.js")  # the bell's script waits
    page.goto("/", wait_until="commit")
    wait_for(page, lambda: held)
    count = page.locator(".notification-bell [data-unread-count]")
    rendered = unread_count(bob)  # team() notified bob already (added to the project)
    expect(count).to_have_text(str(rendered))
    notify(bob, "mentioned you", actor=alice)  # logged on user:<bob> before the bell subscribes
    held[0].continue_()
    expect(page.locator("[data-realtime-status]")).to_have_attribute("data-status", "open")
    expect(count).to_have_text(str(rendered + 1), timeout=5000)
    context.close()
