// Unit tests of realtime.js with a fake WebSocket, fake timers and a fake fetch.
// Run: node --experimental-detect-module --test tests/js/   (make test runs them)
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  backoffDelay,
  Deduper,
  encodeCursor,
  parsePositions,
  RealtimeClient,
  SSEParser,
  STATUS,
  StreamOrder,
} from "../../realtime/static/realtime/realtime.js";

// -- fakes ---------------------------------------------------------------------------------

class FakeTimers {
  constructor() {
    this.now = 0;
    this.queue = new Map();
    this.next = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.next++;
      this.queue.set(id, { at: this.now + ms, fn, ms });
      return id;
    };
    this.clearTimeout = (id) => this.queue.delete(id);
  }
  /** Run every timer due within `ms`, in time order. */
  async tick(ms) {
    const end = this.now + ms;
    for (;;) {
      const due = [...this.queue.entries()].filter(([, t]) => t.at <= end).sort((a, b) => a[1].at - b[1].at);
      if (!due.length) break;
      const [id, timer] = due[0];
      this.queue.delete(id);
      this.now = timer.at;
      timer.fn();
      await flush();
    }
    this.now = end;
  }
  delays() {
    return [...this.queue.values()].map((t) => t.ms);
  }
}

const flush = () => new Promise((resolve) => setImmediate(resolve));

function fakeSockets() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code = 1000) {
      this.readyState = 3;
      this.onclose?.({ code });
    }
    // test controls
    open(heartbeat = 25) {
      this.readyState = 1;
      this.onopen?.();
      this.receive({ op: "welcome", connectionId: "c", protocol: "v1", heartbeat });
    }
    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    fail(code = 1006) {
      this.readyState = 3;
      this.onclose?.({ code });
    }
    last(op) {
      return [...this.sent].reverse().find((f) => f.op === op);
    }
  }
  return { FakeWebSocket, sockets };
}

function client(extra = {}) {
  const timers = new FakeTimers();
  const { FakeWebSocket, sockets } = fakeSockets();
  const statuses = [];
  const errors = [];
  const c = new RealtimeClient({
    baseUrl: "http://testserver",
    WebSocket: FakeWebSocket,
    setTimeout: timers.setTimeout,
    clearTimeout: timers.clearTimeout,
    random: () => 0.5,
    fetch: extra.fetch || (async () => { throw new Error("no network in this test"); }),
    shareTabs: false,
    ...extra,
  });
  c.on("status", (s) => statuses.push(s));
  c.on("error", (e) => errors.push(e));
  return { c, timers, sockets, statuses, errors };
}

const event = (seq, extra = {}) => ({
  op: "event",
  stream: "project:1",
  seq,
  eventId: `e${seq}`,
  type: "v1:item.updated",
  data: { seq },
  ...extra,
});

// -- pure helpers --------------------------------------------------------------------------

test("backoff doubles from 1 s, caps at 30 s, and stays within the jitter bounds", () => {
  const ceilings = [0, 1, 2, 3, 4, 5, 6, 10].map((a) => backoffDelay(a, { random: () => 0.999999 }));
  assert.deepEqual(ceilings, [999, 1999, 3999, 7999, 15999, 29999, 29999, 29999]);
  for (let attempt = 0; attempt < 12; attempt++) {
    for (const r of [0, 0.25, 0.5, 0.999]) {
      const d = backoffDelay(attempt, { random: () => r });
      assert.ok(d >= 0 && d < Math.min(30000, 1000 * 2 ** attempt), `${attempt} ${r} ${d}`);
    }
  }
  assert.equal(backoffDelay(3, { random: () => 0 }), 0); // full jitter reaches 0
});

test("dedupe remembers a bounded number of ids", () => {
  const d = new Deduper(3);
  assert.equal(d.fresh("a"), true);
  assert.equal(d.fresh("a"), false);
  d.fresh("b");
  d.fresh("c");
  d.fresh("d"); // forgets "a"
  assert.equal(d.seen.size, 3);
  assert.equal(d.fresh("a"), true);
  assert.equal(d.fresh("d"), false);
});

