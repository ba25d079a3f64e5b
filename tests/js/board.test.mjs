// Unit tests of the demo board: its item store (board/static/board/items.js), versions and
// deletions, and its page script (board.js) adding an item optimistically.
// Run: node --experimental-detect-module --test tests/js/
import { register } from "node:module";
import { test } from "node:test";
import assert from "node:assert/strict";

import { BoardItems } from "../../board/static/board/items.js";
import { RealtimeClient } from "../../realtime/static/realtime/realtime.js";

const item = (id, version, extra = {}) => ({ id, title: `v${version}`, done: false, position: 0, version, ...extra });
const updated = (data) => ({ op: "event", type: "v1:item.updated", data });
const deleted = (id, version) => ({ op: "event", type: "v1:item.deleted", data: { id, version } });

test("a late PATCH answer does not bring back an older version than an event already did", () => {
  const items = new BoardItems();
  items.load([item(1, 1)]);
  const before = items.get(1);
  items.local(1, { ...before, title: "mine" }); // optimistic edit, waiting for the server
  assert.equal(items.apply(updated(item(1, 2, { title: "mine" }))), true); // our own echo
  assert.equal(items.apply(updated(item(1, 3, { title: "theirs" }))), true); // another user, after
  assert.equal(items.put(item(1, 2, { title: "mine" })), false); // our PATCH's answer, late
  assert.equal(items.get(1).title, "theirs");
  assert.equal(items.get(1).version, 3);
  assert.equal(items.apply(updated(item(1, 1))), false); // a stale event too
  assert.equal(items.get(1).version, 3);
});

test("a stale event does not replace a pending local change; a newer one does", () => {
  const items = new BoardItems();
  items.load([item(1, 4)]);
  items.local(1, { ...items.get(1), done: true });
  assert.equal(items.apply(updated(item(1, 4))), false); // same version: what we changed from
  assert.equal(items.get(1).pending, true);
  assert.equal(items.apply(updated(item(1, 5, { done: true }))), true);
  assert.equal(items.get(1).pending, undefined);
});

test("an item deleted by another user is not re-added by a late answer or a stale event", () => {
  const items = new BoardItems();
  items.load([item(1, 1), item(2, 1)]);
  items.local(1, { ...items.get(1), title: "mine" });
  items.apply(deleted(1, 1));
  assert.equal(items.get(1), undefined);
  assert.equal(items.put(item(1, 2, { title: "mine" })), false); // the PATCH answer, late
  assert.equal(items.apply(updated(item(1, 9))), false);
  assert.equal(items.apply({ op: "event", type: "v1:item.created", data: item(1, 1) }), false);
  items.load([item(1, 1), item(2, 1)]); // a list read before the delete
  assert.deepEqual([...items.values()].map((i) => i.id), [2]);
});

test("a refused edit rolls back, unless the item changed or went meanwhile", () => {
  const items = new BoardItems();
  items.load([item(1, 1), item(2, 1), item(3, 1)]);
  for (const id of [1, 2, 3]) items.local(id, { ...items.get(id), title: "mine" });
  items.rollback(1, item(1, 1)); // nothing came: back to what it was
  assert.equal(items.get(1).title, "v1");
  items.apply(updated(item(2, 2, { title: "theirs" })));
  items.rollback(2, item(2, 1)); // refused (412): the newer event stays
  assert.equal(items.get(2).title, "theirs");
  items.apply(deleted(3, 1));
  items.rollback(3, item(3, 1)); // refused (404): it stays deleted
  assert.equal(items.get(3), undefined);
});

test("our own delete hides the item; refused, it shows the newest state, unless someone deleted it", () => {
  const items = new BoardItems();
  items.load([item(1, 1), item(2, 1), item(3, 1)]);
  items.hide(1);
  assert.equal(items.apply(updated(item(1, 2))), false); // an edit while our delete is pending
  assert.equal(items.get(1), undefined);
  items.unhide(1); // refused
  assert.equal(items.get(1).version, 2);
  items.hide(2);
  items.apply(deleted(2, 1));
  items.unhide(2);
  assert.equal(items.get(2), undefined);
  items.hide(3);
  items.remove(3); // accepted
  assert.equal(items.put(item(3, 1)), false);
  assert.equal(items.get(3), undefined);
});

