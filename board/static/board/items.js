// The board's items as the page holds them. Events and REST answers arrive in any order, so
// each item keeps its highest `version` (board/models.py bumps it on every save) and a
// deleted id is remembered: a late answer or a stale event cannot bring either back.

/** True when `incoming` is older than `held` (or, for a pending local change, not newer). */
function older(incoming, held) {
  if (held == null || held.version == null || incoming.version == null) return false;
  // A pending item is the held version plus the user's change: only a newer one replaces it.
  return held.pending ? incoming.version <= held.version : incoming.version < held.version;
}

export class BoardItems {
  constructor() {
    this.items = new Map(); // id (or temp id) -> item
    this.deleted = new Set(); // ids the server deleted: never shown again (ids are not reused)
    this.deleting = new Map(); // id -> its newest server state, while our own delete is pending
    this.touched = new Map(); // id -> clock when the server last said something about it
    this.adding = new Map(); // correlation id of a pending create -> its temp id
    this.clock = 0;
  }

  get(id) {
    return this.items.get(id);
  }

  values() {
    return this.items.values();
  }

  /** The server's state of an item (an event or a REST answer); false if it was dropped. */
  put(item) {
    if (this.deleted.has(item.id)) return false;
    this.touched.set(item.id, ++this.clock);
    if (this.deleting.has(item.id)) {
      if (!older(item, this.deleting.get(item.id))) this.deleting.set(item.id, item);
      return false; // hidden until the delete is answered
    }
    if (older(item, this.items.get(item.id))) return false;
    this.items.set(item.id, item);
    return true;
  }

  /** The server deleted it: gone for good. */
  remove(id) {
    this.deleted.add(id);
    this.deleting.delete(id);
    this.touched.set(id, ++this.clock);
    return this.items.delete(id);
  }

  /** An event frame of the project's stream; false if it changed nothing. */
  apply(frame) {
    const data = frame.data || {};
    if (frame.type === "v1:item.deleted") return this.remove(data.id);
    if (frame.type === "v1:item.created" && this.adding.has(frame.correlationId)) {
      // Our own create, echoed before its answer: the item takes the temp item's place.
      this.forget(this.adding.get(frame.correlationId));
      this.put(data);
      return true;
    }
    if (frame.type === "v1:item.created" || frame.type === "v1:item.updated") return this.put(data);
    return false;
  }

  /**
   * A local change shown before the server answers (a temp item, or an edit of one). A temp
   * item made by a request with `correlationId` gives way to the first `item.created` event
   * that carries it, should that come before the answer.
   */
  local(id, item, correlationId = null) {
    this.items.set(id, { ...item, pending: true });
    if (correlationId !== null) this.adding.set(correlationId, id);
  }

  /** Forget a temp item (its server copy arrives through `put`, or has already). */
  forget(id) {
    this.items.delete(id);
    for (const [correlationId, temp] of this.adding) if (temp === id) this.adding.delete(correlationId);
  }

  /** Undo a refused local edit, unless the server said something newer meanwhile. */
  rollback(id, before) {
    if (this.deleted.has(id)) return;
    const held = this.items.get(id);
    if (held && !held.pending) return; // an event replaced the local change: it is newer
    this.items.set(id, before);
  }

  /** Our own delete: hide the item until the server answers. */
  hide(id) {
    const item = this.items.get(id);
    if (!item) return;
    this.deleting.set(id, item);
    this.items.delete(id);
  }

  /** Our delete was refused: show the newest state seen meanwhile, unless someone deleted it. */
  unhide(id) {
    const item = this.deleting.get(id);
    this.deleting.delete(id);
    if (item && !this.deleted.has(id)) this.items.set(id, item);
  }

  /** The clock before a refetch, for `load`. */
  mark() {
    return this.clock;
  }

  /**
   * A REST list: take each item (by the same rules as `put`); with `since` (a `mark()` taken
   * before the request), also drop the held items it lacks that no event touched meanwhile.
   */
  load(list, since = null) {
    const listed = new Set();
    for (const item of list) {
      listed.add(item.id);
      this.put(item);
    }
    if (since === null) return;
    for (const [id, item] of [...this.items]) {
      if (listed.has(id) || item.pending || (this.touched.get(id) ?? 0) > since) continue;
      this.items.delete(id);
    }
  }
}