test("stream order delivers in seq order once, buffers early events, bounds the buffer", () => {
  const o = new StreamOrder({ seq: 10, limit: 2 });
  assert.deepEqual(o.offer(event(12)), []);
  assert.equal(o.hasGap, true);
  assert.deepEqual(o.offer(event(11)).map((f) => f.seq), [11, 12]);
  assert.deepEqual(o.offer(event(12)), []); // duplicate
  assert.deepEqual(o.offer(event(9)), []); // old
  o.offer(event(14));
  o.offer(event(15));
  assert.equal(o.offer(event(16)), null); // buffer full: caller resets
});

test("cursor and positions helpers match the server's formats", () => {
  const cursor = encodeCursor({ "user:7": [9, null], "project:42": [131, "ab"] });
  const json = Buffer.from(cursor.replace(/-/g, "+").replace(/_/g, "/"), "base64").toString();
  assert.equal(json, '{"project:42":[131,"ab"],"user:7":[9,null]}');
  assert.ok(!cursor.includes("="));
  assert.deepEqual(parsePositions("project:42=131, user:7=9"), { "project:42": 131, "user:7": 9 });
  assert.deepEqual(parsePositions(null), {});
});

test("the SSE parser handles split chunks, ids, comments and CRLF", () => {
  const p = new SSEParser();
  assert.deepEqual(p.push("retry: 3000\n\n: hb\n\nevent: v1:item.created\nid: abc\nda"), [
    { event: "message", data: "", id: null, retry: 3000, comment: false },
    { event: "message", data: "", id: null, retry: null, comment: true },
  ]);
  const [m] = p.push('ta: {"op":"event"}\r\n\r\n');
  assert.deepEqual(m, { event: "v1:item.created", data: '{"op":"event"}', id: "abc", retry: null, comment: false });
});

// -- the client over a fake WebSocket ------------------------------------------------------

test("reconnects with backoff 1, 2, 4 s (jittered), statuses in order, reset after a stable connection", async () => {
  const { c, timers, sockets, statuses } = client({ wsAttempts: 100, stableAfter: 10000 });
  c.connect();
  await flush();
  assert.equal(sockets.length, 1);
  assert.match(sockets[0].url, /^ws:\/\/testserver\/ws\/realtime\/\?v=js-1$/);
  sockets[0].fail();
  sockets.at(-1);
  assert.deepEqual(timers.delays(), [500]); // random 0.5 of 1 s
  await timers.tick(500);
  sockets[1].fail();
  assert.deepEqual(timers.delays(), [1000]);
  await timers.tick(1000);
  sockets[2].fail();
  assert.deepEqual(timers.delays(), [2000]);
  await timers.tick(2000);
  sockets[3].open();
  assert.equal(c.status, STATUS.OPEN);
  await timers.tick(10000); // stable: attempts forgotten
  sockets[3].fail(4408);
  assert.ok(timers.delays().includes(500));
  assert.deepEqual(
    statuses.map((s) => s.status),
    ["connecting", "reconnecting", "reconnecting", "reconnecting", "reconnecting", "reconnecting", "reconnecting", "open", "reconnecting"],
  );
  assert.equal(statuses.find((s) => s.retryIn === 1000).status, "reconnecting");
  c.close();
});

test("4401 and 4403 stop reconnecting and say why", async () => {
  for (const code of [4401, 4403]) {
    const { c, timers, sockets, errors } = client();
    c.connect();
    await flush();
    sockets[0].open();
    sockets[0].fail(code);
    assert.equal(c.status, STATUS.OFFLINE);
    assert.deepEqual(timers.delays().filter((d) => d < 30000), []);
    assert.equal(errors[0].code, code === 4401 ? "unauthenticated" : "forbidden");
    await timers.tick(60000);
    assert.equal(sockets.length, 1);
  }
});

