// Unit tests of the demo board's item store (board/static/board/items.js): versions and deletions.
// Run: node --experimental-detect-module --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";

import { BoardItems } from "../../board/static/board/items.js";

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
