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
      // Let what the timer started settle before time moves on (a message between tabs and
      // its answer take a few turns of the event loop, and no time).
      for (let i = 0; i < 5; i++) await flush();
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
  const reported = []; // errors thrown by the page's handlers, reported and not rethrown
  const c = new RealtimeClient({
    baseUrl: "http://testserver",
    WebSocket: FakeWebSocket,
    setTimeout: timers.setTimeout,
    clearTimeout: timers.clearTimeout,
    random: () => 0, // the shortest waits (backoffDelay: half the step)
    fetch: extra.fetch || (async () => { throw new Error("no network in this test"); }),
    shareTabs: false,
    reportError: (e) => reported.push(e),
    ...extra,
  });
  c.on("status", (s) => statuses.push(s));
  c.on("error", (e) => errors.push(e));
  return { c, timers, sockets, statuses, errors, reported };
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
      const step = Math.min(30000, 1000 * 2 ** attempt);
      assert.ok(d >= step / 2 && d < step, `${attempt} ${r} ${d}`);
    }
  }
  // Never sooner than half the step: 0.5, 1, 2, 4 s at the least, 15 s once capped.
  const floors = [0, 1, 2, 3, 10].map((a) => backoffDelay(a, { random: () => 0 }));
  assert.deepEqual(floors, [500, 1000, 2000, 4000, 15000]);
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
  assert.deepEqual(timers.delays(), [500]); // random 0: the lower half of 1 s, 500 ms
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

test("a socket after one that was welcomed says it reconnects (?reconnect=1); first tries do not", async () => {
  const { c, timers, sockets } = client({ wsAttempts: 100, stableAfter: 10000 });
  c.connect();
  await flush();
  sockets[0].fail(); // never welcomed: the next try is still a first connection
  await timers.tick(500);
  sockets[1].open();
  await timers.tick(10000); // stable: the backoff forgets its attempts, not the connection
  sockets[1].fail(1006);
  await timers.tick(500);
  sockets[2].fail();
  await timers.tick(1000);
  const reconnect = sockets.map((s) => new URL(s.url).searchParams.get("reconnect"));
  assert.deepEqual(reconnect, [null, null, "1", "1"]);
  assert.match(sockets[3].url, /\?v=js-1&reconnect=1$/);
  c.close();
});

test("a 4429 waits long, longer each time in a row, and a stable socket between does not forget it", async () => {
  const { c, timers, sockets, statuses } = client({ wsAttempts: 100, stableAfter: 10000, limitForget: 300000, random: () => 0.5 });
  c.connect();
  await flush();
  const retries = [];
  for (let n = 0; n < 3; n++) {
    sockets.at(-1).open();
    await timers.tick(10000); // open and stable: the ordinary backoff starts again from 1 s
    sockets.at(-1).fail(4429); // closed for abuse
    retries.push(statuses.at(-1).retryIn);
    await timers.tick(retries.at(-1));
  }
  assert.deepEqual(retries, [3000, 6000, 12000]); // random 0.5 of 2-4 s, 4-8 s, 8-16 s
  sockets.at(-1).open(1000); // a heartbeat longer than the wait: the socket stays open
  await timers.tick(300000); // five minutes without one: forgotten
  sockets.at(-1).fail(4429);
  assert.equal(statuses.at(-1).retryIn, 3000);
  c.close(); // a new start forgets them too
  c.connect();
  await flush();
  sockets.at(-1).open();
  sockets.at(-1).fail(4429);
  assert.equal(statuses.at(-1).retryIn, 3000);
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

// The queue tests publish a type other than typing: of queued typing frames only the newest
// per stream and type is sent (a test near the end covers that).
test("frames sent while reconnecting are queued, bounded, the oldest dropped with an error", async () => {
  const { c, sockets, errors } = client({ maxQueue: 2 });
  c.connect();
  await flush();
  const first = c.publish("project:1", "v1:cursor.moved", { n: 1 });
  const second = c.publish("project:1", "v1:cursor.moved", { n: 2 });
  const third = c.publish("project:1", "v1:cursor.moved", { n: 3 });
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
    const p = c.publish("project:1", "v1:cursor.moved", { n });
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

// A client with this fetch, following project:1 (at seq 3) on an open socket; `seen` gets its events.
async function followingProject1(fetch) {
  const { c, sockets } = client({ fetch });
  c.connect();
  await flush();
  sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f) });
  const sub = sockets[0].last("subscribe");
  sockets[0].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 3, epoch: "e", recovered: false } });
  await flush();
  return { c, sockets, seen };
}

test("events caused by the client's own request are marked own via correlationId", async () => {
  const fetch = async (url, init) => ({
    ok: true,
    status: 201,
    headers: { get: (h) => (h === "X-Stream-Position" ? "project:1=4" : null) },
    text: async () => JSON.stringify({ id: 1 }),
    init,
  });
  const { c, sockets, seen } = await followingProject1(fetch);
  const result = await c.request("/api/projects/1/items/", { body: { title: "x" } });
  assert.deepEqual(result.positions, { "project:1": 4 });
  sockets[0].receive(event(4, { correlationId: result.correlationId }));
  sockets[0].receive(event(5, { correlationId: "someone-else" }));
  assert.deepEqual(seen.map((f) => [f.seq, Boolean(f.own)]), [[4, true], [5, false]]);
  c.close();
});

test("optimistic makes the correlation id before the request: apply and request get it, its events are own", async () => {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push(init);
    return { ok: true, status: 201, headers: { get: () => null }, text: async () => JSON.stringify({ id: 1 }) };
  };
  const { c, sockets, seen } = await followingProject1(fetch);
  let applied = null;
  const result = await c.optimistic({
    apply: ({ correlationId }) => ((applied = correlationId), "tmp-1"),
    request: (temp, { correlationId }) => {
      assert.equal(temp, "tmp-1");
      assert.equal(correlationId, applied);
      // The events of the change may come before the answer: they carry the id already.
      sockets[0].receive(event(4, { correlationId }));
      return c.request("/api/projects/1/items/", { body: { title: "x" }, correlationId });
    },
  });
  assert.match(applied, /^[0-9a-f]{32}$/);
  assert.equal(calls[0].headers["X-Correlation-ID"], applied);
  assert.equal(result.correlationId, applied);
  assert.deepEqual(seen.map((f) => [f.seq, Boolean(f.own)]), [[4, true]]);
  // One the server would not take (it would make another, and no event would carry it).
  await assert.rejects(c.request("/api/x/", { correlationId: "no spaces" }), RangeError);
  assert.equal(calls.length, 1);
  c.close();
});

// A client subscribed to project:1 on an open socket, recording each presence list's ids.
async function presenceClient() {
  const { c, sockets } = client();
  c.connect();
  await flush();
  sockets[0].open();
  const lists = [];
  c.subscribe("project:1", { onPresence: (m) => lists.push(m.map((x) => x.user.id)) });
  return { c, sockets, lists, sub: sockets[0].last("subscribe") };
}

test("presence list from the reply, patched by joined and left", async () => {
  const { c, sockets, lists, sub } = await presenceClient();
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

test("presence diffs that arrive out of order leave the member list right", async () => {
  const { c, sockets, lists, sub } = await presenceClient();
  const T1 = "2026-12-03T10:00:00.000Z";
  const T2 = "2026-12-03T10:00:05.000Z";
  sockets[0].receive({
    op: "reply", ref: sub.ref, ok: true,
    data: { seq: 0, epoch: null, recovered: false, presence: [{ user: { id: 1 }, since: T1 }] },
  });
  await flush();
  const diff = (type, id, since) => ({ op: "event", stream: "project:1", eventId: `${type}${id}${since}`, type, data: { user: { id }, since } });
  // User 1 reloaded the page: the new socket's joined came before the old one's left.
  sockets[0].receive(diff("v1:presence.joined", 1, T2));
  sockets[0].receive(diff("v1:presence.left", 1, T1));
  assert.deepEqual(lists.at(-1), [1]); // the late left ends the older presence only
  // User 2 came and went, and the joined arrived last: it is of a presence seen to end.
  sockets[0].receive(diff("v1:presence.left", 2, T1));
  sockets[0].receive(diff("v1:presence.joined", 2, T1));
  assert.deepEqual(lists.at(-1), [1]);
  // In order, every diff applies; a left without since (an older server) still does.
  sockets[0].receive(diff("v1:presence.left", 1, T2));
  assert.deepEqual(lists.at(-1), []);
  sockets[0].receive(diff("v1:presence.joined", 2, T2));
  assert.deepEqual(lists.at(-1), [2]);
  sockets[0].receive({ op: "event", stream: "project:1", eventId: "x", type: "v1:presence.left", data: { user: { id: 2 }, reason: "disconnect" } });
  assert.deepEqual(lists.at(-1), []);
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
  const make = (more = {}) =>
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
      ...more,
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
  // The new leader's socket never opens here: no connectTimeout within the test's minute.
  const { make, sockets, timers } = tabs({ leaderWait: 3000, connectTimeout: 1e9 });
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

// -- a subscription's `ready` --------------------------------------------------------------

/** Follow a promise's outcome without awaiting it: {state, value, error}. */
function watch(promise) {
  const w = { state: "pending" };
  promise.then(
    (value) => Object.assign(w, { state: "resolved", value }),
    (error) => Object.assign(w, { state: "rejected", error }),
  );
  return w;
}

const ok = (socket, frame, data = { seq: 0, epoch: "e", recovered: false }) =>
  socket.receive({ op: "reply", ref: frame.ref, ok: true, data });
const refuse = (socket, frame, code) =>
  socket.receive({ op: "reply", ref: frame.ref, ok: false, error: { code, message: `refused: ${code}` } });
const sentOf = (socket, op, stream) => socket.sent.filter((f) => f.op === op && (!stream || f.stream === stream));

test("ready of a subscribe made before the welcome settles with the first reply, however many sockets it takes", async () => {
  const { c, timers, sockets } = client();
  c.connect();
  await flush();
  const ready = watch(c.subscribe("project:1", { onEvent() {} }).ready); // as the bell does at page load
  sockets[0].open();
  assert.equal(sentOf(sockets[0], "subscribe").length, 1);
  sockets[0].fail(); // no reply on this socket
  await timers.tick(1000);
  sockets[1].open();
  await settle();
  assert.equal(ready.state, "pending");
  ok(sockets[1], sockets[1].last("subscribe"), { seq: 3, epoch: "e", recovered: false });
  await settle();
  assert.equal(ready.state, "resolved");
  assert.equal(ready.value.seq, 3);
  const later = watch(c.subscribe("project:1", {}).ready); // the stream is live: ready at once
  await settle();
  assert.equal(later.state, "resolved");
  assert.equal(c.replies.size, 0); // nothing left waiting for a reply that cannot come
  c.close();
});

test("ready rejects when the client is closed, the subscription is refused, or the handle unsubscribes first", async () => {
  {
    const { c, sockets } = client();
    c.connect();
    await flush();
    sockets[0].open();
    const ready = watch(c.subscribe("project:1", {}).ready);
    sockets[0].fail(); // the reply is lost with the socket; then the page closes the client
    c.close();
    await settle();
    assert.equal(ready.state, "rejected");
    assert.equal(ready.error.code, "closed");
  }
  {
    const { c, sockets, errors } = client();
    c.connect();
    await flush();
    sockets[0].open();
    const ready = watch(c.subscribe("project:9", {}).ready);
    refuse(sockets[0], sockets[0].last("subscribe"), "forbidden");
    await settle();
    assert.equal(ready.state, "rejected");
    assert.equal(ready.error.code, "forbidden");
    assert.equal(errors.at(-1).code, "forbidden");
    const second = watch(c.subscribe("project:9", {}).ready); // refused already: no new frame
    await settle();
    assert.equal(second.error.code, "forbidden");
    assert.equal(sentOf(sockets[0], "subscribe").length, 1);
    c.close();
  }
  {
    const { c, sockets } = client();
    c.connect();
    await flush();
    const sub = c.subscribe("project:1", {});
    const ready = watch(sub.ready);
    sub.unsubscribe();
    await settle();
    assert.equal(ready.error.code, "unsubscribed");
    sockets[0].open();
    assert.equal(sentOf(sockets[0], "subscribe").length, 0);
    c.close();
  }
});

test("ready of a follower's subscribe made before it heard the leader settles with the leader's reply", async () => {
  const { make, sockets } = tabs();
  const leader = make().connect();
  await settle();
  const follower = make().connect();
  const ready = watch(follower.subscribe("project:1", { onEvent() {} }).ready); // no leader known yet
  await settle();
  sockets[0].open();
  await settle();
  const sub = sockets[0].last("subscribe");
  assert.equal(sub.stream, "project:1");
  ok(sockets[0], sub, { seq: 4, epoch: "e", recovered: false });
  await settle();
  assert.equal(ready.state, "resolved");
  assert.equal(ready.value.seq, 4);
  follower.close();
  leader.close();
});

test("ready of a subscribe waiting for a socket resolves when the client falls back to SSE", async () => {
  const { c, sockets } = client({ wsAttempts: 1, fetch: () => new Promise(() => {}) });
  const ready = watch(c.subscribe("project:1", {}).ready);
  c.connect();
  await flush();
  sockets[0].fail();
  await settle();
  assert.equal(c.status, STATUS.SSE);
  assert.equal(ready.state, "resolved");
  c.close();
});

// -- a leader that stops answering -----------------------------------------------------------

test("a leader heard and then frozen: its follower probes, takes the lock after leaderWait + leaderWait/3; the old leader steps down", async () => {
  const { make, sockets, timers } = tabs({ leaderWait: 3000 });
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  sockets[0].open();
  await settle();
  const seen = [];
  follower.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  await settle();
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 4, epoch: "e", recovered: false });
  sockets[0].receive(event(5));
  await settle();
  assert.deepEqual(seen, [5]);
  await timers.tick(10000); // the leader's heartbeat (every leaderWait / 3) keeps it
  await settle();
  assert.equal(follower.role, "follower");
  assert.equal(sockets.length, 1);
  // The leader freezes just after a heartbeat: it neither hears nor says anything now.
  const post = leader.channel.postMessage;
  leader.channel.postMessage = () => {};
  leader.channel.deaf = true;
  await timers.tick(3999); // leaderWait of silence, then a probe nobody answers
  await settle();
  assert.equal(follower.role, "follower");
  await timers.tick(1);
  await settle();
  assert.equal(follower.role, "leader");
  assert.equal(sockets.length, 2);
  assert.equal(leader.role, "follower"); // its lock was stolen: it stepped down
  assert.equal(sockets[0].readyState, 3);
  sockets[1].open();
  await settle();
  assert.equal(sockets[1].last("subscribe").since, 5); // the follower resumes where it was
  // The old leader thaws: it hears the new leader and follows it, without stealing back.
  leader.channel.postMessage = post;
  leader.channel.deaf = false;
  await timers.tick(30000); // (within the socket's watchdog: no server frame comes here)
  await settle();
  assert.equal(leader.role, "follower");
  assert.equal(leader.leaderId, follower.tabId);
  assert.equal(follower.role, "leader");
  assert.equal(sockets.length, 2);
  leader.close();
  follower.close();
});

test("a healthy leader whose timers are held up (a hidden tab) is not stolen from: it answers the probe", async () => {
  const { make, sockets, timers } = tabs({ leaderWait: 3000 });
  const held = new FakeTimers(); // never ticked: the leader sends no heartbeat at all
  const leader = make({ setTimeout: held.setTimeout, clearTimeout: held.clearTimeout }).connect();
  const follower = make().connect();
  await settle();
  sockets[0].open();
  await settle();
  let probes = 0;
  const post = follower.channel.postMessage.bind(follower.channel);
  follower.channel.postMessage = (m) => (m.kind === "probe" && (probes += 1), post(m));
  await timers.tick(60000);
  await settle();
  assert.equal(follower.role, "follower");
  assert.equal(leader.role, "leader");
  assert.equal(sockets.length, 1);
  assert.ok(probes >= 10 && probes <= 20, `probes: ${probes}`); // one per leaderWait of silence
  leader.close();
  follower.close();
});

test("a leader busy for less than leaderWait + leaderWait/3 keeps its followers", async () => {
  const { make, sockets, timers } = tabs({ leaderWait: 3000 });
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  sockets[0].open();
  await timers.tick(10000);
  await settle();
  // A long task in the leader's tab: what it sends and what reaches it waits until it ends.
  const out = [];
  const incoming = [];
  const post = leader.channel.postMessage;
  const hear = leader.channel.onmessage;
  leader.channel.postMessage = (m) => out.push(m);
  leader.channel.onmessage = (m) => incoming.push(m);
  await timers.tick(3900); // silent for leaderWait, probed, and still within the probe's wait
  leader.channel.postMessage = post;
  leader.channel.onmessage = hear;
  for (const m of incoming) hear(m);
  for (const m of out) post.call(leader.channel, m);
  await settle();
  await timers.tick(30000);
  await settle();
  assert.equal(follower.role, "follower");
  assert.equal(leader.role, "leader");
  assert.equal(sockets.length, 1);
  leader.close();
  follower.close();
});

// -- rate-limited subscribes -------------------------------------------------------------------

test("a subscribe refused with rate_limited is retried with backoff and jitter until it succeeds", async () => {
  const { c, timers, sockets, errors } = client({ random: () => 0.5 });
  c.connect();
  await flush();
  sockets[0].open();
  const seen = [];
  const ready = watch(c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) }).ready);
  refuse(sockets[0], sockets[0].last("subscribe"), "rate_limited");
  await settle();
  assert.equal(ready.state, "pending");
  assert.deepEqual(errors, []); // retried, so not an error for the page
  // random() = 0.5: half way between c/2 and c, c = min(30 s, 1 s * 2^n)
  const delays = [750, 1500, 3000, 6000, 12000, 22500, 22500];
  for (const [n, delay] of delays.entries()) {
    await timers.tick(delay - 1);
    assert.equal(sentOf(sockets[0], "subscribe").length, n + 1, `before retry ${n}`);
    await timers.tick(1);
    assert.equal(sentOf(sockets[0], "subscribe").length, n + 2, `retry ${n} after ${delay} ms`);
    if (n < delays.length - 1) refuse(sockets[0], sockets[0].last("subscribe"), "rate_limited");
    await settle();
  }
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 2, epoch: "e", recovered: false });
  await settle();
  assert.equal(ready.state, "resolved");
  sockets[0].receive(event(3));
  assert.deepEqual(seen, [3]);
  await timers.tick(60000);
  assert.equal(sentOf(sockets[0], "subscribe").length, 8); // no retry after success
  c.close();
});