test("frames sent while reconnecting are queued, bounded, the oldest dropped with an error", async () => {
  const { c, sockets, errors } = client({ maxQueue: 2 });
  c.connect();
  await flush();
  const first = c.publish("project:1", "v1:typing.started", { n: 1 });
  const second = c.publish("project:1", "v1:typing.started", { n: 2 });
  const third = c.publish("project:1", "v1:typing.started", { n: 3 });
  await assert.rejects(first, (e) => e.code === "queue_full");
  assert.equal(errors[0].code, "queue_full");
  sockets[0].open();
  assert.deepEqual(sockets[0].sent.filter((f) => f.op === "publish").map((f) => f.data.n), [2, 3]);
  const ref = sockets[0].sent.at(-1).ref;
  sockets[0].receive({ op: "reply", ref, ok: true, data: { eventId: "x" } });
  assert.deepEqual(await third, { eventId: "x" });
  c.close(); // the second was sent and never answered: it fails with the connection
  await assert.rejects(second, (e) => e.code === "closed");
});

test("a frame queued while reconnecting stays pending through failed tries, then is sent once", async () => {
  const { c, timers, sockets } = client({ wsAttempts: 100 });
  c.connect();
  await flush();
  sockets[0].open();
  sockets[0].fail(); // the connection drops
  let settled = 0;
  const published = c.publish("project:1", "v1:typing.started", { n: 1 });
  published.then(() => (settled += 1), () => (settled += 1));
  await timers.tick(500);
  sockets[1].fail(); // a reconnect try that never got a welcome
  await timers.tick(1000);
  sockets[2].fail();
  await flush();
  assert.equal(settled, 0); // still queued, not rejected
  assert.equal(c.queue.length, 1);
  await timers.tick(2000);
  sockets[3].open();
  const sent = sockets.flatMap((s) => s.sent).filter((f) => f.op === "publish");
  assert.equal(sent.length, 1); // sent once, on the socket that opened
  sockets[3].receive({ op: "reply", ref: sent[0].ref, ok: true, data: { eventId: "p" } });
  assert.deepEqual(await published, { eventId: "p" });
  assert.equal(settled, 1);
  assert.equal(c.queue.length, 0);
  c.close();
});

test("a frame sent on a socket that closes fails with closed and is never resent", async () => {
  const { c, timers, sockets } = client();
  c.connect();
  await flush();
  sockets[0].open();
  const published = c.publish("project:1", "v1:typing.started", {});
  assert.equal(sockets[0].last("publish").op, "publish");
  sockets[0].fail(); // no reply: the server may or may not have acted on it
  await assert.rejects(published, (e) => e.code === "closed");
  await timers.tick(1000);
  sockets[1].open();
  assert.equal(sockets[1].last("publish"), undefined);
  c.close();
});

test("the queue stays bounded across failed reconnects; what overflowed is never sent", async () => {
  const { c, timers, sockets, errors } = client({ maxQueue: 2, wsAttempts: 100 });
  c.connect();
  await flush();
  sockets[0].fail();
  const outcomes = [];
  const promises = [1, 2, 3, 4].map((n) => {
    const p = c.publish("project:1", "v1:typing.started", { n });
    p.then(() => outcomes.push([n, "ok"]), (e) => outcomes.push([n, e.code]));
    return p;
  });
  assert.equal(c.queue.length, 2);
  await flush();
  assert.deepEqual(outcomes, [[1, "queue_full"], [2, "queue_full"]]);
  assert.deepEqual(errors.map((e) => e.code), ["queue_full", "queue_full"]);
  await timers.tick(500);
  sockets[1].fail(); // the queued ones survive a failed try
  await flush();
  assert.equal(outcomes.length, 2);
  await timers.tick(1000);
  sockets[2].open();
  const sent = sockets[2].sent.filter((f) => f.op === "publish");
  assert.deepEqual(sent.map((f) => f.data.n), [3, 4]);
  for (const f of sent) sockets[2].receive({ op: "reply", ref: f.ref, ok: true, data: {} });
  await Promise.allSettled(promises);
  assert.deepEqual(outcomes, [[1, "queue_full"], [2, "queue_full"], [3, "ok"], [4, "ok"]]);
  c.close();
});

test("close() fails what is still queued, once, and a later connect() does not send it", async () => {
  const { c, timers, sockets } = client();
  c.connect();
  await flush();
  const published = c.publish("project:1", "v1:typing.started", {});
  c.close();
  await assert.rejects(published, (e) => e.code === "closed");
  assert.equal(c.queue.length, 0);
  c.connect();
  await flush();
  sockets.at(-1).open();
  assert.equal(sockets.at(-1).last("publish"), undefined);
  await timers.tick(1000);
  c.close();
});