test("a refetch drops what the list lacks, but keeps what events brought during the request", () => {
  const items = new BoardItems();
  items.load([item(1, 1), item(2, 1)]);
  items.local("tmp-1", { id: "tmp-1", title: "adding", position: 9 });
  const since = items.mark();
  items.apply({ op: "event", type: "v1:item.created", data: item(3, 1) }); // after the list was read
  items.apply(updated(item(2, 3))); // newer than the list's copy
  items.load([item(2, 2)], since); // 1 was deleted before the list was read
  assert.deepEqual([...items.values()].map((i) => [i.id, i.version ?? null]).sort(), [
    [2, 3],
    [3, 1],
    ["tmp-1", null],
  ]);
});

test("our own created event replaces the temp item it was made for; another's does not", () => {
  const items = new BoardItems();
  items.local("tmp-1", { id: "tmp-1", title: "mine", position: 0 }, "c1");
  const created = (data, correlationId) => ({ op: "event", type: "v1:item.created", data, correlationId });
  assert.equal(items.apply(created(item(8, 1, { title: "theirs" }), "c2")), true);
  assert.deepEqual([...items.values()].map((i) => i.id).sort(), [8, "tmp-1"]);
  assert.equal(items.apply(created(item(7, 1, { title: "mine" }), "c1")), true);
  assert.deepEqual([...items.values()].map((i) => i.id).sort(), [7, 8]);
  items.forget("tmp-1"); // the answer, or a failure after the server made it: the item stays
  assert.equal(items.put(item(7, 1, { title: "mine" })), true);
  assert.deepEqual([...items.values()].map((i) => i.id).sort(), [7, 8]);
  items.remove(7);
  assert.equal(items.apply(created(item(7, 1), "c1")), false); // forgotten with the temp item
});

// -- the page script (board.js) with a fake DOM, and the real client on a fake socket ------

// board.js imports the page's shared client from "/static/realtime/page.js": each import of
// board.js (a fresh `?n` each time) gets the client of `globalThis.boardPage` instead.
register(
  "data:text/javascript," +
    encodeURIComponent(`export async function resolve(specifier, context, next) {
      if (specifier !== "/static/realtime/page.js") return next(specifier, context);
      const url = "data:text/javascript,export const client = globalThis.boardPage.client; //" + encodeURIComponent(context.parentURL);
      return { url, shortCircuit: true };
    }`),
);

class FakeElement {
  constructor(parts = {}) {
    this.parts = parts;
    this.dataset = {};
    this.children = [];
    this.listeners = {};
    this.value = "";
  }
  querySelector(selector) {
    return this.parts[selector] || null;
  }
  addEventListener(type, listener) {
    (this.listeners[type] ||= []).push(listener);
  }
  dispatch(type) {
    for (const listener of this.listeners[type] || []) listener({ preventDefault() {} });
  }
  setAttribute() {}
  append(...nodes) {
    this.children.push(...nodes);
  }
  replaceChildren(...nodes) {
    this.children = nodes;
  }
}

class FakeSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.last = this;
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000) {
    this.readyState = 3;
    this.onclose?.({ code });
  }
  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
}

const flush = () => new Promise((resolve) => setImmediate(resolve));
let pages = 0;