test("a rate-limited retry ends when refused with another code, or when the stream is unsubscribed", async () => {
  {
    const { c, timers, sockets, errors } = client();
    c.connect();
    await flush();
    sockets[0].open();
    const ready = watch(c.subscribe("project:1", {}).ready);
    refuse(sockets[0], sockets[0].last("subscribe"), "rate_limited");
    await settle();
    await timers.tick(750);
    refuse(sockets[0], sockets[0].last("subscribe"), "forbidden");
    await settle();
    assert.equal(ready.error.code, "forbidden");
    assert.deepEqual(errors.map((e) => e.code), ["forbidden"]);
    await timers.tick(120000);
    assert.equal(sentOf(sockets[0], "subscribe").length, 2); // final, as any other refusal
    c.close();
  }
  {
    const { c, timers, sockets } = client();
    c.connect();
    await flush();
    sockets[0].open();
    const sub = c.subscribe("project:1", {});
    const ready = watch(sub.ready);
    refuse(sockets[0], sockets[0].last("subscribe"), "rate_limited");
    await settle();
    sub.unsubscribe();
    await timers.tick(120000);
    await settle();
    assert.equal(ready.error.code, "unsubscribed");
    assert.equal(sentOf(sockets[0], "subscribe").length, 1); // not retried
    assert.equal(sentOf(sockets[0], "unsubscribe").length, 0); // the server never had it
    c.close();
  }
});

test("rate-limited subscribes are retried one at a time, later ones wait behind them, and a reconnect sends all", async () => {
  const { c, timers, sockets } = client({ wsAttempts: 100, random: () => 0.5 });
  c.connect();
  await flush();
  sockets[0].open();
  const streams = ["project:1", "project:2", "project:3"];
  const readies = streams.map((s) => watch(c.subscribe(s, {}).ready));
  for (const s of streams) refuse(sockets[0], sentOf(sockets[0], "subscribe", s)[0], "rate_limited");
  await settle();
  const fourth = watch(c.subscribe("project:4", {}).ready); // behind the refused ones
  assert.equal(sentOf(sockets[0], "subscribe").length, 3);
  await timers.tick(750);
  assert.deepEqual(sockets[0].sent.slice(3).map((f) => f.stream), ["project:1"]); // one retry, not three
  ok(sockets[0], sockets[0].sent.at(-1));
  await settle(); // the bucket had a token: the next one goes at once
  assert.deepEqual(sockets[0].sent.slice(3).map((f) => f.stream), ["project:1", "project:2"]);
  refuse(sockets[0], sockets[0].sent.at(-1), "rate_limited");
  await settle();
  await timers.tick(1499);
  assert.equal(sockets[0].sent.length, 5);
  await timers.tick(1);
  assert.equal(sockets[0].sent.at(-1).stream, "project:2");
  // The socket drops while project:3 and project:4 wait: the next one sends every subscribe.
  sockets[0].fail();
  await timers.tick(1000);
  sockets[1].open();
  assert.deepEqual(sentOf(sockets[1], "subscribe").map((f) => f.stream).sort(), [...streams, "project:4"]);
  for (const f of sentOf(sockets[1], "subscribe")) ok(sockets[1], f);
  await settle();
  assert.deepEqual([...readies, fourth].map((r) => r.state), ["resolved", "resolved", "resolved", "resolved"]);
  await timers.tick(120000);
  assert.equal(sentOf(sockets[1], "subscribe").length, 4); // no old retry fires on the new socket
  assert.equal(sentOf(sockets[0], "subscribe").length, 6);
  c.close();
});

test("a rate-limited unsubscribe is retried, and a new subscribe of the stream waits behind it", async () => {
  const { c, timers, sockets } = client();
  c.connect();
  await flush();
  sockets[0].open();
  const sub = c.subscribe("project:1", {});
  ok(sockets[0], sockets[0].last("subscribe"));
  await settle();
  sub.unsubscribe();
  const unsub = sockets[0].last("unsubscribe");
  assert.equal(unsub.stream, "project:1");
  refuse(sockets[0], unsub, "rate_limited"); // the server still sends its events
  await settle();
  const again = watch(c.subscribe("project:1", {}).ready);
  assert.equal(sentOf(sockets[0], "subscribe").length, 1); // it would meet already_subscribed
  await timers.tick(750);
  assert.equal(sockets[0].sent.at(-1).op, "unsubscribe");
  ok(sockets[0], sockets[0].sent.at(-1), {});
  await settle();
  assert.equal(sockets[0].sent.at(-1).op, "subscribe");
  ok(sockets[0], sockets[0].sent.at(-1));
  await settle();
  assert.equal(again.state, "resolved");
  c.close();
});

test("a leader's rate-limited subscribe keeps the follower waiting, then answers it; no error in the follower", async () => {
  const { make, sockets, timers } = tabs();
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  sockets[0].open();
  await settle();
  const errors = [];
  follower.on("error", (e) => errors.push(e.code));
  const ready = watch(follower.subscribe("project:1", {}).ready);
  await settle();
  refuse(sockets[0], sockets[0].last("subscribe"), "rate_limited");
  await settle();
  assert.equal(ready.state, "pending");
  await timers.tick(750);
  await settle();
  assert.equal(sentOf(sockets[0], "subscribe").length, 2);
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 7, epoch: "e", recovered: false });
  await settle();
  assert.equal(ready.state, "resolved");
  assert.deepEqual(errors, []);
  follower.close();
  leader.close();
});

test("a tab that leaves does not unsubscribe a stream another tab, or the leader's page, still follows", async () => {
  const { make, sockets } = tabs();
  const leader = make().connect();
  const one = make().connect();
  const two = make().connect();
  await settle();
  sockets[0].open();
  await settle();
  const own = leader.subscribe("project:1", {}); // the leader's page: no handler, it listens with on("event")
  const a = one.subscribe("project:1", { onEvent() {} });
  two.subscribe("project:1", { onEvent() {} });
  await settle();
  assert.equal(sentOf(sockets[0], "subscribe").length, 1); // one subscription for three tabs
  ok(sockets[0], sockets[0].last("subscribe"));
  await settle();
  a.unsubscribe();
  await settle();
  two.close(); // says bye
  await settle();
  assert.equal(sentOf(sockets[0], "unsubscribe").length, 0);
  own.unsubscribe();
  await settle();
  assert.equal(sentOf(sockets[0], "unsubscribe").length, 1); // the last one that used it left
  leader.close();
  one.close();
});

test("unsubscribe is idempotent: a stale handle cannot drop a later subscription of its stream", async () => {
  const { c, sockets } = client();
  c.connect();
  await flush();
  sockets[0].open();
  const first = c.subscribe("project:1", { onEvent() {} });
  ok(sockets[0], sockets[0].last("subscribe"));
  await settle();
  first.unsubscribe();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 1, epoch: "e", recovered: false });
  await settle();
  first.unsubscribe(); // again
  assert.equal(sentOf(sockets[0], "unsubscribe").length, 1);
  sockets[0].receive(event(2));
  assert.deepEqual(seen, [2]);
  c.close();
});

// -- resets, gap fills and fallbacks: what each tab and transport is told --------------------

const feedAnswer = (body) => ({ ok: true, status: 200, headers: { get: () => '"t"' }, json: async () => ({ resets: [], cursor: "x", ...body }) });
const cursorOf = (url) => {
  const token = new URL(url).searchParams.get("cursor");
  return token === null ? null : JSON.parse(Buffer.from(token, "base64url").toString());
};

test("a leader's recovered:false reaches its followers, which go on from the server's position", async () => {
  const feed = [];
  const fetch = async (url) => {
    feed.push(cursorOf(url));
    return feedAnswer({ events: [] });
  };
  const { make, sockets, timers } = tabs({ fetch });
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  sockets[0].open();
  await settle();
  const seen = [];
  const resets = [];
  follower.subscribe("project:1", { onEvent: (f) => seen.push(f.seq), onReset: (r) => resets.push(r.seq) });
  await settle();
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 100, epoch: "e", recovered: false });
  await settle();
  sockets[0].receive(event(101));
  await settle();
  sockets[0].fail(); // offline for long: the log no longer holds 102 on
  await timers.tick(1000);
  sockets[1].open();
  await settle();
  assert.equal(sockets[1].last("subscribe").since, 101);
  ok(sockets[1], sockets[1].last("subscribe"), { seq: 5000, epoch: "e", recovered: false });
  await settle();
  for (const seq of [5001, 5002]) sockets[1].receive(event(seq));
  await settle();
  await timers.tick(5000);
  assert.deepEqual(resets, [5000]); // told once, with the server's position
  assert.deepEqual(seen, [101, 5001, 5002]);
  assert.deepEqual(feed, []); // no gap to fill
  leader.close();
  follower.close();
});

test("a leader on SSE passes a reset to its followers", async () => {
  let push;
  const body = { getReader: () => ({ read: () => new Promise((resolve) => (push = resolve)) }) };
  const fetch = async (url) => (new URL(url).pathname === "/realtime/sse/" ? { ok: true, status: 200, body } : feedAnswer({ events: [] }));
  const { make, sockets } = tabs({ fetch, wsAttempts: 1 });
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  const resets = [];
  follower.subscribe("project:1", { since: 7, onReset: (r) => resets.push(r) });
  sockets[0].fail();
  await settle();
  assert.equal(leader.transport, "sse");
  const reset = { op: "reset", stream: "project:1", seq: 900, epoch: "e2" };
  push({ value: new TextEncoder().encode(`event: reset\ndata: ${JSON.stringify(reset)}\n\n`), done: false });
  await settle();
  assert.deepEqual(resets, [{ stream: "project:1", seq: 900, epoch: "e2" }]);
  assert.equal(follower.streams.get("project:1").order.seq, 900);
  leader.close();
  follower.close();
});