test("subscriptions are resent after a reconnect with since and epoch", async () => {
  const { c, timers, sockets } = client();
  c.connect();
  await flush();
  sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  const sub = sockets[0].last("subscribe");
  assert.deepEqual({ ...sub, ref: undefined }, { op: "subscribe", stream: "project:1", ref: undefined });
  sockets[0].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 5, epoch: "ep", recovered: false } });
  await flush();
  sockets[0].receive(event(6));
  sockets[0].receive(event(7));
  sockets[0].fail();
  await timers.tick(1000);
  sockets[1].open();
  const again = sockets[1].last("subscribe");
  assert.equal(again.since, 7);
  assert.equal(again.epoch, "ep");
  sockets[1].receive({ op: "reply", ref: again.ref, ok: true, data: { seq: 8, epoch: "ep", recovered: true } });
  await flush();
  sockets[1].receive(event(7)); // replay overlap: once only
  sockets[1].receive(event(8));
  assert.deepEqual(seen, [6, 7, 8]);
  c.close();
});

test("recovered false calls onReset and continues from the new position", async () => {
  const resets = [];
  const { c, timers, sockets } = client();
  c.connect();
  await flush();
  sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq), onReset: (r) => resets.push(r) });
  let sub = sockets[0].last("subscribe");
  sockets[0].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 2, epoch: "a", recovered: false } });
  await flush();
  assert.deepEqual(resets, []); // a first subscribe without since is no reset
  sockets[0].fail();
  await timers.tick(1000);
  sockets[1].open();
  sub = sockets[1].last("subscribe");
  sockets[1].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 90, epoch: "b", recovered: false } });
  await flush();
  assert.deepEqual(resets, [{ stream: "project:1", seq: 90, epoch: "b" }]);
  sockets[1].receive(event(91));
  assert.deepEqual(seen, [91]);
  c.close();
});

test("dedupe by eventId and a gap filled from the event feed", async () => {
  const feedCalls = [];
  const fetch = async (url) => {
    feedCalls.push(new URL(url));
    return {
      ok: true,
      status: 200,
      headers: { get: () => '"etag"' },
      json: async () => ({ events: [event(4), event(5)], resets: [], cursor: "x" }),
    };
  };
  const { c, timers, sockets } = client({ fetch, gapWait: 1000 });
  c.connect();
  await flush();
  sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  const sub = sockets[0].last("subscribe");
  sockets[0].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 3, epoch: "ep", recovered: false } });
  await flush();
  sockets[0].receive(event(6)); // 4 and 5 missing
  sockets[0].receive(event(6)); // duplicate
  assert.deepEqual(seen, []);
  await timers.tick(1000);
  await flush();
  assert.deepEqual(seen, [4, 5, 6]);
  assert.equal(feedCalls.length, 1);
  const cursor = feedCalls[0].searchParams.get("cursor");
  assert.equal(cursor, encodeCursor({ "project:1": [3, "ep"] }));
  sockets[0].receive(event(5, { eventId: "other-5" })); // old seq
  assert.deepEqual(seen, [4, 5, 6]);
  c.close();
});

test("a gap the feed cannot fill becomes a reset", async () => {
  const fetch = async () => ({ ok: false, status: 500, headers: { get: () => null }, json: async () => ({}) });
  const resets = [];
  const { c, timers, sockets } = client({ fetch, onReset: (r) => resets.push(r) });
  c.connect();
  await flush();
  sockets[0].open();
  c.subscribe("project:1", {});
  const sub = sockets[0].last("subscribe");
  sockets[0].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 3, epoch: "ep", recovered: false } });
  await flush();
  sockets[0].receive(event(9));
  await timers.tick(1000);
  await flush();
  assert.equal(resets.length, 1);
  assert.equal(resets[0].stream, "project:1");
  c.close();
});

