"""A client without cookies, end to end: realtime.js in Node with a token-adding `fetch`, its
WebSocket blocked, falls back to SSE on a real daphne and gets an item saved through the API."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable

import pytest
from rest_framework.authtoken.models import Token

from .conftest import need
from .factories import ProjectFactory, UserFactory
from .live import ROOT, Daphne, database_url

SCRIPT = """
import { RealtimeClient } from "%(client)s";
const [base, token, stream] = process.argv.slice(2);
// A network that blocks WebSockets: every try fails before it opens.
class Blocked {
  constructor(url) {
    this.url = url; this.readyState = 0;
    setTimeout(() => { this.readyState = 3; this.onclose?.({ code: 1006 }); }, 5);
  }
  send() {}
  close() {}
}
// The app's own fetch: every request carries its token; it has no cookies.
const withToken = (url, init = {}) =>
  fetch(url, { ...init, headers: { ...(init.headers || {}), Authorization: `Token ${token}` } });
const say = (line) => console.log(JSON.stringify(line));
const c = new RealtimeClient({
  baseUrl: base, ticketUrl: base + "/api/realtime/tickets/", httpFallback: true,
  fetch: withToken, WebSocket: Blocked, wsAttempts: 1, shareTabs: false, probeEvery: 1e9,
});
c.on("status", (s) => say({ status: s.status }));
c.on("error", (e) => say({ error: e.code }));
c.subscribe(stream, { onEvent: (f) => say({ seq: f.seq, type: f.type, title: f.data.title }) });
c.connect();
setTimeout(() => process.exit(3), 30000);
"""


def lines_of(process: subprocess.Popen[str]) -> queue.Queue[dict]:
    out: queue.Queue[dict] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("{"):
                out.put(json.loads(line))

    threading.Thread(target=pump, daemon=True).start()
    return out


def wait_for(out: queue.Queue[dict], test: Callable[[dict], bool], seconds: float = 15) -> dict:
    deadline = time.monotonic() + seconds
    seen = []
    while time.monotonic() < deadline:
        try:
            line = out.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if test(line):
            return line
    raise AssertionError(f"not seen in {seconds} s; the client said {seen}")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_token_client_falls_back_to_sse_and_gets_an_item_saved_through_the_api(tmp_path):
    node = shutil.which("node")
    need(node is not None, "Node.js is not installed (the JS client runs in it)")
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    token = Token.objects.create(user=owner)
    script = tmp_path / "client.mjs"
    script.write_text(SCRIPT % {"client": ROOT / "realtime/static/realtime/realtime.js"})
    env = {"DATABASE_URL": database_url(), "DEBUG": "1"}
    with Daphne(env, tmp_path / "daphne.log") as server:
        base = server.url("").rstrip("/")
        client = subprocess.Popen(
            [node, str(script), base, token.key, f"project:{project.pk}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            out = lines_of(client)
            wait_for(out, lambda line: line.get("status") == "fallback-sse")
            time.sleep(0.5)  # the stream is open: what follows comes live
            request = urllib.request.Request(
                f"{base}/api/projects/{project.pk}/items/",
                data=json.dumps({"title": "from a token"}).encode(),
                headers={"Authorization": f"Token {token.key}", "Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 201
            got = wait_for(out, lambda line: "seq" in line)
            assert (got["type"], got["title"]) == ("v1:item.created", "from a token")
        finally:
            client.kill()
            client.wait(timeout=10)
        assert "Traceback" not in server.output()