test("a gap fill the log no longer covers resets to the server's position, and later events flow", async () => {
  const feed = [];
  const fetch = async (url) => {
    feed.push(cursorOf(url));
    return feedAnswer({ events: [], resets: [{ op: "reset", stream: "project:1", epoch: "e", seq: 5000 }] });
  };
  const resets = [];
  const { c, timers, sockets } = client({ fetch, onReset: (r) => resets.push(r.seq) });
  c.connect();
  await flush();
  sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { since: 100, onEvent: (f) => seen.push(f.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 100, epoch: "e", recovered: true });
  await settle();
  sockets[0].receive(event(5001)); // 101..5000 are gone from the log
  await timers.tick(1000);
  await settle();
  assert.deepEqual(resets, [5000]);
  sockets[0].receive(event(5002));
  sockets[0].receive(event(5003));
  await timers.tick(5000);
  assert.deepEqual(seen, [5001, 5002, 5003]); // what waited past the new position, then the rest
  assert.deepEqual(resets, [5000]);
  assert.equal(feed.length, 1);
  c.close();
});

test("on a fallback a stream with no known position is left out of the cursor: the server starts it now", async () => {
  const log = [1, 2, 3, 4, 5].map((seq) => event(seq)); // in the log before the page loaded
  const cursors = [];
  const fetch = async (url) => {
    const u = new URL(url);
    if (u.pathname === "/realtime/sse/") {
      cursors.push({ sse: cursorOf(url) });
      return { ok: false, status: 502, body: null, headers: { get: () => null } };
    }
    cursors.push(cursorOf(url));
    const at = cursorOf(url)?.["project:1"];
    const events = at ? log.filter((e) => e.seq > at[0]) : [];
    return feedAnswer({ events, cursor: encodeCursor({ "project:1": [at ? Math.max(at[0], 5) : 5, "e"] }) });
  };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1, sseAttempts: 1 });
  c.connect();
  await flush();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) }); // "from now", as the dashboard does
  sockets[0].fail();
  await settle();
  assert.equal(c.status, STATUS.POLLING);
  assert.deepEqual(cursors.slice(0, 2), [{ sse: null }, null]); // SSE, then the first poll
  assert.deepEqual(seen, []);
  await timers.tick(250); // the next poll goes on from the position the feed answered with
  assert.deepEqual(cursors.at(-1), { "project:1": [5, "e"] });
  log.push(event(6));
  await timers.tick(250);
  assert.deepEqual(seen, [6]);
  c.close();
});

test("on SSE a stream with no known position takes the one the server starts it at, so a reconnect misses nothing", async () => {
  const cursors = [];
  const pushes = [];
  const fetch = async (url) => {
    const u = new URL(url);
    if (u.pathname !== "/realtime/sse/") return feedAnswer({ events: [] });
    cursors.push(cursorOf(url));
    let push;
    const body = { getReader: () => ({ read: () => new Promise((resolve) => (push = resolve)) }) };
    pushes.push((text, done = false) => push(done ? { done: true } : { value: new TextEncoder().encode(text), done: false }));
    return { ok: true, status: 200, body };
  };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1 });
  c.connect();
  await flush();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) }); // "from now"
  sockets[0].fail();
  await settle();
  assert.equal(c.transport, "sse");
  assert.deepEqual(cursors, [null]);
  pushes[0](`retry: 3000\n\nid: ${encodeCursor({ "project:1": [41, "e"] })}\n\n`);
  await settle();
  assert.equal(c.streams.get("project:1").order.seq, 41);
  pushes[0]("", true); // the stream ends before any event
  await settle();
  await timers.tick(5000);
  await settle();
  assert.deepEqual(cursors.at(-1), { "project:1": [41, "e"] }); // not "now" again
  pushes.at(-1)(`event: v1:item.updated\ndata: ${JSON.stringify(event(42))}\n\n`);
  await settle();
  assert.deepEqual(seen, [42]);
  c.close();
});

test("a follower of a leader on a fallback, with no position yet, reads no history from the feed", async () => {
  const feed = [];
  const fetch = async (url) => {
    if (new URL(url).pathname === "/realtime/sse/") return new Promise(() => {}); // SSE open, quiet
    feed.push(cursorOf(url));
    return feedAnswer({ events: [] });
  };
  const { make, sockets, timers } = tabs({ fetch, wsAttempts: 1 });
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  sockets[0].fail();
  await settle();
  assert.equal(leader.transport, "sse");
  const seen = [];
  const sub = watch(follower.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) }).ready);
  await settle();
  assert.equal(sub.state, "resolved");
  assert.equal(sub.value.seq, null); // not 0: the leader knows no position either
  leader._event(event(120)); // the first event of the (restarted) SSE stream
  await settle();
  await timers.tick(5000);
  assert.deepEqual(seen, [120]);
  assert.deepEqual(feed, []);
  leader.close();
  follower.close();
});

test("a failed ticket request is retried with backoff, never a connect without a ticket; a 401 ends", async () => {
  let status = 201;
  const fetch = async () => ({ ok: status < 300, status, headers: { get: () => null }, json: async () => ({ ticket: "T" }) });
  const { c, timers, sockets, errors } = client({ fetch, ticketUrl: "http://testserver/api/realtime/tickets/" });
  c.connect();
  await settle();
  sockets[0].open();
  status = 503; // a deploy
  sockets[0].fail(1001);
  await timers.tick(1000);
  await settle();
  assert.equal(sockets.length, 1); // no socket without a ticket
  assert.equal(c.status, STATUS.RECONNECTING);
  status = 201;
  await timers.tick(2000);
  await settle();
  assert.equal(sockets.length, 2);
  assert.equal(new URL(sockets[1].url).searchParams.get("ticket"), "T");
  assert.deepEqual(errors, []);
  status = 401; // logged out: as 4401
  sockets[1].fail(1006);
  await timers.tick(30000);
  await settle();
  assert.equal(sockets.length, 2);
  assert.equal(c.status, STATUS.OFFLINE);
  assert.equal(errors[0].code, "unauthenticated");
  c.close();
});

test("an early event dropped with the buffer by a reset is delivered when a resume replays it", async () => {
  const fetch = () => new Promise(() => {}); // the gap fill never answers: the reset comes first
  const { c, timers, sockets } = client({ fetch, onReset() {} });
  c.connect();
  await flush();
  sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false });
  await settle();
  sockets[0].receive(event(5)); // 4 lost; 5 waits
  sockets[0].receive({ op: "reset", stream: "project:1", seq: 3, epoch: "e" }); // reset at 3, 5 dropped
  await settle();
  sockets[0].fail();
  await timers.tick(1000);
  sockets[1].open();
  assert.equal(sockets[1].last("subscribe").since, 3);
  ok(sockets[1], sockets[1].last("subscribe"), { seq: 5, epoch: "e", recovered: true });
  sockets[1].receive(event(4));
  sockets[1].receive(event(5));
  await timers.tick(5000);
  assert.deepEqual(seen, [4, 5]);
  c.close();
});

test("past a full buffer one gap fill runs per stream, page by page, and delivers every event once", async () => {
  let requests = 0;
  let inFlight = 0;
  let peak = 0;
  const fetch = async (url) => {
    requests += 1;
    peak = Math.max(peak, ++inFlight);
    await flush();
    inFlight -= 1;
    const from = cursorOf(url)["project:1"][0];
    return feedAnswer({ events: Array.from({ length: 500 }, (_, i) => event(from + 1 + i)).filter((e) => e.seq <= 1204) });
  };
  const { c, timers, sockets } = client({ fetch });
  c.connect();
  await flush();
  sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false });
  await settle();
  for (let seq = 5; seq <= 1204; seq++) sockets[0].receive(event(seq)); // 4 lost; 200 past the buffer
  for (let i = 0; i < 5; i++) await settle();
  await timers.tick(5000);
  assert.equal(peak, 1);
  assert.equal(requests, 2); // 4..503 (the buffer holds up to 1004), then 1005..1204
  assert.equal(seen.length, 1201);
  assert.deepEqual([seen[0], seen.at(-1)], [4, 1204]);
  c.close();
});

test("a long poll left behind by the WebSocket, or by close(), is aborted and changes nothing", async () => {
  const polls = [];
  const fetch = (url, init = {}) => {
    if (new URL(url).pathname === "/realtime/sse/") return Promise.resolve({ ok: false, status: 502, body: null, headers: { get: () => null } });
    return new Promise((_, reject) => {
      polls.push(init.signal);
      init.signal?.addEventListener("abort", () => reject(Object.assign(new Error("aborted"), { name: "AbortError" })));
      if (!init.signal) polls.reject = reject;
    });
  };
  const { c, timers, sockets, statuses } = client({ fetch, wsAttempts: 1, sseAttempts: 1 });
  c.subscribe("project:1", {});
  c.connect();
  await settle();
  sockets[0].fail();
  await settle();
  assert.equal(c.status, STATUS.POLLING);
  await timers.tick(30000); // the probe
  sockets.at(-1).open();
  await settle();
  polls.reject?.(new TypeError("network changed")); // without a signal, it fails late instead
  await settle();
  assert.ok(polls.at(-1)?.aborted);
  assert.equal(c.status, STATUS.OPEN);
  assert.equal(statuses.at(-1).status, STATUS.OPEN);
  assert.equal(c.pollTimer, null);
  c.close();

  const again = client({ fetch, wsAttempts: 1, sseAttempts: 1 });
  again.c.subscribe("project:1", {});
  again.c.connect();
  await settle();
  again.sockets[0].fail();
  await settle();
  assert.equal(again.c.status, STATUS.POLLING);
  again.c.close();
  polls.reject?.(new TypeError("network changed"));
  await settle();
  assert.ok(polls.at(-1)?.aborted);
  assert.equal(again.c.status, STATUS.OFFLINE);
  assert.equal(again.statuses.at(-1).status, STATUS.OFFLINE);
  assert.equal(again.timers.queue.size, 0);
});

test("a probe still connecting when its fallback stops is closed: one socket at a time", async () => {
  let failSSE;
  const fetch = (url) => new URL(url).pathname === "/realtime/sse/"
    ? new Promise((_, reject) => (failSSE = reject)) // SSE hangs: the server is down
    : Promise.reject(new TypeError("Failed to fetch"));
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1, probeEvery: 30000 });
  c.subscribe("project:1", {});
  c.connect();
  await settle();
  sockets[0].fail();
  await settle();
  await timers.tick(30000); // the probe
  const probe = sockets[1];
  failSSE(new TypeError("Failed to fetch")); // no answer from the feed either: retry the WebSocket
  await settle();
  assert.equal(probe.readyState, 3); // closed with the fallback
  await timers.tick(5000); // the retry's backoff (not its connectTimeout: it would fail)
  const retry = sockets[2];
  retry.open();
  probe.open(); // a late open of the old probe is ignored
  await settle();
  assert.equal(c.socket, retry);
  assert.equal(sockets.filter((s) => s.readyState === 1 && s.onmessage).length, 1);
  retry.receive({ op: "ping" });
  assert.equal(sentOf(retry, "pong").length, 1);
  c.close();
});

test("a follower that crashed without bye loses its streams at the leader's next roll call; a live one keeps them", async () => {
  const { make, sockets, timers } = tabs({ tabCheck: 30000 });
  const leader = make().connect();
  const crashed = make().connect();
  const alive = make().connect();
  await settle();
  sockets[0].open();
  await settle();
  crashed.subscribe("project:1", {});
  alive.subscribe("project:2", {});
  await settle();
  for (const stream of ["project:1", "project:2"]) {
    const sub = sentOf(sockets[0], "subscribe", stream).at(-1);
    sockets[0].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 3, epoch: "e", recovered: true } });
  }
  await settle();
  crashed.closed = true; // gone without pagehide: no bye, no answer, no timers
  crashed.channel.deaf = true;
  await timers.tick(30000 + 3000);
  await settle();
  assert.deepEqual(sentOf(sockets[0], "unsubscribe").map((f) => f.stream), ["project:1"]);
  assert.ok(leader.streams.has("project:2"));
  assert.ok(!leader.streams.has("project:1"));
  await timers.tick(33000); // the next roll call: the live follower answers again
  assert.deepEqual(sentOf(sockets[0], "unsubscribe").map((f) => f.stream), ["project:1"]);
  leader.close();
  alive.close();
});

test("a follower frozen through a roll call subscribes again from its position when it wakes", async () => {
  const { make, sockets, timers } = tabs({ tabCheck: 30000 });
  const leader = make().connect();
  const frozen = make().connect();
  await settle();
  sockets[0].open();
  await settle();
  const seen = [];
  frozen.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  await settle();
  const sub = sentOf(sockets[0], "subscribe", "project:1").at(-1);
  sockets[0].receive({ op: "reply", ref: sub.ref, ok: true, data: { seq: 3, epoch: "e", recovered: true } });
  await settle();
  sockets[0].receive(event(4));
  await settle();
  assert.deepEqual(seen, [4]);
  frozen.closed = true; // frozen: runs nothing, hears nothing
  frozen.channel.deaf = true;
  await timers.tick(33000);
  const unsub = sockets[0].last("unsubscribe");
  assert.equal(unsub.stream, "project:1");
  sockets[0].receive({ op: "reply", ref: unsub.ref, ok: true });
  frozen.closed = false; // it wakes, and answers the next roll call
  frozen.channel.deaf = false;
  await timers.tick(30000);
  await settle();
  const again = sentOf(sockets[0], "subscribe", "project:1").at(-1);
  assert.notEqual(again.ref, sub.ref);
  assert.equal(again.since, 4); // from where the woken tab was
  sockets[0].receive({ op: "reply", ref: again.ref, ok: true, data: { seq: 4, epoch: "e", recovered: true } });
  sockets[0].receive(event(5));
  await settle();
  assert.deepEqual(seen, [4, 5]);
  leader.close();
  frozen.close();
});