test("falls back to SSE after failed WebSocket tries, then to polling, and probes the WebSocket", async () => {
  const requests = [];
  const fetch = async (url, init = {}) => {
    requests.push({ url: new URL(url), init });
    return { ok: false, status: 502, body: null, headers: { get: () => null }, json: async () => ({}) };
  };
  const { c, timers, sockets, statuses } = client({ fetch, wsAttempts: 2, sseAttempts: 2, probeEvery: 30000 });
  c.subscribe("project:1", {});
  c.connect();
  await flush();
  sockets[0].fail();
  await timers.tick(1000);
  sockets[1].fail();
  await flush();
  assert.ok(statuses.some((s) => s.status === STATUS.SSE));
  assert.equal(requests[0].url.pathname, "/realtime/sse/");
  assert.equal(requests[0].url.searchParams.get("streams"), "project:1");
  await timers.tick(5000);
  await flush();
  assert.equal(c.status, STATUS.POLLING);
  assert.ok(requests.some((r) => r.url.pathname === "/api/realtime/events/"));
  // The WebSocket is tried again while on a fallback, and taken back when it works.
  await timers.tick(30000);
  await flush();
  const probe = sockets.at(-1);
  assert.ok(sockets.length >= 3);
  probe.open();
  assert.equal(c.status, STATUS.OPEN);
  assert.equal(c.transport, "websocket");
  assert.equal(probe.last("subscribe").stream, "project:1");
  c.close();
});

test("polling is a long poll while visible, slow short polls while hidden, with ETag", async () => {
  const calls = [];
  const doc = { visibilityState: "visible", addEventListener() {}, removeEventListener() {}, cookie: "" };
  let answer = 0;
  const fetch = async (url, init = {}) => {
    const u = new URL(url);
    calls.push({ wait: u.searchParams.get("wait"), etag: init.headers?.["If-None-Match"] ?? null, path: u.pathname });
    if (u.pathname === "/realtime/sse/") throw new Error("blocked");
    answer += 1;
    if (!init.headers?.["If-None-Match"]) {
      return { ok: true, status: 200, headers: { get: () => '"e1"' }, json: async () => ({ events: [event(1)], resets: [], cursor: "c" }) };
    }
    return { ok: false, status: 304, headers: { get: () => '"e1"' }, json: async () => ({}) };
  };
  const { c, timers, sockets } = client({ fetch, document: doc, wsAttempts: 1, sseAttempts: 1, pollHidden: 30000 });
  const seen = [];
  c.subscribe("project:1", { since: 0, onEvent: (f) => seen.push(f.seq) });
  c.connect();
  await flush();
  sockets[0].fail();
  await flush();
  await flush();
  assert.equal(c.status, STATUS.POLLING);
  assert.deepEqual(seen, [1]);
  await timers.tick(250); // the next long poll starts a moment later
  await flush();
  const polls = calls.filter((x) => x.path === "/api/realtime/events/");
  // polls[0] is the reachability check after SSE failed (the server answers: SSE is blocked).
  assert.equal(polls[0].wait, null);
  assert.equal(polls[1].wait, "20");
  assert.equal(polls.at(-1).etag, '"e1"');
  doc.visibilityState = "hidden";
  await timers.tick(250);
  await flush();
  const hidden = calls.filter((x) => x.path === "/api/realtime/events/").at(-1);
  assert.equal(hidden.wait, null); // short poll when hidden
  assert.ok(timers.delays().includes(30000));
  c.close();
});

test("optimistic: apply, then reconcile; on failure roll back and surface the error", async () => {
  const { c, errors } = client();
  const list = [];
  const ok = await c.optimistic({
    apply: () => (list.push("tmp-1"), "tmp-1"),
    request: async () => ({ data: { id: 9 } }),
    reconcile: (result, temp) => (list[list.indexOf(temp)] = result.data.id),
    rollback: () => assert.fail("no rollback on success"),
  });
  assert.deepEqual(ok, { data: { id: 9 } });
  assert.deepEqual(list, [9]);
  await assert.rejects(
    c.optimistic({
      apply: () => (list.push("tmp-2"), "tmp-2"),
      request: async () => { throw Object.assign(new Error("The resource changed"), { status: 412 }); },
      rollback: (temp) => list.splice(list.indexOf(temp), 1),
    }),
    /The resource changed/,
  );
  assert.deepEqual(list, [9]);
  assert.deepEqual(errors.at(-1), { code: "rolled_back", message: "The resource changed", status: 412 });
});