/** The board of project 1, loaded and live; `posts` holds the POSTs it made, each to answer. */
async function boardPage() {
  const posts = [];
  const fetch = (url, init = {}) => {
    if ((init.method || "GET") === "GET") {
      const headers = { get: (h) => (h === "X-Stream-Position" ? "project:1=0" : null) };
      return Promise.resolve({ ok: true, status: 200, headers, json: async () => [] });
    }
    return new Promise((resolve) => posts.push({ url, init, resolve }));
  };
  const client = new RealtimeClient({
    baseUrl: "http://testserver",
    WebSocket: FakeSocket,
    fetch,
    setTimeout: () => 0, // no timer fires in these tests
    clearTimeout: () => {},
    shareTabs: false,
    document: { cookie: "" },
  });
  client.connect();
  await flush();
  const socket = FakeSocket.last;
  socket.readyState = 1;
  socket.onopen?.();
  socket.receive({ op: "welcome", connectionId: "c", protocol: "v1", heartbeat: 25 });

  const list = new FakeElement();
  const renders = []; // the item ids shown by each render, in order
  list.replaceChildren = (...nodes) => {
    list.children = nodes;
    renders.push(nodes.map((li) => String(li.dataset.id)));
  };
  const input = new FakeElement();
  const form = new FakeElement({ "input[name=title]": input });
  const root = new FakeElement({
    "[data-items]": list,
    "[data-message]": new FakeElement(),
    "[data-add]": form,
    "[data-presence]": new FakeElement(),
    "[data-typing]": new FakeElement(),
  });
  root.dataset = { project: "1", user: "5" };
  globalThis.document = {
    querySelector: (selector) => (selector === "[data-board]" ? root : null),
    createElement: () => new FakeElement(),
  };
  globalThis.boardPage = { client };
  const loaded = import(`../../board/static/board/board.js?${++pages}`);
  let subscribe;
  while (!(subscribe = socket.sent.find((f) => f.op === "subscribe"))) await flush(); // modules load

  socket.receive({ op: "reply", ref: subscribe.ref, ok: true, data: { seq: 0, epoch: "e", recovered: true, presence: [] } });
  await loaded;
  const add = async (title) => {
    input.value = title;
    form.dispatch("submit");
    await flush();
  };
  const created = (data, correlationId) =>
    socket.receive({ op: "event", stream: "project:1", seq: 1, eventId: "e1", type: "v1:item.created", data, correlationId });
  const answer = (post, status, data) =>
    post.resolve({ ok: status < 300, status, headers: { get: () => null }, text: async () => JSON.stringify(data) });
  return { client, posts, renders, root, add, created, answer, shown: () => renders.at(-1) };
}

test("board: our own created event before the POST's answer replaces the temp item, one row throughout", async () => {
  const page = await boardPage();
  await page.add("milk");
  assert.deepEqual(page.shown(), ["tmp-1"]);
  const [post] = page.posts;
  const correlationId = post.init.headers["X-Correlation-ID"];
  const from = page.renders.length;
  page.created(item(7, 1, { title: "milk" }), correlationId); // the socket is faster than HTTP
  assert.deepEqual(page.shown(), ["7"]);
  page.answer(post, 201, item(7, 1, { title: "milk" }));
  await flush();
  assert.deepEqual(page.shown(), ["7"]);
  for (const rows of page.renders.slice(from)) assert.equal(rows.length, 1, `rendered ${rows}`);
  page.client.close();
});

test("board: the POST's answer before our created event replaces the temp item; the event changes nothing", async () => {
  const page = await boardPage();
  await page.add("milk");
  const [post] = page.posts;
  const from = page.renders.length;
  page.answer(post, 201, item(7, 1, { title: "milk" }));
  await flush();
  assert.deepEqual(page.shown(), ["7"]);
  page.created(item(7, 1, { title: "milk" }), post.init.headers["X-Correlation-ID"]);
  assert.deepEqual(page.shown(), ["7"]);
  for (const rows of page.renders.slice(from)) assert.equal(rows.length, 1, `rendered ${rows}`);
  page.client.close();
});

test("board: a refused create rolls the temp item back and says why", async () => {
  const page = await boardPage();
  await page.add("milk");
  assert.deepEqual(page.shown(), ["tmp-1"]);
  page.answer(page.posts[0], 403, { detail: "You do not have permission." });
  await flush();
  assert.deepEqual(page.shown(), []);
  assert.equal(page.root.parts["[data-message]"].textContent, 'Could not add "milk": You do not have permission.');
  page.client.close();
});