// -- handler errors, fallback limits, ending and pacing ----------------------------------------

/** A fetch body whose one chunk is `text`; then the stream ends, or (end false) stays open. */
const sseBody = (text, end = true) => {
  let sent = false;
  return { getReader: () => ({ read: async () => {
    if (!sent) { sent = true; return { value: new TextEncoder().encode(text), done: false }; }
    return end ? { done: true } : new Promise(() => {});
  } }) };
};

test("an exception in onEvent is reported and does not lose the events reordered after it", async () => {
  const { c, sockets, reported } = client();
  c.connect(); await flush(); sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => { seen.push(f.seq); if (f.seq === 4) throw new Error("app bug"); } });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false });
  await settle();
  sockets[0].receive(event(5));
  try { sockets[0].receive(event(4)); } catch (_) {}
  sockets[0].receive(event(6));
  assert.deepEqual(seen, [4, 5, 6]);
  assert.deepEqual(reported.map((e) => e.message), ["app bug"]);
  c.close();
});

test("an exception in onEvent during a gap fill neither resets the stream nor loses the rest", async () => {
  const fetch = async () => feedAnswer({ events: [event(4), event(5)] });
  const resets = [];
  const { c, timers, sockets, reported } = client({ fetch });
  c.connect(); await flush(); sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => { seen.push(f.seq); if (f.seq === 4) throw new Error("app bug"); }, onReset: (r) => resets.push(r) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false });
  await settle();
  sockets[0].receive(event(6));
  await timers.tick(1000); await settle();
  assert.deepEqual(resets, []);
  assert.deepEqual(seen, [4, 5, 6]);
  assert.equal(reported.length, 1);
  c.close();
});

test("an exception in onPresence still settles ready and lets the next subscribe go out", async () => {
  const { c, timers, sockets, reported } = client();
  c.connect(); await flush(); sockets[0].open();
  const ready = watch(c.subscribe("project:1", { onPresence: () => { throw new Error("app bug"); } }).ready);
  refuse(sockets[0], sockets[0].last("subscribe"), "rate_limited");
  await settle(); await timers.tick(750);
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 0, epoch: null, recovered: false, presence: [] });
  await settle();
  c.subscribe("project:2", {});
  await timers.tick(40000); await settle();
  assert.equal(sentOf(sockets[0], "subscribe", "project:2").length, 1);
  assert.equal(ready.state, "resolved");
  assert.equal(reported.length, 1);
  c.close();
});

test("a refused stream is left out of the fallback's streams, so the others still flow", async () => {
  const urls = [];
  const fetch = async (url) => { urls.push(new URL(url)); return new Promise(() => {}); };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1 });
  c.connect(); await flush(); sockets[0].open();
  c.subscribe("project:1", {}); c.subscribe("project:9", {});
  ok(sockets[0], sentOf(sockets[0], "subscribe", "project:1")[0]);
  refuse(sockets[0], sentOf(sockets[0], "subscribe", "project:9")[0], "forbidden");
  await settle();
  sockets[0].fail(); await timers.tick(1000); sockets[1].fail(); await settle();
  assert.equal(c.transport, "sse");
  assert.deepEqual(urls[0].searchParams.get("streams").split(","), ["project:1"]);
  assert.deepEqual(Object.keys(cursorOf(urls[0])), ["project:1"]);
  c.close();
});

test("an SSE stream the server ends with retry: and rate_limited waits the retry", async () => {
  let sse = 0;
  const fetch = async (url) => {
    if (new URL(url).pathname !== "/realtime/sse/") return feedAnswer({ events: [] });
    sse += 1;
    return { ok: true, status: 200, body: sseBody('retry: 30000\n\nevent: rate_limited\ndata: {"op":"error","error":{"code":"rate_limited","message":"x"}}\n\n') };
  };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1, probeEvery: 1e9 });
  c.subscribe("project:1", {}); c.connect(); await flush();
  sockets[0].fail(); await settle();
  await timers.tick(60000); await settle();
  assert.ok(sse <= 3, `SSE requests in 60 s: ${sse}`);
  assert.equal(c.transport, "sse"); // a rate limit is no reason to poll
  c.close();
});

test("an SSE request after a stream that opened says it reconnects (?reconnect=1); the first does not", async () => {
  const urls = [];
  const fetch = async (url) => {
    if (new URL(url).pathname !== "/realtime/sse/") return feedAnswer({ events: [] });
    urls.push(new URL(url));
    return { ok: true, status: 200, body: sseBody("retry: 1000\n\n") }; // ends: the client comes back
  };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1, probeEvery: 1e9 });
  c.subscribe("project:1", {}); c.connect(); await flush();
  sockets[0].fail(); await settle(); // never welcomed: the first SSE request is no reconnect
  await timers.tick(5000); await settle();
  assert.ok(urls.length >= 2, `SSE requests: ${urls.length}`);
  assert.deepEqual(urls.map((u) => u.searchParams.get("reconnect")), [null, ...urls.slice(1).map(() => "1")]);
  c.close();
});

test("publish after the client ended (4401) rejects at once with closed", async () => {
  const { c, timers, sockets } = client();
  c.connect(); await flush(); sockets[0].open(); sockets[0].fail(4401);
  const p = watch(c.publish("project:1", "v1:typing.started", {}));
  await timers.tick(600000); await settle();
  assert.equal(p.state, "rejected");
  assert.equal(p.error.code, "closed");
});

test("connect() after close() starts again with no failures counted", async () => {
  const { c, timers, sockets } = client({ fetch: async () => new Promise(() => {}), wsAttempts: 3 });
  c.subscribe("project:1", {}); c.connect(); await flush();
  for (let i = 0; i < 3; i++) { sockets.at(-1).fail(); await timers.tick(5000); await settle(); }
  c.close(); c.connect(); await flush(); sockets.at(-1).fail(); await settle();
  assert.notEqual(c.transport, "sse");
  c.close();
});

test("a server that goes down after SSE worked is reconnected to, not taken for a blocked SSE", async () => {
  let up = true;
  const fetch = async (url) => { if (!up) throw new TypeError("Failed to fetch");
    if (new URL(url).pathname !== "/realtime/sse/") return feedAnswer({ events: [] });
    return { ok: true, status: 200, body: sseBody(": hb\n\n") }; };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1, sseAttempts: 2, probeEvery: 1e9 });
  c.subscribe("project:1", {}); c.connect(); await flush();
  sockets[0].fail(); await settle();
  up = false;
  await timers.tick(5000); await settle();
  assert.notEqual(c.status, STATUS.POLLING);
  c.close();
});

test("a 401 from SSE or the feed ends the client as 4401 does", async () => {
  const fetch = async () => ({ ok: false, status: 401, body: null, headers: { get: () => null }, json: async () => ({}) });
  const { c, timers, sockets, errors } = client({ fetch, wsAttempts: 1, sseAttempts: 1, probeEvery: 1e9 });
  c.subscribe("project:1", {}); c.connect(); await flush(); sockets[0].fail(); await settle();
  await timers.tick(600000); await settle();
  assert.equal(c.status, STATUS.OFFLINE);
  assert.ok(errors.some((e) => e.code === "unauthenticated"));
  c.close();
});

test("close() in a handler stops the rest of the SSE chunk", async () => {
  const chunk = [1, 2, 3].map((s) => `event: v1:item.updated\ndata: ${JSON.stringify(event(s))}\n\n`).join("");
  const fetch = async (url) => new URL(url).pathname === "/realtime/sse/" ? { ok: true, status: 200, body: sseBody(chunk, false) } : feedAnswer({ events: [] });
  const { c, sockets } = client({ fetch, wsAttempts: 1 });
  const seen = [];
  c.subscribe("project:1", { since: 0, onEvent: (f) => { seen.push(f.seq); c.close(); } });
  c.connect(); await flush(); sockets[0].fail(); await settle();
  assert.deepEqual(seen, [1]);
});

test("close() in a handler stops the rest of a reordered batch, which a later connect() replays", async () => {
  const { c, sockets } = client();
  c.connect(); await flush(); sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => { seen.push(f.seq); if (f.seq === 4) c.close(); } });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: true });
  await settle();
  sockets[0].receive(event(5));
  sockets[0].receive(event(4));
  assert.deepEqual(seen, [4]);
  c.connect(); await flush(); sockets[1].open();
  assert.equal(sockets[1].last("subscribe").since, 4);
  sockets[1].receive(event(5));
  assert.deepEqual(seen, [4, 5]);
  c.close();
});

test("a reconcile that throws is reported and does not roll back what the server did", async () => {
  const { c, reported, errors } = client(); const rolled = [];
  const result = await c.optimistic({ apply: () => "tmp", request: async () => ({ data: { id: 9 } }),
    reconcile: () => { throw new TypeError("bug"); }, rollback: (t) => rolled.push(t) });
  assert.deepEqual(rolled, []);
  assert.deepEqual(result, { data: { id: 9 } });
  assert.deepEqual(reported.map((e) => e.message), ["bug"]);
  assert.ok(!errors.some((e) => e.code === "rolled_back"));
});

test("4429 before the welcome does not count as a blocked WebSocket", async () => {
  const { c, timers, sockets, statuses } = client({ fetch: async () => new Promise(() => {}) });
  c.subscribe("project:1", {}); c.connect(); await flush();
  for (let i = 0; i < 3; i++) { sockets.at(-1).fail(4429); await timers.tick(statuses.at(-1).retryIn ?? 0); await settle(); }
  assert.notEqual(c.transport, "sse");
  c.close();
});

test("an error reply with ref null fails the oldest unanswered request", async () => {
  const { c, timers, sockets } = client();
  c.connect(); await flush(); sockets[0].open();
  const p = watch(c.publish("project:1", "v1:typing.started", {}));
  const q = watch(c.publish("project:1", "v1:typing.stopped", {}));
  sockets[0].receive({ op: "reply", ref: null, ok: false, error: { code: "internal_error", message: "x" } });
  for (let i = 0; i < 10; i++) { await timers.tick(20000); sockets[0].receive({ op: "ping" }); }
  await settle();
  assert.equal(p.state, "rejected");
  assert.equal(p.error.code, "internal_error");
  assert.equal(q.state, "pending"); // its reply is still to come
  c.close();
});

test("a reconnect sends the newest typing frame per stream and type, and rejects the others", async () => {
  const { c, timers, sockets } = client({ wsAttempts: 100 });
  c.connect(); await flush(); sockets[0].open(); sockets[0].fail();
  const results = [];
  for (let i = 0; i < 100; i++) results.push(watch(c.publish("project:1", "v1:typing.started", { i })));
  await timers.tick(1000); sockets[1].open();
  assert.ok(sentOf(sockets[1], "publish").length <= 20);
  assert.deepEqual(sentOf(sockets[1], "publish").map((f) => f.data.i), [99]);
  await settle();
  assert.equal(results.filter((r) => r.state === "rejected" && r.error.code === "superseded").length, 99);
  c.close();
});

test("a reconnect drops a queued typing.started older than typingExpires, and sends a fresh one", async () => {
  // The first reconnect waits half of 20 s (random 0: the least of its upper half): the socket is down for 10 s.
  const { c, timers, sockets } = client({ backoff: { base: 20000, cap: 20000 }, now: () => timers.now });
  c.connect(); await flush(); sockets[0].open(); sockets[0].fail();
  const stale = watch(c.publish("project:1", "v1:typing.started", { field: "title" }));
  const other = watch(c.publish("project:2", "v1:card.moved", {})); // not typing: kept however old
  await timers.tick(10000);
  assert.equal(sockets.length, 2);
  sockets[1].open();
  assert.deepEqual(sentOf(sockets[1], "publish").map((f) => f.type), ["v1:card.moved"]);
  await settle();
  assert.equal(stale.state, "rejected");
  assert.equal(stale.error.code, "expired");
  assert.equal(other.state, "pending");
  sockets[1].fail();
  while (sockets.length === 2) await timers.tick(1000);
  const fresh = watch(c.publish("project:1", "v1:typing.started", { field: "title" }));
  await timers.tick(2000); // typed 2 s before the socket is back: still true
  sockets[2].open();
  const sent = sentOf(sockets[2], "publish");
  assert.deepEqual(sent.map((f) => f.type), ["v1:typing.started"]);
  sockets[2].receive({ op: "reply", ref: sent[0].ref, ok: true, data: {} });
  await settle();
  assert.equal(fresh.state, "resolved");
  c.close();
});

test("typing while the socket is down keeps one frame per stream and type queued, not a full queue", async () => {
  const { c, timers, sockets } = client({ maxQueue: 5, now: () => timers.now });
  c.connect(); await flush(); sockets[0].open(); sockets[0].fail();
  const errors = [];
  c.on("error", (e) => errors.push(e.code));
  const moved = watch(c.publish("project:2", "v1:card.moved", {}));
  const keys = [];
  for (let i = 0; i < 20; i++) keys.push(watch(c.publish("project:1", "v1:typing.started", {})));
  await settle();
  assert.equal(moved.state, "pending"); // not pushed out by keystrokes
  assert.deepEqual(errors, []);
  assert.deepEqual(keys.slice(0, -1).map((k) => k.error?.code), Array(19).fill("superseded"));
  assert.equal(keys.at(-1).state, "pending");
  c.close();
});

test("a reconnect paces the queued publishes to stay within the server's burst", async () => {
  const { c, timers, sockets } = client({ wsAttempts: 100 });
  c.connect(); await flush(); sockets[0].open(); sockets[0].fail();
  for (let i = 0; i < 30; i++) c.publish("project:1", "v1:card.moved", { i }).catch(() => {});
  await timers.tick(1000); sockets[1].open();
  assert.equal(sentOf(sockets[1], "publish").length, 10);
  c.publish("project:1", "v1:card.moved", { i: 30 }).catch(() => {}); // behind the queue, in order
  assert.equal(sentOf(sockets[1], "publish").length, 10);
  await timers.tick(1000);
  assert.equal(sentOf(sockets[1], "publish").length, 20);
  await timers.tick(2000);
  assert.deepEqual(sentOf(sockets[1], "publish").map((f) => f.data.i), Array.from({ length: 31 }, (_, i) => i));
  c.close();
});