test("events caused by the client's own request are marked own via correlationId", async () => {
  const fetch = async (url, init) => ({
    ok: true,
    status: 201,
    headers: { get: (h) => (h === "X-Stream-Position" ? "project:1=4" : null) },
    text: async () => JSON.stringify({ id: 1 }),
    init,
  });
  const { c, sockets } = client({ fetch });
  c.connect();
  await flush();
  sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f) });
  const sub = sockets[0].last("subscribe");
  sockets[0].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 3, epoch: "e", recovered: false } });
  await flush();
  const result = await c.request("/api/projects/1/items/", { body: { title: "x" } });
  assert.deepEqual(result.positions, { "project:1": 4 });
  sockets[0].receive(event(4, { correlationId: result.correlationId }));
  sockets[0].receive(event(5, { correlationId: "someone-else" }));
  assert.deepEqual(seen.map((f) => [f.seq, Boolean(f.own)]), [[4, true], [5, false]]);
  c.close();
});

test("presence list from the reply, patched by joined and left", async () => {
  const { c, sockets } = client();
  c.connect();
  await flush();
  sockets[0].open();
  const lists = [];
  c.subscribe("project:1", { onPresence: (m) => lists.push(m.map((x) => x.user.id)) });
  const sub = sockets[0].last("subscribe");
  sockets[0].receive({
    op: "reply", ref: sub.ref, ok: true,
    data: { seq: 0, epoch: null, recovered: false, presence: [{ user: { id: 1 }, since: "t" }] },
  });
  await flush();
  sockets[0].receive({ op: "event", stream: "project:1", eventId: "p1", type: "v1:presence.joined", data: { user: { id: 2 }, since: "t" } });
  sockets[0].receive({ op: "event", stream: "project:1", eventId: "p2", type: "v1:presence.left", data: { user: { id: 1 }, reason: "disconnect" } });
  assert.deepEqual(lists, [[1], [1, 2], [2]]);
  c.close();
});

test("server pings are answered and silence closes the socket", async () => {
  const { c, timers, sockets } = client();
  c.connect();
  await flush();
  sockets[0].open(25);
  sockets[0].receive({ op: "ping" });
  assert.deepEqual(sockets[0].sent.at(-1), { op: "pong" });
  await timers.tick(51000);
  assert.equal(sockets[0].readyState, 3); // watchdog closed it
  assert.equal(c.status, STATUS.RECONNECTING);
  c.close();
});

test("when nothing answers over HTTP either, the client keeps reconnecting instead of polling", async () => {
  const fetch = async () => { throw new TypeError("Failed to fetch"); };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1 });
  c.subscribe("project:1", {});
  c.connect();
  await flush();
  sockets[0].fail();
  await flush();
  await flush();
  assert.equal(c.status, STATUS.RECONNECTING);
  assert.equal(c.transport, null);
  await timers.tick(30000);
  await flush();
  assert.ok(sockets.length >= 2); // the WebSocket is tried again
  c.close();
});

// -- tabs sharing one connection -------------------------------------------------------------

function fakeTabs() {
  const channels = new Map();
  class FakeBroadcastChannel {
    constructor(name) {
      this.name = name;
      this.deaf = false; // test control: drop what reaches this tab
      if (!channels.has(name)) channels.set(name, new Set());
      channels.get(name).add(this);
    }
    postMessage(data) {
      for (const other of channels.get(this.name)) {
        if (other !== this && !other.deaf) setImmediate(() => other.onmessage?.({ data: structuredClone(data) }));
      }
    }
    close() {
      channels.get(this.name).delete(this);
    }
  }
  // Web Locks, exclusive mode: a queue per name, `signal` to give up waiting, `steal` to take
  // a held lock (the holder's request then rejects with an AbortError), as the spec says.
  const queues = new Map();
  const abortError = () => Object.assign(new Error("aborted"), { name: "AbortError" });
  const grantNext = (queue) => {
    const head = queue[0];
    if (!head || head.granted) return;
    head.granted = true;
    Promise.resolve()
      .then(() => head.callback({ name: head.name, mode: "exclusive" }))
      .then(
        (value) => {
          if (queue[0] === head) {
            queue.shift();
            grantNext(queue);
          }
          head.resolve(value);
        },
        (error) => {
          if (queue[0] === head) {
            queue.shift();
            grantNext(queue);
          }
          head.reject(error);
        },
      );
  };
  const locks = {
    request(name, options, callback) {
      if (typeof options === "function") [callback, options] = [options, {}];
      return new Promise((resolve, reject) => {
        const queue = queues.get(name) || [];
        queues.set(name, queue);
        const entry = { name, callback, resolve, reject, granted: false };
        if (options.signal) {
          options.signal.addEventListener("abort", () => {
            const at = queue.indexOf(entry);
            if (at < 0 || entry.granted) return;
            queue.splice(at, 1);
            reject(abortError());
          });
        }
        if (options.steal) {
          if (queue[0] && queue[0].granted) queue.shift().reject(abortError());
          queue.unshift(entry);
        } else {
          queue.push(entry);
        }
        grantNext(queue);
      });
    },
    /** Test control: is the lock held, and by a request still waiting how many. */
    state(name) {
      const queue = queues.get(name) || [];
      return { held: Boolean(queue[0] && queue[0].granted), waiting: queue.filter((e) => !e.granted).length };
    },
  };
  return { FakeBroadcastChannel, locks };
}

function tabs(extra = {}) {
  const { FakeBroadcastChannel, locks } = fakeTabs();
  const timers = new FakeTimers();
  const { FakeWebSocket, sockets } = fakeSockets();
  const make = () =>
    new RealtimeClient({
      baseUrl: "http://testserver",
      WebSocket: FakeWebSocket,
      setTimeout: timers.setTimeout,
      clearTimeout: timers.clearTimeout,
      random: () => 0.5,
      fetch: async () => { throw new Error("no feed here"); },
      BroadcastChannel: FakeBroadcastChannel,
      locks,
      ...extra,
    });
  return { make, timers, sockets, locks, lockName: "realtime-leader:ws://testserver/ws/realtime/" };
}

const settle = async () => {
  for (let i = 0; i < 5; i++) await flush();
};

test("tabs share one connection: one leader socket, followers get events, a new leader takes over", async () => {
  const { make, sockets } = tabs();
  const leader = make().connect();
  const follower = make().connect();
  await flush();
  await flush();
  assert.equal(leader.role, "leader");
  assert.equal(follower.role, "follower");
  assert.equal(sockets.length, 1); // one connection for two tabs
  const statuses = [];
  follower.on("status", (s) => statuses.push(s.status));
  sockets[0].open();
  await flush();
  assert.deepEqual(statuses, ["open"]); // the follower mirrors the leader's status

  const seen = [];
  follower.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  await flush();
  await flush();
  const sub = sockets[0].last("subscribe");
  assert.equal(sub.stream, "project:1"); // the leader subscribed on the follower's behalf
  sockets[0].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 4, epoch: "e", recovered: false } });
  await flush();
  await flush();
  sockets[0].receive(event(5));
  sockets[0].receive(event(6));
  await flush();
  assert.deepEqual(seen, [5, 6]);

  // A publish from the follower goes out through the leader's socket and its reply comes back.
  const published = follower.publish("project:1", "v1:typing.started", {});
  await flush();
  const frame = sockets[0].last("publish");
  sockets[0].receive({ op: "reply", ref: frame.ref, ok: true, data: { eventId: "p" } });
  await flush();
  assert.deepEqual(await published, { eventId: "p" });

  leader.close(); // the leader tab goes: the follower takes the lock and the connection
  await flush();
  await flush();
  assert.equal(follower.role, "leader");
  assert.equal(sockets.length, 2);
  sockets[1].open();
  await flush();
  const again = sockets[1].last("subscribe");
  assert.equal(again.stream, "project:1");
  assert.equal(again.since, 6); // resumes where this tab was
  sockets[1].receive({ op: "reply", ref: again.ref, ok: true, data: { seq: 7, epoch: "e", recovered: true } });
  sockets[1].receive(event(7));
  await flush();
  assert.deepEqual(seen, [5, 6, 7]);
  follower.close();
});