test("a reply with ref null answers the frame sent first, even one queued before it", async () => {
  const { c, sockets } = client();
  c.connect(); await flush();
  const published = watch(c.publish("project:1", "v1:card.moved", {})); // queued: no socket yet
  const ready = watch(c.subscribe("project:1", {}).ready);
  sockets[0].open(); // the subscribe goes out first, then the queue
  assert.deepEqual(sockets[0].sent.map((f) => f.op), ["subscribe", "publish"]);
  sockets[0].receive({ op: "reply", ref: null, ok: false, error: { code: "internal_error", message: "x" } });
  await settle();
  assert.equal(ready.state, "rejected");
  assert.equal(ready.error.code, "internal_error");
  assert.equal(published.state, "pending");
  c.close();
});

test("a 401 from the polled feed ends the client as 4401 does", async () => {
  const fetch = async (url) => new URL(url).pathname === "/realtime/sse/"
    ? { ok: false, status: 503, body: null, headers: { get: () => null } }
    : { ok: false, status: 401, headers: { get: () => null }, json: async () => ({}) };
  const { c, timers, sockets, errors } = client({ fetch, wsAttempts: 1, sseAttempts: 1, probeEvery: 1e9 });
  c.subscribe("project:1", {}); c.connect(); await flush(); sockets[0].fail(); await settle();
  await timers.tick(1000); await settle();
  assert.equal(c.status, STATUS.OFFLINE);
  assert.deepEqual(errors.map((e) => e.code), ["unauthenticated"]);
  assert.equal(c.timers.size, 0); // nothing polls on
});

test("an SSE 429 waits the long backoff and does not count as a blocked SSE", async () => {
  let sse = 0;
  const fetch = async (url) => {
    if (new URL(url).pathname !== "/realtime/sse/") return feedAnswer({ events: [] });
    sse += 1;
    return { ok: false, status: 429, body: null, headers: { get: () => null } };
  };
  const { c, timers, sockets, statuses } = client({ fetch, wsAttempts: 1, sseAttempts: 1, probeEvery: 1e9, random: () => 0.5 });
  c.subscribe("project:1", {}); c.connect(); await flush(); sockets[0].fail(); await settle();
  assert.equal(c.transport, "sse");
  assert.equal(statuses.at(-1).retryIn, 3000); // between half and all of 4 s
  await timers.tick(3000); await settle();
  assert.equal(sse, 2);
  assert.equal(c.transport, "sse");
  c.close();
});

test("SSE streams that keep ending back off further each time, and stay on SSE", async () => {
  const fetch = async (url) => new URL(url).pathname === "/realtime/sse/"
    ? { ok: true, status: 200, body: sseBody(": hb\n\n") }
    : feedAnswer({ events: [] });
  const { c, timers, sockets, statuses } = client({ fetch, wsAttempts: 1, sseAttempts: 1, probeEvery: 1e9 });
  c.subscribe("project:1", {}); c.connect(); await flush(); sockets[0].fail(); await settle();
  for (let i = 0; i < 3; i++) { await timers.tick(statuses.at(-1).retryIn); await settle(); }
  const waits = statuses.filter((s) => s.retryIn !== undefined && s.status === STATUS.SSE).map((s) => s.retryIn);
  assert.deepEqual(waits, [1000, 2000, 4000, 8000]);
  assert.equal(c.transport, "sse"); // each stream opened: SSE gets through
  c.close();
});

// -- tabs: what a follower is told after the leader's socket changes -------------------------

test("after the leader's socket reconnects, its followers get the new subscribe reply's presence", async () => {
  const { make, sockets, timers } = tabs({ wsAttempts: 100 });
  const leader = make().connect(); const follower = make().connect();
  await settle(); sockets[0].open(); await settle();
  const shown = [];
  follower.subscribe("project:1", { onPresence: (members) => shown.push(members.map((m) => m.user.id)) }); await settle();
  const T = "2026-12-03T10:00:00.000Z";
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false, presence: [{ user: { id: 1 }, since: T }, { user: { id: 2 }, since: T }] });
  await settle();
  sockets[0].fail(); await timers.tick(1000); sockets[1].open(); await settle();
  ok(sockets[1], sockets[1].last("subscribe"), { seq: 3, epoch: "e", recovered: true, presence: [{ user: { id: 1 }, since: T }, { user: { id: 3 }, since: T }] });
  await settle();
  assert.deepEqual(follower.members("project:1").map((m) => m.user.id), [1, 3]);
  assert.deepEqual(shown, [[1, 2], [1, 3]]); // once from its own reply, once from the snapshot
  leader.close(); follower.close();
});

test("a follower resuming from another epoch, or ahead of the leader without an epoch, is reset to the leader's position", async () => {
  const { make, sockets } = tabs();
  const leader = make().connect(); const follower = make().connect();
  await settle(); sockets[0].open(); await settle();
  leader.subscribe("project:1", {});
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e2", recovered: false }); await settle();
  const seen = [], resets = [];
  const sub = follower.subscribe("project:1", { since: 50, epoch: "e1", onEvent: (f) => seen.push(f.seq), onReset: (r) => resets.push(r) });
  await settle();
  sockets[0].receive(event(4)); sockets[0].receive(event(5)); await settle();
  assert.deepEqual(resets, [{ stream: "project:1", seq: 3, epoch: "e2" }]);
  assert.deepEqual(seen, [4, 5]);
  assert.equal((await sub.ready).recovered, false);
  // Ahead of the leader with no epoch to compare (the server would say recovered: false too).
  const ahead = [];
  const other = make().connect(); await settle();
  other.subscribe("project:1", { since: 9, onReset: (r) => ahead.push(r.seq) }); await settle();
  assert.deepEqual(ahead, [5]);
  // Ahead in the leader's own epoch: the leader is only behind, and the tab goes on from its
  // position (the events up to it are not delivered again).
  const third = make().connect(); await settle();
  const later = [], thirdResets = [];
  third.subscribe("project:1", { since: 7, epoch: "e2", onEvent: (f) => later.push(f.seq), onReset: (r) => thirdResets.push(r) });
  await settle();
  for (const seq of [6, 7, 8]) sockets[0].receive(event(seq));
  await settle();
  assert.deepEqual(thirdResets, []);
  assert.deepEqual(later, [8]);
  leader.close(); follower.close(); other.close(); third.close();
});

test("a follower more than one feed page behind the leader reads page by page up to it", async () => {
  const fetch = async (url) => { const from = cursorOf(url)["project:1"][0];
    return feedAnswer({ events: Array.from({ length: 500 }, (_, i) => event(from + 1 + i)).filter((e) => e.seq <= 1200) }); };
  const { make, sockets, timers } = tabs({ fetch });
  const leader = make().connect(); const follower = make().connect();
  await settle(); sockets[0].open(); await settle();
  leader.subscribe("project:1", {});
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 1200, epoch: "e", recovered: false }); await settle();
  const seen = [], resets = [];
  follower.subscribe("project:1", { since: 0, onEvent: (f) => seen.push(f.seq), onReset: (r) => resets.push(r) });
  for (let i = 0; i < 10; i++) await settle();
  await timers.tick(5000); await settle();
  assert.equal(seen.length, 1200);
  assert.deepEqual([seen[0], seen.at(-1)], [1, 1200]);
  assert.deepEqual(resets, []);
  leader.close(); follower.close();
});

test("a follower's refused stream is dropped at the leader when its handle unsubscribes, and not resubscribed", async () => {
  const { make, sockets, timers } = tabs({ wsAttempts: 100 });
  const leader = make().connect(); const follower = make().connect();
  await settle(); sockets[0].open(); await settle();
  const sub = follower.subscribe("project:9", {}); await settle();
  refuse(sockets[0], sockets[0].last("subscribe"), "forbidden"); await settle();
  sub.unsubscribe(); await settle();
  assert.equal(leader.tabStreams.has("project:9"), false);
  assert.equal(leader.streams.has("project:9"), false);
  sockets[0].fail(); await timers.tick(1000); sockets[1].open(); await settle();
  assert.equal(sentOf(sockets[1], "subscribe", "project:9").length, 0);
  leader.close(); follower.close();
});

test("a refusal of a follower's stream is an error in the follower, not in the leader's page", async () => {
  const { make, sockets } = tabs();
  const leader = make().connect(); const follower = make().connect();
  await settle(); sockets[0].open(); await settle();
  const errors = [], followerErrors = [];
  leader.on("error", (e) => errors.push(e.code));
  follower.on("error", (e) => followerErrors.push(e.code));
  const sub = follower.subscribe("project:9", {}); await settle();
  refuse(sockets[0], sockets[0].last("subscribe"), "forbidden"); await settle();
  await assert.rejects(sub.ready, (e) => e.code === "forbidden");
  // A revocation of another stream the follower follows: the same.
  follower.subscribe("project:8", {}); await settle();
  ok(sockets[0], sockets[0].last("subscribe")); await settle();
  sockets[0].receive({ op: "unsubscribed", stream: "project:8", reason: "forbidden" }); await settle();
  assert.deepEqual(errors, []);
  assert.deepEqual(followerErrors, ["forbidden", "forbidden"]);
  leader.close(); follower.close();
});

// -- connect timeout, watchdog, probe ---------------------------------------------------------

test("a handshake that hangs times out after connectTimeout and counts as a failed try", async () => {
  const { c, timers, sockets, statuses } = client({ fetch: async () => new Promise(() => {}), wsAttempts: 2 });
  c.subscribe("project:1", {}); c.connect(); await flush();
  assert.equal(sockets.length, 1);
  await timers.tick(14999);
  assert.equal(sockets.length, 1);
  assert.equal(c.status, STATUS.CONNECTING);
  await timers.tick(1); // 15 s: the try failed
  assert.equal(sockets[0].readyState, 3);
  assert.equal(c.status, STATUS.RECONNECTING);
  await timers.tick(statuses.at(-1).retryIn);
  assert.equal(sockets.length, 2);
  sockets[0].open(); // a late open of the timed-out socket is ignored
  assert.equal(c.socket, undefined);
  await timers.tick(15000); await settle(); // the second try fails too: SSE
  assert.equal(c.transport, "sse");
  c.close();
});

test("a ticket request that hangs times out as a failed try, and its late answer is ignored", async () => {
  const answers = [];
  const fetch = (url) => new URL(url).pathname === "/api/realtime/tickets/"
    ? new Promise((resolve) => answers.push(resolve))
    : new Promise(() => {});
  const { c, timers, sockets } = client({ fetch, ticketUrl: "http://testserver/api/realtime/tickets/", wsAttempts: 100, connectTimeout: 5000 });
  c.connect(); await flush();
  assert.equal(answers.length, 1);
  await timers.tick(5000); await settle();
  assert.equal(c.status, STATUS.RECONNECTING);
  await timers.tick(1000); await settle();
  assert.equal(answers.length, 2); // tried again with a new ticket request
  answers[0]({ ok: true, status: 200, json: async () => ({ ticket: "late" }) });
  answers[1]({ ok: true, status: 200, json: async () => ({ ticket: "t2" }) });
  await settle();
  assert.equal(sockets.length, 1);
  assert.match(sockets[0].url, /ticket=t2/);
  c.close();
});

test("a ticket request that times out is aborted, not left open", async () => {
  const signals = [];
  const fetch = (url, init = {}) => {
    if (new URL(url).pathname === "/api/realtime/tickets/") signals.push(init.signal);
    return new Promise(() => {});
  };
  const { c, timers } = client({ fetch, ticketUrl: "http://testserver/api/realtime/tickets/", wsAttempts: 100, connectTimeout: 5000 });
  c.connect(); await flush();
  assert.equal(signals.length, 1);
  assert.ok(signals[0], "the ticket request carries a signal");
  assert.equal(signals[0].aborted, false);
  await timers.tick(5000); await settle();
  assert.equal(signals[0].aborted, true); // the hung request is given up, not left to pile up
  c.close();
});

test("the watchdog drops a silent socket at once, without waiting for its onclose", async () => {
  const { c, timers, sockets, statuses } = client();
  c.connect(); await flush(); sockets[0].open(25);
  sockets[0].close = function () { this.readyState = 2; }; // a dead link: onclose comes late, if ever
  await timers.tick(51000);
  assert.equal(c.status, STATUS.RECONNECTING);
  assert.equal(statuses.at(-1).code, 4408); // as a heartbeat timeout
  assert.equal(c.socket, null);
  await timers.tick(statuses.at(-1).retryIn);
  assert.equal(sockets.length, 2);
  sockets[1].open();
  assert.equal(c.status, STATUS.OPEN);
  c.close();
});

test("on a fallback, subscribes made often do not postpone the WebSocket probe", async () => {
  const { c, timers, sockets } = client({ fetch: async () => new Promise(() => {}), wsAttempts: 1, probeEvery: 30000 });
  c.subscribe("project:1", {}); c.connect(); await flush(); sockets[0].fail(); await settle();
  assert.equal(c.transport, "sse");
  for (let i = 2; i < 12; i++) { await timers.tick(20000); c.subscribe(`project:${i}`, {}); }
  assert.ok(sockets.length > 1);
  // Probes at 30 s, 75 s, 120 s and 165 s: each hangs until connectTimeout (15 s), then the next waits probeEvery.
  assert.equal(sockets.length, 5);
  c.close();
});

// -- a handle that joins a stream already followed ---------------------------------------------

test("snapshot() of a stream already followed delivers the events committed while its GET was on its way", async () => {
  let answer; const fetch = () => new Promise((r) => (answer = r));
  const { c, sockets } = client({ fetch });
  c.connect(); await flush(); sockets[0].open();
  c.subscribe("project:1", { onEvent() {} });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 5, epoch: "e", recovered: false }); await settle();
  const seen = [];
  const snap = c.snapshot("/api/projects/1/items/", "project:1", { onEvent: (f) => seen.push(f.seq) });
  await flush();
  sockets[0].receive(event(6));
  answer({ ok: true, status: 200, headers: { get: (h) => (h === "X-Stream-Position" ? "project:1=5" : null) }, json: async () => [] });
  await snap;
  assert.deepEqual(seen, []); // not before the page has the snapshot's data
  sockets[0].receive(event(7));
  assert.deepEqual(seen, [6, 7]);
  c.close();
});

test("a handle joining from a position it missed gets the kept events after a turn, or a reset of its own", async () => {
  const { c, timers, sockets } = client();
  c.connect(); await flush(); sockets[0].open();
  const first = [];
  c.subscribe("project:1", { onEvent: (f) => first.push(f.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 0, epoch: "e", recovered: false }); await settle();
  for (let seq = 1; seq <= 150; seq++) sockets[0].receive(event(seq));
  const late = [];
  c.subscribe("project:1", { since: 140, onEvent: (f) => late.push(f.seq) });
  assert.deepEqual(late, []);
  await timers.tick(0);
  assert.deepEqual(late, [141, 142, 143, 144, 145, 146, 147, 148, 149, 150]);
  // Further back than the events kept (100) and the feed fails, or from another epoch: that
  // handle alone resets.
  const resets = [], old = [];
  c.subscribe("project:1", { since: 10, onEvent: (f) => old.push(f.seq), onReset: (r) => resets.push(r) });
  c.subscribe("project:1", { since: 149, epoch: "other", onReset: (r) => resets.push(r) });
  await timers.tick(0); await settle();
  assert.deepEqual(resets, [{ stream: "project:1", seq: 150, epoch: "e" }, { stream: "project:1", seq: 150, epoch: "e" }]);
  sockets[0].receive(event(151));
  assert.deepEqual(old, [151]);
  assert.equal(first.length, 151); // the first handle saw each event once, and no reset
  c.close();
});

test("a handle joining from further back than the kept events reads them from the feed, for it alone", async () => {
  const requests = [];
  let release;
  const gate = new Promise((r) => (release = r));
  const fetch = async (url) => {
    const from = cursorOf(url)["project:1"][0];
    requests.push(from);
    await gate;
    return feedAnswer({ events: Array.from({ length: 500 }, (_, i) => event(from + 1 + i)).filter((e) => e.seq <= 151) });
  };
  const { c, sockets } = client({ fetch });
  c.connect(); await flush(); sockets[0].open();
  const first = [];
  c.subscribe("project:1", { onEvent: (f) => first.push(f.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 0, epoch: "e", recovered: false }); await settle();
  for (let seq = 1; seq <= 150; seq++) sockets[0].receive(event(seq));
  const late = [], resets = [];
  c.subscribe("project:1", { since: 10, onEvent: (f) => late.push(f.seq), onReset: (r) => resets.push(r) });
  await settle();
  sockets[0].receive(event(151)); // live while the feed is read: it waits behind
  assert.deepEqual(late, []);
  release(); await settle();
  assert.deepEqual(requests, [10]);
  assert.deepEqual(late, Array.from({ length: 141 }, (_, i) => 11 + i)); // 11..150 from the feed, then 151
  assert.deepEqual(resets, []);
  assert.equal(first.length, 151); // the other handle got nothing twice
  c.close();
});

// -- dead fallbacks: a half-open SSE stream, a long poll with no answer -----------------------

/** A fetch body the test writes to (`push(text)`), or ends (`push("", true)`). */
const openBody = () => {
  let push = null;
  const body = { getReader: () => ({ read: () => new Promise((resolve) => (push = resolve)) }) };
  return { body, push: (text, done = false) => push(done ? { done: true } : { value: new TextEncoder().encode(text), done: false }) };
};

test("an SSE stream that goes silent (half-open: no byte, no close) is given up after sseTimeout and resumed from its cursor", async () => {
  const requests = [];
  const fetch = async (url, init = {}) => {
    if (new URL(url).pathname !== "/realtime/sse/") return feedAnswer({ events: [] });
    const { body, push } = openBody();
    requests.push({ cursor: cursorOf(url), signal: init.signal, push });
    return { ok: true, status: 200, body };
  };
  const { c, timers, sockets, statuses } = client({ fetch, wsAttempts: 1, probeEvery: 1e9 });
  const seen = [];
  c.subscribe("project:1", { since: 4, onEvent: (f) => seen.push(f.seq) });
  c.connect(); await flush(); sockets[0].fail(); await settle();
  assert.equal(c.transport, "sse");
  assert.equal(requests.length, 1);
  requests[0].push(`retry: 3000\n\nevent: v1:item.updated\ndata: ${JSON.stringify(event(5))}\n\n`);
  await settle();
  assert.deepEqual(seen, [5]);
  // The read never settles, and ignores the abort: only the client's own timer can end it.
  await timers.tick(34999); await settle();
  assert.equal(requests.length, 1);
  assert.equal(requests[0].signal.aborted, false);
  await timers.tick(1); await settle();
  assert.equal(requests[0].signal.aborted, true); // the dead request is let go
  assert.equal(c.status, STATUS.SSE);
  assert.ok(statuses.at(-1).retryIn >= 3000); // the existing reconnect path: at least `retry:`
  await timers.tick(statuses.at(-1).retryIn); await settle();
  assert.equal(requests.length, 2);
  assert.deepEqual(requests[1].cursor, { "project:1": [5, null] }); // from where it was: nothing lost
  requests[1].push(`retry: 3000\n\nevent: v1:item.updated\ndata: ${JSON.stringify(event(6))}\n\n`);
  await settle();
  assert.deepEqual(seen, [5, 6]);
  c.close();
  assert.equal(timers.queue.size, 0); // no timer of the fallback outlives close()
});

test("the server's heartbeat comments keep an idle SSE stream, which a silence then ends", async () => {
  const requests = [];
  const fetch = async (url) => {
    if (new URL(url).pathname !== "/realtime/sse/") return feedAnswer({ events: [] });
    const { body, push } = openBody();
    requests.push(push);
    return { ok: true, status: 200, body };
  };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1, probeEvery: 1e9, sseTimeout: 20000 });
  c.subscribe("project:1", { since: 4 });
  c.connect(); await flush(); sockets[0].fail(); await settle();
  requests[0]("retry: 3000\n\n");
  for (let i = 0; i < 8; i++) {
    await timers.tick(15000); // the server's HEARTBEAT
    requests[0](": heartbeat\n\n");
    await settle();
  }
  assert.equal(requests.length, 1); // two minutes of comments only: still the same stream
  await timers.tick(20000); await settle();
  await timers.tick(5000); await settle();
  assert.equal(requests.length, 2);
  c.close();
});

test("a long poll with no answer within its wait and feedTimeout is aborted and polled again", async () => {
  const polls = [];
  const fetch = (url, init = {}) => {
    if (new URL(url).pathname === "/realtime/sse/") return Promise.resolve({ ok: false, status: 502, body: null, headers: { get: () => null } });
    polls.push({ url: new URL(url), signal: init.signal });
    return new Promise(() => {}); // a proxy that holds the request: no answer, no close
  };
  const { c, timers, sockets, statuses } = client({ fetch, wsAttempts: 1, sseAttempts: 1, probeEvery: 1e9 });
  c.subscribe("project:1", { since: 4 });
  c.connect(); await flush(); sockets[0].fail(); await settle();
  assert.equal(c.status, STATUS.POLLING);
  assert.equal(polls.length, 1);
  assert.equal(polls[0].url.searchParams.get("wait"), "20");
  await timers.tick(29999); await settle(); // wait (20 s) + feedTimeout (10 s)
  assert.equal(polls.length, 1);
  await timers.tick(1); await settle();
  assert.equal(polls[0].signal.aborted, true);
  assert.equal(c.status, STATUS.POLLING);
  assert.ok(statuses.at(-1).error);
  await timers.tick(1000); await settle(); // the poll's backoff after one failure
  assert.equal(polls.length, 2);
  assert.deepEqual(cursorOf(polls[1].url), { "project:1": [4, null] });
  c.close();
  assert.equal(timers.queue.size, 0);
});

test("a gap fill whose feed request hangs gives up after feedTimeout instead of holding the stream", async () => {
  let reads = 0;
  const fetch = () => { reads += 1; return new Promise(() => {}); };
  const resets = [];
  const { c, timers, sockets } = client({ fetch, feedTimeout: 5000 });
  c.connect(); await flush(); sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq), onReset: (r) => resets.push(r.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: true });
  await settle();
  sockets[0].receive(event(5)); // 4 is missing
  await timers.tick(1000); await settle(); // gapWait: the feed is asked
  assert.equal(reads, 1);
  await timers.tick(5000); await settle();
  assert.deepEqual(resets, [4]); // as any fill that fails with no server position: before the events held
  assert.deepEqual(seen, [5]);
  assert.equal(c.streams.get("project:1").filling, false);
  c.close();
});

// -- versions ---------------------------------------------------------------------------------

test("the version option goes in every subscribe frame, and as ?version= to SSE and the feed", async () => {
  const urls = [];
  const fetch = async (url) => {
    urls.push(new URL(url));
    if (new URL(url).pathname === "/realtime/sse/") return { ok: false, status: 502, body: null, headers: { get: () => null } };
    return feedAnswer({ events: [] });
  };
  const { c, timers, sockets } = client({ fetch, version: "v2", wsAttempts: 1, sseAttempts: 1, probeEvery: 30000 });
  c.connect(); await flush(); sockets[0].open();
  c.subscribe("project:1", {});
  assert.equal(sockets[0].last("subscribe").version, "v2");
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: true });
  await settle();
  sockets[0].receive(event(5)); // a gap: the fill reads the feed in the same version
  await timers.tick(1000); await settle();
  sockets[0].fail(); await timers.tick(1000); sockets[1].fail(); await settle(); // SSE, then polling
  assert.equal(c.status, STATUS.POLLING);
  const paths = urls.map((u) => u.pathname);
  assert.ok(paths.includes("/realtime/sse/") && paths.includes("/api/realtime/events/"));
  for (const url of urls) assert.equal(url.searchParams.get("version"), "v2", url.toString());
  await timers.tick(30000); await settle(); // the probe resubscribes with it too
  sockets.at(-1).open(); await settle();
  assert.equal(sockets.at(-1).last("subscribe").version, "v2");
  c.close();
});

test("without the version option nothing names one, and a malformed one is refused at once", async () => {
  const urls = [];
  const fetch = async (url) => { urls.push(new URL(url)); return { ok: false, status: 502, body: null, headers: { get: () => null } }; };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1 });
  c.connect(); await flush(); sockets[0].open();
  c.subscribe("project:1", {});
  assert.equal("version" in sockets[0].last("subscribe"), false);
  sockets[0].fail(); await timers.tick(1000); sockets[1].fail(); await settle();
  assert.ok(urls.length);
  for (const url of urls) assert.equal(url.searchParams.has("version"), false);
  c.close();
  for (const version of ["2", "v0", "V1", "v12345", "latest"]) {
    assert.throws(() => new RealtimeClient({ version, shareTabs: false, WebSocket: class {}, setTimeout, clearTimeout }), RangeError);
  }
});

test("tabs of different versions do not share a connection", async () => {
  const { make, sockets, locks, lockName } = tabs();
  const plain = make().connect();
  const v2 = make({ version: "v2" }).connect();
  await settle();
  assert.equal(plain.role, "leader");
  assert.equal(v2.role, "leader"); // a follower would get the other tab's version
  assert.equal(sockets.length, 2);
  assert.ok(locks.state(lockName).held);
  assert.ok(locks.state(`${lockName}#v2`).held);
  plain.close();
  v2.close();
});

// -- review fixes: joins before the position, ticket clients, fallbacks, malformed frames ----

test("snapshot() of a stream whose plain subscribe is not answered yet gets the events after its own position", async () => {
  const feed = [];
  const fetch = async (url) => {
    if (new URL(url, "http://testserver").pathname === "/api/projects/1/items/") {
      return { ok: true, status: 200, headers: { get: (h) => (h === "X-Stream-Position" ? "project:1=100" : null) }, json: async () => [] };
    }
    const from = cursorOf(url)["project:1"][0];
    feed.push(from);
    return feedAnswer({ events: [101, 102, 103, 104, 105].filter((s) => s > from).map((s) => event(s)) });
  };
  const { c, sockets } = client({ fetch });
  c.connect(); await flush(); sockets[0].open();
  const first = [], late = [], resets = [];
  c.subscribe("project:1", { onEvent: (f) => first.push(f.seq) }); // "from now": no position yet
  const sub = sockets[0].last("subscribe");
  const { since } = await c.snapshot("/api/projects/1/items/", "project:1", {
    onEvent: (f) => late.push(f.seq),
    onReset: (r) => resets.push(r),
  });
  assert.equal(since, 100);
  ok(sockets[0], sub, { seq: 105, epoch: "e", recovered: false }); // the stream starts past the snapshot
  await settle();
  sockets[0].receive(event(106));
  await settle();
  assert.deepEqual(feed, [100]);
  assert.deepEqual(late, [101, 102, 103, 104, 105, 106]); // snapshot and stream meet exactly
  assert.deepEqual(first, [106]); // the other handle sees nothing of it
  assert.deepEqual(resets, []);
  c.close();
});

const TICKETS = "http://testserver/api/realtime/tickets/";
const ticketAnswer = () => ({ ok: true, status: 201, headers: { get: () => null }, json: async () => ({ ticket: "T" }) });
const refused401 = () => ({ ok: false, status: 401, body: null, headers: { get: () => null }, json: async () => ({}) });