test("a leader closed for good by 4401/4403 releases the lock: a tab opened later leads", async () => {
  for (const code of [4401, 4403]) {
    const { make, sockets, locks, lockName } = tabs();
    const first = make().connect();
    await settle();
    assert.equal(first.role, "leader");
    sockets[0].open();
    sockets[0].fail(code); // e.g. logged out in this tab
    assert.equal(first.status, STATUS.OFFLINE);
    await settle();
    assert.deepEqual(locks.state(lockName), { held: false, waiting: 0 });
    assert.equal(first.channel, null);
    const later = make().connect(); // logged in again, in another tab
    await settle();
    assert.equal(later.role, "leader");
    assert.equal(sockets.length, 2);
    sockets[1].open();
    await settle();
    assert.equal(later.status, STATUS.OPEN);
    later.close();
    first.close();
  }
});

test("a follower takes the connection over when its leader is closed for good", async () => {
  const { make, sockets } = tabs();
  const first = make().connect();
  const second = make().connect();
  await settle();
  sockets[0].open();
  await settle();
  assert.equal(second.role, "follower");
  sockets[0].fail(4401);
  await settle();
  assert.equal(second.role, "leader");
  assert.equal(sockets.length, 2);
  second.close();
  first.close();
});

test("a follower that hears no leader within leaderWait steals the lock from the silent holder", async () => {
  const { make, sockets, timers, locks, lockName } = tabs({ leaderWait: 3000 });
  // A holder that never answers: a tab frozen, or left over by an older client.
  let stolen = null;
  locks.request(lockName, () => new Promise(() => {})).catch((e) => (stolen = e.name));
  await settle();
  const tab = make().connect();
  await settle();
  assert.equal(tab.role, "follower");
  assert.equal(sockets.length, 0);
  await timers.tick(2999);
  assert.equal(tab.role, "follower");
  await timers.tick(1);
  await settle();
  assert.equal(stolen, "AbortError");
  assert.equal(tab.role, "leader");
  assert.equal(sockets.length, 1);
  sockets[0].open();
  await settle();
  assert.equal(tab.status, STATUS.OPEN);
  tab.close();
  await settle();
  assert.deepEqual(locks.state(lockName), { held: false, waiting: 0 });
});

test("a follower that hears its leader does not steal; a leader whose lock is stolen steps down", async () => {
  const { make, sockets, timers } = tabs({ leaderWait: 3000 });
  const first = make().connect();
  const heard = make().connect();
  await settle();
  sockets[0].open();
  await timers.tick(10000);
  await settle();
  assert.equal(heard.role, "follower"); // it heard the leader: no steal
  assert.equal(sockets.length, 1);
  // A tab that hears nothing (as if the leader were frozen) takes the lock after leaderWait.
  const deaf = make();
  deaf.connect();
  deaf.channel.deaf = true;
  await settle();
  await timers.tick(3000);
  await settle();
  assert.equal(deaf.role, "leader");
  assert.equal(first.role, "follower"); // the old leader gave its connection up
  assert.equal(sockets[0].readyState, 3);
  assert.equal(sockets.length, 2);
  await timers.tick(60000);
  await settle();
  assert.equal(sockets.length, 2); // and does not reconnect or steal it back: it heard the new leader
  assert.equal(first.role, "follower");
  assert.equal(first.leaderId, deaf.tabId);
  for (const tab of [first, heard, deaf]) tab.close();
});

test("a publish forwarded to a leader that leaves fails with closed and is not resent", async () => {
  const { make, sockets } = tabs();
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  sockets[0].open();
  await settle();
  const published = follower.publish("project:1", "v1:typing.started", {});
  await settle();
  assert.equal(sockets[0].last("publish").op, "publish");
  leader.close(); // before the server's reply
  await assert.rejects(published, (e) => e.code === "closed");
  await settle();
  assert.equal(follower.role, "leader");
  sockets[1].open();
  await settle();
  assert.equal(sockets[1].last("publish"), undefined);
  follower.close();
});