test("a ticket client fills a gap by subscribing again on the socket from its position, not from the feed that refuses it", async () => {
  const feed = [];
  const fetch = async (url) => {
    if (url === TICKETS) return ticketAnswer();
    feed.push(url);
    return refused401(); // the feed takes the session only
  };
  const { c, timers, sockets, errors } = client({ fetch, ticketUrl: TICKETS, gapWait: 1000 });
  c.connect(); await settle(); sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false }); await settle();
  sockets[0].receive(event(6)); // 4 and 5 lost on the way
  await timers.tick(1000); await settle();
  assert.deepEqual(feed, []);
  const [unsub] = sentOf(sockets[0], "unsubscribe", "project:1");
  const again = sentOf(sockets[0], "subscribe", "project:1")[1];
  assert.ok(unsub && again);
  assert.ok(sockets[0].sent.indexOf(unsub) < sockets[0].sent.indexOf(again));
  assert.equal(again.since, 3);
  assert.equal(again.epoch, "e");
  await timers.tick(5000); await settle();
  assert.equal(sentOf(sockets[0], "subscribe", "project:1").length, 2); // one resume at a time
  ok(sockets[0], unsub, {});
  ok(sockets[0], again, { seq: 6, epoch: "e", recovered: true });
  await settle();
  for (const seq of [4, 5, 6]) sockets[0].receive(event(seq)); // the replay; 6 was held already
  assert.deepEqual(seen, [4, 5, 6]);
  assert.equal(c.status, STATUS.OPEN);
  assert.deepEqual(errors, []);
  c.close();
});

test("a ticket client does not fall back to SSE or polling, which take the session only: it keeps trying the WebSocket", async () => {
  const other = [];
  const fetch = async (url) => {
    if (url === TICKETS) return ticketAnswer();
    other.push(new URL(url).pathname);
    return refused401();
  };
  const { c, timers, sockets, errors, statuses } = client({ fetch, ticketUrl: TICKETS, wsAttempts: 2 });
  c.subscribe("project:1", {});
  c.connect(); await settle();
  for (let i = 0; i < 4; i++) { sockets.at(-1).fail(); await timers.tick(statuses.at(-1).retryIn); await settle(); }
  assert.deepEqual(other, []);
  assert.equal(sockets.length, 5);
  assert.notEqual(c.status, STATUS.OFFLINE);
  assert.deepEqual(errors, []);
  c.close();
});

test("publishes queued for a socket fail with no_websocket when the client falls back to SSE", async () => {
  const fetch = async (url) => (new URL(url).pathname === "/realtime/sse/" ? new Promise(() => {}) : feedAnswer({ events: [] }));
  const { c, sockets } = client({ fetch, wsAttempts: 1, probeEvery: 1e9 });
  c.subscribe("project:1", {});
  c.connect(); await flush();
  const queued = watch(c.publish("project:1", "v1:typing.started", {}));
  sockets[0].fail(); await settle();
  assert.equal(c.transport, "sse");
  assert.equal(queued.state, "rejected");
  assert.equal(queued.error.code, "no_websocket");
  assert.equal(c.queue.length, 0);
  const later = watch(c.publish("project:1", "v1:typing.started", {}));
  await settle();
  assert.equal(later.error.code, "no_websocket"); // as one made there
  c.close();
});

test("SSE reconnects spread above the server's retry: two clients wait differently, neither less than the retry", async () => {
  const waits = [];
  for (const r of [0.1, 0.9]) {
    const fetch = async (url) => new URL(url).pathname === "/realtime/sse/"
      ? { ok: true, status: 200, body: sseBody("retry: 3000\n\n") }
      : feedAnswer({ events: [] });
    const { c, sockets, statuses } = client({ fetch, wsAttempts: 1, probeEvery: 1e9, random: () => r });
    c.subscribe("project:1", {}); c.connect(); await flush(); sockets[0].fail(); await settle();
    const wait = statuses.filter((s) => s.status === STATUS.SSE && s.retryIn !== undefined).at(-1).retryIn;
    assert.ok(wait >= 3000, `random ${r}: ${wait}`);
    waits.push(wait);
    c.close();
  }
  // The retry (3 s, longer than the first step's 2 s), and a random share of it above it.
  assert.deepEqual(waits, [3300, 5700]);
});

/** A document whose visibility the test changes (`set`), firing `visibilitychange`. */
function fakeDocument(visibilityState = "visible") {
  const listeners = new Set();
  return {
    visibilityState,
    cookie: "",
    addEventListener: (type, fn) => listeners.add(fn),
    removeEventListener: (type, fn) => listeners.delete(fn),
    set(state) {
      this.visibilityState = state;
      for (const fn of [...listeners]) fn();
    },
  };
}

test("a follower tab shown on a polling leader neither polls nor probes; the leader long-polls while any tab is shown", async () => {
  const leaderPolls = [];
  const leaderFetch = async (url) => {
    const u = new URL(url);
    if (u.pathname === "/realtime/sse/") return { ok: false, status: 503, body: null, headers: { get: () => null } };
    leaderPolls.push(u.searchParams.get("wait"));
    return feedAnswer({ events: [] });
  };
  const followerRequests = [];
  const followerFetch = async (url) => { followerRequests.push(url); return new Promise(() => {}); };
  const { make, sockets, timers } = tabs({ wsAttempts: 1, sseAttempts: 1 });
  const leaderDoc = fakeDocument("hidden"), followerDoc = fakeDocument("hidden");
  const leader = make({ fetch: leaderFetch, document: leaderDoc, probeEvery: 1e9 }).connect();
  const follower = make({ fetch: followerFetch, document: followerDoc, probeEvery: 1000 }).connect();
  await settle();
  assert.equal(follower.role, "follower");
  follower.subscribe("project:1", {});
  await settle();
  sockets[0].fail(); await settle();
  assert.equal(leader.transport, "polling");
  assert.equal(follower.transport, "polling"); // mirrored from the leader's status
  assert.equal(leaderPolls.at(-1), null); // every tab hidden: a short poll
  followerDoc.set("visible"); await settle();
  await timers.tick(5000); await settle();
  assert.deepEqual(followerRequests, []);
  assert.equal(sockets.length, 1); // no probe from the follower
  assert.equal(leaderPolls.at(-1), "20"); // a tab is shown: the leader long-polls
  followerDoc.set("hidden"); await settle();
  await timers.tick(1000); await settle();
  assert.equal(leaderPolls.at(-1), null); // none shown any more: short polls again
  leader.close();
  follower.close();
});

test("4400 and 4413 wait the long backoff, and a stream refused as malformed is not subscribed again", async () => {
  const { c, timers, sockets, statuses } = client({ wsAttempts: 100, stableAfter: 10000, random: () => 0.5 });
  c.connect(); await flush(); sockets[0].open();
  const bad = watch(c.subscribe("Project 1", {}).ready);
  c.subscribe("project:1", {});
  refuse(sockets[0], sentOf(sockets[0], "subscribe", "Project 1")[0], "invalid_stream");
  ok(sockets[0], sentOf(sockets[0], "subscribe", "project:1")[0]);
  await settle();
  assert.equal(bad.error.code, "invalid_stream");
  await timers.tick(10000); // stable: the ordinary backoff would start again from 0-1 s
  sockets[0].fail(4400);
  assert.equal(statuses.at(-1).retryIn, 3000); // between half and all of 4 s, as after a 4429
  await timers.tick(3000);
  sockets[1].open();
  assert.deepEqual(sentOf(sockets[1], "subscribe").map((f) => f.stream), ["project:1"]);
  const again = watch(c.subscribe("Project 1", {}).ready);
  await settle();
  assert.equal(again.error.code, "invalid_stream"); // at once, and nothing sent
  assert.equal(sentOf(sockets[1], "subscribe", "Project 1").length, 0);
  await timers.tick(10000);
  sockets[1].fail(4413);
  assert.equal(statuses.at(-1).retryIn, 6000); // the next in a row waits longer
  c.close();
});

test("malformed server frames are dropped and said, never thrown, and ready still settles", async () => {
  const { c, sockets, errors } = client();
  c.connect(); await flush(); sockets[0].open();
  const seen = [], members = [];
  const sub = watch(c.subscribe("project:1", {
    onEvent: (f) => seen.push(f.seq),
    onPresence: (m) => members.push(m.map((x) => x.user.id)),
  }).ready);
  for (const text of ["null", "[1]", "5", '"x"', "{"]) sockets[0].onmessage({ data: text });
  ok(sockets[0], sockets[0].last("subscribe"), {
    seq: 0, epoch: "e", recovered: false, presence: [{ since: "t" }, { user: { id: 2 }, since: "t" }],
  });
  await settle();
  assert.equal(sub.state, "resolved");
  assert.deepEqual(members, [[2]]);
  sockets[0].receive({ op: "event", stream: "project:1", eventId: "p1", type: "v1:presence.joined", data: {} });
  sockets[0].receive({ op: "event", stream: "project:1", eventId: "p2", type: "v1:presence.left", data: null });
  sockets[0].receive(event(1));
  assert.deepEqual(seen, [1]);
  assert.deepEqual(members, [[2]]);
  assert.equal(c.status, STATUS.OPEN);
  assert.equal(errors.length, 8);
  assert.ok(errors.every((e) => e.code === "malformed_frame"));
  c.close();
});

test("a malformed presence diff or frame on SSE is dropped, and the stream goes on", async () => {
  const diff = { op: "event", stream: "project:1", eventId: "p1", type: "v1:presence.joined", data: {} };
  const chunk = [
    `event: v1:presence.joined\ndata: ${JSON.stringify(diff)}\n\n`,
    "event: v1:item.updated\ndata: null\n\n",
    `event: v1:item.updated\ndata: ${JSON.stringify(event(5))}\n\n`,
  ].join("");
  let sse = 0;
  const fetch = async (url) => {
    if (new URL(url).pathname !== "/realtime/sse/") return feedAnswer({ events: [] });
    sse += 1;
    return { ok: true, status: 200, body: sseBody(chunk, false) };
  };
  const { c, sockets, errors } = client({ fetch, wsAttempts: 1, probeEvery: 1e9 });
  const seen = [];
  c.subscribe("project:1", { since: 4, onEvent: (f) => seen.push(f.seq) });
  c.connect(); await flush(); sockets[0].fail(); await settle();
  assert.deepEqual(seen, [5]);
  assert.equal(sse, 1); // not torn down and opened again
  assert.deepEqual(errors.map((e) => e.code), ["malformed_frame", "malformed_frame"]);
  c.close();
});

test("on a fallback the socket's presence list is emptied, then read again from the presence API", async () => {
  const asked = [];
  const fetch = async (url) => {
    const u = new URL(url);
    if (u.pathname === "/realtime/sse/") return new Promise(() => {});
    if (u.pathname.startsWith("/api/presence/")) {
      asked.push(u.pathname);
      return { ok: true, status: 200, headers: { get: () => null }, json: async () => ({ stream: "project:1", members: [{ user: { id: 3 }, since: "t" }], total: 1 }) };
    }
    return feedAnswer({ events: [] });
  };
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1, probeEvery: 1e9 });
  c.connect(); await flush(); sockets[0].open();
  const lists = [];
  c.subscribe("project:1", { onPresence: (m) => lists.push(m.map((x) => x.user.id)) });
  ok(sockets[0], sockets[0].last("subscribe"), {
    seq: 0, epoch: "e", recovered: false, presence: [{ user: { id: 1 }, since: "t" }, { user: { id: 2 }, since: "t" }],
  });
  await settle();
  sockets[0].fail(); await timers.tick(1000); sockets[1].fail(); await settle();
  assert.equal(c.transport, "sse");
  assert.deepEqual(asked, ["/api/presence/project%3A1/"]);
  assert.deepEqual(lists, [[1, 2], [], [3]]);
  assert.deepEqual(c.members("project:1").map((m) => m.user.id), [3]);
  c.close();
});

// -- ticket clients whose fetch authenticates the HTTP read paths (`httpFallback`) ----------

/** A fetch that adds a token to every request, as an app without cookies wraps its own. */
function tokenFetch(answer) {
  const seen = [];
  const fetch = async (url, init = {}) => {
    const headers = { ...(init.headers || {}), Authorization: "Token k" };
    seen.push({ path: new URL(url).pathname, headers });
    return url === TICKETS ? ticketAnswer() : answer(new URL(url).pathname, url);
  };
  return { fetch, seen };
}

test("a ticket client with httpFallback falls back to SSE through its own fetch", async () => {
  const { fetch, seen } = tokenFetch((path) => (path === "/realtime/sse/" ? new Promise(() => {}) : feedAnswer({ events: [] })));
  const { c, timers, sockets, statuses, errors } = client({ fetch, ticketUrl: TICKETS, httpFallback: true, wsAttempts: 2, probeEvery: 1e9 });
  c.subscribe("project:1", {});
  c.connect(); await settle();
  for (let i = 0; i < 2 && c.transport !== "sse"; i++) {
    sockets.at(-1).fail(); await settle();
    if (c.transport !== "sse") { await timers.tick(statuses.at(-1).retryIn); await settle(); }
  }
  assert.equal(c.transport, "sse");
  // Through the app's fetch (the one that adds its token), once.
  assert.equal(seen.filter((r) => r.path === "/realtime/sse/").length, 1);
  assert.deepEqual(errors, []);
  c.close();
});

test("a ticket client with httpFallback fills a gap from the feed, not by subscribing again", async () => {
  const feed = [];
  const { fetch } = tokenFetch((path, url) => {
    feed.push(cursorOf(url)["project:1"][0]);
    return feedAnswer({ events: [event(4), event(5)] });
  });
  const { c, timers, sockets, errors } = client({ fetch, ticketUrl: TICKETS, httpFallback: true, gapWait: 1000 });
  c.connect(); await settle(); sockets[0].open();
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false }); await settle();
  sockets[0].receive(event(6)); // 4 and 5 lost on the way
  await timers.tick(1000); await settle();
  assert.deepEqual(feed, [3]);
  assert.deepEqual(sentOf(sockets[0], "unsubscribe", "project:1"), []);
  assert.deepEqual(seen, [4, 5, 6]);
  assert.deepEqual(errors, []);
  c.close();
});

test("a ticket client with httpFallback ends on a 401 from the feed: its credentials were refused", async () => {
  const { fetch } = tokenFetch(() => refused401());
  const { c, timers, sockets, errors } = client({ fetch, ticketUrl: TICKETS, httpFallback: true, gapWait: 1000 });
  c.connect(); await settle(); sockets[0].open();
  c.subscribe("project:1", {});
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false }); await settle();
  sockets[0].receive(event(6));
  await timers.tick(1000); await settle();
  assert.equal(c.status, STATUS.OFFLINE);
  assert.deepEqual(errors.map((e) => e.code), ["unauthenticated"]);
});

test("a ticket client with httpFallback ends on a 401 from SSE, as a 4401", async () => {
  const { fetch } = tokenFetch((path) => (path === "/realtime/sse/" ? refused401() : feedAnswer({ events: [] })));
  const { c, sockets, errors } = client({ fetch, ticketUrl: TICKETS, httpFallback: true, wsAttempts: 1, probeEvery: 1e9 });
  c.subscribe("project:1", {});
  c.connect(); await settle();
  sockets[0].fail(); await settle();
  assert.equal(c.status, STATUS.OFFLINE);
  assert.deepEqual(errors.map((e) => e.code), ["unauthenticated"]);
});

// -- gap timers after a reset, refusals on a fallback, reads cut by close(), tab hellos -------

test("after a reset or close() and connect(), a new gap still arms its timer and is filled from the feed", async () => {
  for (const trigger of ["reset", "close"]) {
    const feed = [];
    const fetch = async (url) => { feed.push(cursorOf(url)); return feedAnswer({ events: [event(12)] }); };
    const { c, timers, sockets } = client({ fetch });
    const seen = [];
    c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq), onReset() {} });
    c.connect(); await flush(); sockets[0].open();
    ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false }); await settle();
    sockets[0].receive(event(5)); // 4 is missing: the gap timer is armed
    let socket = sockets[0];
    if (trigger === "reset") socket.receive({ op: "reset", stream: "project:1", epoch: "e", seq: 10 });
    else {
      c.close(); c.connect(); await flush(); socket = sockets[1]; socket.open();
      ok(socket, socket.last("subscribe"), { seq: 10, epoch: "e2", recovered: false }); // another epoch: a reset to 10
    }
    await settle();
    socket.receive(event(11)); socket.receive(event(13)); // 12 lost on the way
    await timers.tick(1000); await settle();
    assert.deepEqual(seen, [11, 12, 13], trigger);
    assert.equal(feed.length, 1, trigger);
    assert.equal(feed[0]["project:1"][0], 11, trigger);
    c.close();
  }
});

/** The server's answer to an SSE or feed request with refused streams (protocol.md, section 14). */
const forbidden = (streams) => ({
  ok: false,
  status: 403,
  body: null,
  headers: { get: () => null },
  json: async () => ({ error: { code: "forbidden", message: "You do not have access.", ...(streams ? { streams } : {}) } }),
});

/** A fake server that refuses `secret` streams on SSE and the feed, naming them (`named` false: an older server). */
function refusingServer({ named = true, sse = true } = {}) {
  const requests = [];
  const fetch = async (url) => {
    const u = new URL(url);
    const streams = (u.searchParams.get("streams") || "").split(",").filter(Boolean);
    requests.push({ path: u.pathname, streams });
    const refused = streams.filter((s) => s.startsWith("secret:"));
    if (refused.length) return forbidden(named ? refused : null);
    if (u.pathname === "/realtime/sse/") {
      if (!sse) return { ok: false, status: 502, body: null, headers: { get: () => null } };
      const chunk = `event: v1:item.updated\ndata: ${JSON.stringify(event(5))}\n\n`;
      return { ok: true, status: 200, headers: { get: () => null }, body: sseBody(chunk, false) };
    }
    return feedAnswer({ events: streams.includes("project:1") ? [event(5)] : [] });
  };
  return { fetch, requests };
}

test("a stream the server refuses on SSE or polling (a 403 naming it) is refused as a forbidden subscribe; the others go on", async () => {
  for (const sse of [true, false]) {
    const { fetch, requests } = refusingServer({ sse });
    const { c, timers, sockets, errors } = client({ fetch, wsAttempts: 1, sseAttempts: 1, probeEvery: 1e9 });
    const seen = [];
    c.subscribe("project:1", { since: 4, onEvent: (f) => seen.push(f.seq) });
    c.connect(); await flush(); sockets[0].fail(); await settle();
    assert.equal(c.status, sse ? STATUS.SSE : STATUS.POLLING);
    const secret = c.subscribe("secret:9", { onEvent: () => assert.fail("refused") });
    await settle(); await timers.tick(1000); await settle();
    assert.deepEqual(errors.map((e) => [e.code, e.stream]), [["forbidden", "secret:9"]]);
    assert.deepEqual(seen, [5]);
    const path = sse ? "/realtime/sse/" : "/api/realtime/events/";
    const last = requests.filter((r) => r.path === path).at(-1);
    assert.deepEqual(last.streams, ["project:1"]); // started again at once, without it
    assert.equal(requests.filter((r) => r.streams.includes("secret:9")).length, 1);
    assert.equal(c.streams.get("secret:9").refused.code, "forbidden");
    await assert.rejects(c.subscribe("secret:9", {}).ready, (e) => e.code === "forbidden"); // as after a refused subscribe
    await secret.ready; // it had resolved on the fallback already
    c.close();
  }
});

test("a 403 naming no streams (an older server) keeps its backoff: no hot loop of requests", async () => {
  const { fetch, requests } = refusingServer({ named: false });
  const { c, timers, sockets } = client({ fetch, wsAttempts: 1, probeEvery: 1e9 });
  c.subscribe("project:1", {}); c.subscribe("secret:9", {});
  c.connect(); await flush(); sockets[0].fail(); await settle();
  await timers.tick(60000); await settle();
  assert.ok(requests.length < 20, `${requests.length} requests in a minute`);
  assert.equal(c.streams.get("secret:9").refused, null);
  c.close();
});

test("a leader on SSE tells the follower tab whose stream a 403 refuses, not its own page", async () => {
  const { fetch } = refusingServer();
  const { make, sockets, timers } = tabs({ fetch, wsAttempts: 1, probeEvery: 1e9 });
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  const leaderErrors = [], followerErrors = [];
  leader.on("error", (e) => leaderErrors.push(e.code));
  follower.on("error", (e) => followerErrors.push([e.code, e.stream]));
  leader.subscribe("project:1", {});
  sockets[0].fail(); await settle();
  assert.equal(leader.transport, "sse");
  follower.subscribe("secret:9", {});
  await settle(); await timers.tick(10); await settle();
  assert.deepEqual(followerErrors, [["forbidden", "secret:9"]]);
  assert.deepEqual(leaderErrors, []);
  assert.ok(follower.streams.get("secret:9").refused);
  leader.close(); follower.close();
});

test("a ticket follower tab whose feed refuses it (401) moves on from the leader's position, not a reset per event", async () => {
  const fetch = async (url) => (url === TICKETS ? ticketAnswer() : refused401());
  const { make, sockets, timers } = tabs({ fetch, ticketUrl: TICKETS });
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  leader.subscribe("project:1", {});
  sockets[0].open(); await settle();
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 20, epoch: "e", recovered: false }); await settle();
  const seen = [], resets = [];
  follower.subscribe("project:1", { since: 15, onEvent: (f) => seen.push(f.seq), onReset: (r) => resets.push(r.seq) });
  await settle(); await timers.tick(10); await settle();
  assert.deepEqual(resets, [20]); // 16..20 cannot be read: it goes on from the leader's position
  for (const seq of [21, 22, 23]) {
    sockets[0].receive(event(seq)); await settle(); await timers.tick(1500); await settle();
  }
  assert.deepEqual(seen, [21, 22, 23]);
  assert.deepEqual(resets, [20]);
  leader.close(); follower.close();
});

test("a gap fill that fails with no server position delivers the early events held, after a reset before them", async () => {
  const fetch = async () => ({ ok: false, status: 500, headers: { get: () => null }, json: async () => ({}) });
  const { c, timers, sockets } = client({ fetch });
  c.connect(); await flush(); sockets[0].open();
  const seen = [], resets = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq), onReset: (r) => resets.push(r.seq) });
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: true }); await settle();
  sockets[0].receive(event(6)); sockets[0].receive(event(7)); // 4 and 5 lost
  await timers.tick(1000); await settle();
  assert.deepEqual(resets, [5]);
  assert.deepEqual(seen, [6, 7]);
  sockets[0].receive(event(8));
  assert.deepEqual(seen, [6, 7, 8]);
  c.close();
});

test("close() aborts a gap fill's hung feed read: after connect() later gaps are filled again", async () => {
  let hang = true;
  const reads = [];
  const fetch = (url, init) => {
    reads.push(init.signal);
    return hang ? new Promise(() => {}) : Promise.resolve(feedAnswer({ events: [event(8)] }));
  };
  const { c, timers, sockets } = client({ fetch });
  const seen = [];
  c.subscribe("project:1", { onEvent: (f) => seen.push(f.seq) });
  c.connect(); await flush(); sockets[0].open();
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false }); await settle();
  sockets[0].receive(event(4)); sockets[0].receive(event(6));
  await timers.tick(1000); await settle(); // the fill's request hangs (a dead link)
  c.close(); c.connect(); await flush();
  assert.equal(reads[0].aborted, true);
  assert.equal(c.streams.get("project:1").filling, false);
  hang = false;
  sockets[1].open();
  ok(sockets[1], sockets[1].last("subscribe"), { seq: 6, epoch: "e", recovered: true });
  for (const seq of [5, 6, 7, 9]) sockets[1].receive(event(seq)); // the replay, then 8 lost
  await timers.tick(1000); await settle();
  assert.deepEqual(seen, [4, 5, 6, 7, 8, 9]);
  assert.equal(reads.length, 2);
  c.close();
});

test("close() aborts a joining handle's hung feed read: after connect() the handle resets and gets the later events", async () => {
  const reads = [];
  const fetch = (url, init) => { reads.push(init.signal); return new Promise(() => {}); };
  const { c, sockets } = client({ fetch });
  c.subscribe("project:1", {});
  c.connect(); await flush(); sockets[0].open();
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 300, epoch: "e", recovered: false }); await settle();
  const seen = [], resets = [];
  c.subscribe("project:1", { since: 100, onEvent: (f) => seen.push(f.seq), onReset: (r) => resets.push(r.seq) });
  await flush();
  c.close(); c.connect(); await flush();
  assert.equal(reads[0].aborted, true);
  sockets[1].open();
  ok(sockets[1], sockets[1].last("subscribe"), { seq: 300, epoch: "e", recovered: true });
  for (let seq = 301; seq <= 303; seq++) sockets[1].receive(event(seq));
  assert.deepEqual(resets, [300]); // what it missed could not be read: it refetches
  assert.deepEqual(seen, [301, 302, 303]);
  c.close();
});

test("a new tab's hello is answered to it alone: the other followers do not subscribe again", async () => {
  const { make, sockets } = tabs();
  const leader = make().connect();
  const follower = make().connect();
  await settle();
  sockets[0].open(); await settle();
  let presence = 0;
  follower.subscribe("project:1", { onPresence: () => (presence += 1), onReset: () => assert.fail("no reset") });
  await settle();
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 4, epoch: null, recovered: false, presence: [{ user: { id: 1 }, since: "t" }] });
  await settle();
  assert.equal(presence, 1);
  let forwarded = 0;
  const hears = leader._leaderHears.bind(leader);
  leader._leaderHears = (m) => { if (m.kind === "frame" && m.frame.op === "subscribe") forwarded += 1; return hears(m); };
  const later = [];
  for (let i = 0; i < 3; i++) { later.push(make().connect()); await settle(); }
  assert.equal(forwarded, 0);
  assert.equal(presence, 1);
  const seen = [];
  later[2].subscribe("project:1", { onEvent: (f) => seen.push(f.seq) }); // the new tab follows through the leader
  await settle();
  sockets[0].receive(event(5)); await settle();
  assert.deepEqual(seen, [5]);
  assert.equal(sockets.length, 1);
  for (const tab of [leader, follower, ...later]) tab.close();
});

test("a handle joining from past the stream's position gets only the events after its since", async () => {
  const { c, sockets } = client();
  const first = [];
  c.subscribe("project:1", { onEvent: (f) => first.push(f.seq) });
  c.connect(); await flush(); sockets[0].open();
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 98, epoch: "e", recovered: false }); await settle();
  const seen = [];
  c.subscribe("project:1", { since: 100, onEvent: (f) => seen.push(f.seq) }); // a snapshot() read at 100
  for (const seq of [99, 100, 101, 102]) sockets[0].receive(event(seq));
  await settle();
  assert.deepEqual(seen, [101, 102]);
  assert.deepEqual(first, [99, 100, 101, 102]);
  c.close();
});

test("a handler that calls close() stops the frame for the stream's other handlers and event listeners", async () => {
  const { c, sockets } = client();
  const calls = [];
  c.on("event", (f) => { calls.push(["listener 1", f.seq]); if (f.seq === 5) c.close(); });
  c.on("event", (f) => calls.push(["listener 2", f.seq]));
  c.subscribe("project:1", { onEvent: (f) => { calls.push(["A", f.seq]); if (f.seq === 4) c.close(); } });
  c.subscribe("project:1", { onEvent: (f) => calls.push(["B", f.seq]) });
  c.connect(); await flush(); sockets[0].open();
  ok(sockets[0], sockets[0].last("subscribe"), { seq: 3, epoch: "e", recovered: false }); await settle();
  sockets[0].receive(event(4));
  assert.deepEqual(calls, [["listener 1", 4], ["listener 2", 4], ["A", 4]]);
  c.connect(); await flush(); sockets[1].open();
  ok(sockets[1], sockets[1].last("subscribe"), { seq: 5, epoch: "e", recovered: true });
  sockets[1].receive(event(5));
  assert.deepEqual(calls.slice(3), [["listener 1", 5]]);
  c.close();
});
