// realtime.js: the browser client of django-realtime-log, protocol v1 (docs/client.md).
// One dependency-free ES module. Every browser API it uses can be passed in, for tests.

export const STATUS = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  OFFLINE: "offline",
  SSE: "fallback-sse",
  POLLING: "fallback-polling",
});

// Close codes after which reconnecting cannot help (docs/protocol.md, section 11).
const FINAL_CLOSE = new Set([4401, 4403]);
// Close codes for frames this client sent (4400: malformed ones, 4413: one too large). Coming
// straight back would meet them again: they wait the long backoff of a 4429 (section 11).
const CLIENT_FAULT_CLOSE = new Set([4400, 4413]);
// Refusals of a subscribe for its frame itself (a stream name the server cannot read, say).
// Sent again on each connection, every one would count towards MALFORMED_LIMIT and a 4400.
const MALFORMED = new Set(["invalid_frame", "invalid_stream", "unsupported_version"]);

// Queued publishes go out at most FLUSH_BATCH every FLUSH_EVERY ms: the server takes
// PUBLISH_BURST (20) at once and PUBLISH_RATE (10) a second, per socket and per user, refuses
// the rest with `rate_limited`, and closes with 4429 past ABUSE_LIMIT (50) refusals.
const FLUSH_BATCH = 10;
const FLUSH_EVERY = 1000;

// Logged events kept per stream after delivery, for a handle that joins from an earlier
// position (a snapshot() whose GET was on its way while they were delivered).
const HISTORY = 100;

// Typing indicators: of those queued, only the newest per stream and type is still true.
const TYPING = /^v[0-9]+:typing\./;
// A typing indicator the others see for a while only (the server adds `expiresIn`): one
// queued for longer than that (`typingExpires`) says nothing true any more.
const TYPING_STARTED = /^v[0-9]+:typing\.started$/;

// An event version, as the server accepts one (`unsupported_version` otherwise).
const VERSION = /^v[1-9][0-9]{0,3}$/;

// A correlation id as the server takes one (realtime/context.py): it replaces any other with
// one of its own, and no event would carry the id the page waits for.
const CORRELATION_ID = /^[A-Za-z0-9._:@/+=-]{1,128}$/;

/**
 * Exponential backoff with equal jitter: a random delay in [step / 2, step), where step is
 * min(cap, base * 2^attempt): 1, 2, 4, 8 … s up to 30 s, each spread over its upper half.
 * Never 0, so a server that fails every connect at once is not retried in a tight loop, and
 * spread enough that the clients of a restarted node do not all come back together.
 */
export function backoffDelay(attempt, { base = 1000, cap = 30000, random = Math.random } = {}) {
  const step = Math.min(cap, base * 2 ** Math.max(0, attempt));
  return Math.floor(step / 2 + random() * (step / 2));
}

/** The event feed's cursor for positions {stream: [seq, epoch]} (base64url of JSON). */
export function encodeCursor(positions) {
  const sorted = Object.keys(positions).sort();
  const payload = {};
  for (const stream of sorted) payload[stream] = positions[stream];
  const bytes = new TextEncoder().encode(JSON.stringify(payload));
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** The positions {stream: [seq, epoch]} of a cursor made by encodeCursor (or the server); {} if unreadable. */
export function decodeCursor(cursor) {
  try {
    const binary = atob(String(cursor).replace(/-/g, "+").replace(/_/g, "/"));
    const positions = JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (ch) => ch.charCodeAt(0))));
    return positions && typeof positions === "object" && !Array.isArray(positions) ? positions : {};
  } catch (_) {
    return {};
  }
}

/** Parse `X-Stream-Position` ("project:42=131, user:7=9") into {stream: seq}. */
export function parsePositions(header) {
  const positions = {};
  for (const part of (header || "").split(",")) {
    const index = part.lastIndexOf("=");
    if (index < 0) continue;
    const seq = Number(part.slice(index + 1).trim());
    if (Number.isInteger(seq)) positions[part.slice(0, index).trim()] = seq;
  }
  return positions;
}

/** A set of recent event ids with a size bound: the oldest are forgotten first. */
export class Deduper {
  constructor(limit = 5000) {
    this.limit = limit;
    this.seen = new Set();
  }
  /** True the first time an id is offered, false after. */
  fresh(id) {
    if (!id) return true;
    if (this.seen.has(id)) return false;
    this.seen.add(id);
    if (this.seen.size > this.limit) this.seen.delete(this.seen.values().next().value);
    return true;
  }
  has(id) {
    return Boolean(id) && this.seen.has(id);
  }
  /** Forget an id that was kept but never delivered, so a later copy is delivered. */
  forget(id) {
    if (id) this.seen.delete(id);
  }
}

/**
 * One stream's order: delivers logged events in seq order exactly once, buffers those that
 * arrive early, and reports a gap that does not close by itself within `gapWait` ms.
 */
export class StreamOrder {
  constructor({ seq = null, epoch = null, limit = 1000 } = {}) {
    this.seq = seq; // the last seq delivered (null: not known yet)
    this.epoch = epoch;
    this.limit = limit;
    this.pending = new Map(); // seq -> frame
  }
  /** Offer a frame; returns the frames now deliverable, in order. */
  offer(frame) {
    if (this.seq === null) this.seq = frame.seq - 1;
    if (frame.seq <= this.seq || this.pending.has(frame.seq)) return [];
    if (frame.seq !== this.seq + 1) {
      if (this.pending.size >= this.limit) return null; // too far behind: the caller resets
      this.pending.set(frame.seq, frame);
      return [];
    }
    const out = [frame];
    this.seq = frame.seq;
    while (this.pending.has(this.seq + 1)) {
      this.seq += 1;
      out.push(this.pending.get(this.seq));
      this.pending.delete(this.seq);
    }
    return out;
  }
  get hasGap() {
    return this.pending.size > 0;
  }
  /** Start again from a known position (after a reset). */
  reset(seq, epoch) {
    this.seq = seq;
    this.epoch = epoch;
    this.pending.clear();
  }
}

/** Split an SSE body into messages ({event, data, id, retry}); keeps the unfinished tail. */
export class SSEParser {
  constructor() {
    this.buffer = "";
  }
  push(text) {
    this.buffer += text.replace(/\r\n?/g, "\n");
    const messages = [];
    let end;
    while ((end = this.buffer.indexOf("\n\n")) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const message = { event: "message", data: [], id: null, retry: null, comment: false };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) {
          message.comment = true;
          continue;
        }
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") message.event = value;
        else if (field === "data") message.data.push(value);
        else if (field === "id") message.id = value;
        else if (field === "retry") message.retry = Number(value);
      }
      message.data = message.data.join("\n");
      messages.push(message);
    }
    return messages;
  }
}

function noWebsocketError() {
  return Object.assign(new Error("publishing needs the WebSocket"), { code: "no_websocket" });
}

/** A server frame the client can read at all: a JSON object. */
function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

/** A presence entry as the server lists one: `{user: {id, …}, since}`. */
function isMember(entry) {
  return isObject(entry) && isObject(entry.user) && entry.user.id != null;
}

function closedError() {
  return Object.assign(new Error("connection closed"), { code: "closed" });
}

function unsubscribedError(stream) {
  return Object.assign(new Error(`unsubscribed from ${stream}`), { code: "unsubscribed", stream });
}

function randomId() {
  const bytes = new Uint8Array(16);
  (globalThis.crypto || { getRandomValues: (b) => b.map(() => Math.floor(Math.random() * 256)) })
    .getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The client. Events (addEventListener or `on`): `status` ({status, retryIn, transport}),
 * `event` (a frame), `reset` ({stream, seq, epoch}), `error` ({code, message}), `presence`
 * ({stream, members}), `welcome`.
 */
export class RealtimeClient extends EventTarget {
  constructor(options = {}) {
    super();
    const g = globalThis;
    const base = options.baseUrl || (g.location ? g.location.origin : "http://127.0.0.1");
    this.options = {
      wsUrl: options.wsUrl || base.replace(/^http/, "ws") + "/ws/realtime/",
      sseUrl: options.sseUrl || base + "/realtime/sse/",
      feedUrl: options.feedUrl || base + "/api/realtime/events/",
      presenceUrl: options.presenceUrl || base + "/api/presence/", // + <stream>/ (read on a fallback)
      ticketUrl: options.ticketUrl || null, // POST it for ?ticket= (clients without cookies)
      // A ticket client whose `fetch` sends credentials the server's HTTP read paths accept
      // (an Authorization header): it falls back to SSE and polling, and fills gaps from the
      // feed, as a session client does. Without it a ticket client keeps to the WebSocket.
      httpFallback: options.httpFallback ?? false,
      clientVersion: options.clientVersion || "js-1",
      // The serializer version of logged events (`v2`); null: each event's primary version.
      version: options.version ?? null,
      maxQueue: options.maxQueue ?? 100,
      wsAttempts: options.wsAttempts ?? 3, // failed WebSocket tries before SSE
      sseAttempts: options.sseAttempts ?? 2, // failed SSE tries before polling
      stableAfter: options.stableAfter ?? 10000, // ms open before the backoff resets
      limitForget: options.limitForget ?? 300000, // ms without a 4429 before its backoff resets
      backoff: { base: 1000, cap: 30000, ...(options.backoff || {}) },
      gapWait: options.gapWait ?? 1000, // ms an early event waits for the missing ones
      pollVisible: options.pollVisible ?? 20, // long-poll `wait` (s) while the tab is visible
      pollHidden: options.pollHidden ?? 30000, // ms between short polls while it is hidden
      probeEvery: options.probeEvery ?? 30000, // ms between WebSocket tries while on a fallback
      // ms an SSE request may go without a byte before it counts as dead: the server writes a
      // `: heartbeat` after 15 s with nothing else to send, so two of them and 5 s to spare.
      sseTimeout: options.sseTimeout ?? 35000,
      // ms a feed request (a poll, a gap fill) may take beyond its `wait` before it is aborted.
      feedTimeout: options.feedTimeout ?? 10000,
      // ms a WebSocket try (the ticket request, the handshake and the welcome) may take before
      // it counts as failed: a hung one would otherwise stay "connecting" for good.
      connectTimeout: options.connectTimeout ?? 15000,
      dedupeLimit: options.dedupeLimit ?? 5000,
      // Tabs of one origin share one connection: a leader tab (Web Locks) holds it and feeds
      // the others over a BroadcastChannel.
      shareTabs: options.shareTabs ?? true,
      // ms a follower waits to hear a leader before it takes the lock from the silent holder.
      // The leader says it is alive every leaderWait / 3.
      leaderWait: options.leaderWait ?? 3000,
      // ms between the leader's roll calls: a follower tab that does not answer within
      // leaderWait (it crashed without saying bye) loses the streams the leader kept for it.
      tabCheck: options.tabCheck ?? 30000,
      // Retries of a subscribe (or unsubscribe) refused with `rate_limited`: a random delay
      // between half and all of min(cap, base * 2^n), one frame at a time.
      subscribeRetry: { base: 1000, cap: 30000, ...(options.subscribeRetry || {}) },
      // ms a queued `typing.started` stays worth sending: the server's TYPING_EXPIRES_MS.
      typingExpires: options.typingExpires ?? 3000,
    };
    if (this.options.version !== null && !VERSION.test(this.options.version)) {
      // The server would refuse every subscribe, and close the socket after ten.
      throw new RangeError(`version must look like "v1", got ${JSON.stringify(this.options.version)}`);
    }
    this.BroadcastChannel = options.BroadcastChannel || g.BroadcastChannel || null;
    this.locks = options.locks || (g.navigator && g.navigator.locks) || null;
    this.role = "solo"; // "solo" (own connection), "leader" or "follower"
    this.tabId = randomId();
    this.WebSocket = options.WebSocket || g.WebSocket;
    this.fetch = options.fetch || (g.fetch ? g.fetch.bind(g) : null);
    this.setTimeout = options.setTimeout || g.setTimeout.bind(g);
    this.clearTimeout = options.clearTimeout || g.clearTimeout.bind(g);
    this.random = options.random || Math.random;
    this.now = options.now || Date.now;
    this.document = options.document || g.document || null;
    this.onReset = options.onReset || null;
    // Where an exception thrown by the page's handlers goes: the browser's console and
    // `onerror`, as for an event listener's.
    this.reportError =
      options.reportError || g.reportError?.bind(g) || ((error) => queueMicrotask(() => { throw error; }));
    this.status = STATUS.IDLE;
    this.streams = new Map(); // stream -> state (see _follow)
    this.deduper = new Deduper(this.options.dedupeLimit);
    this.queue = []; // frames waiting for an open socket
    this.replies = new Map(); // ref -> {resolve, reject, frame, queuedAt}
    this.refs = 0;
    this.attempt = 0;
    this.welcomed = false; // a socket of this client was welcomed once: later ones reconnect
    // 4429s (too many connections, or abuse) in a row: each makes the next wait longer, and
    // only `limitForget` ms without one forgets them (a socket open for stableAfter does not).
    this.limitStrikes = 0;
    this.wsFailures = 0;
    this.sseFailures = 0; // SSE tries in a row that got no stream (a blocked SSE: poll instead)
    this.sseAttempt = 0; // SSE reconnects in a row without a stable stream: the backoff's exponent
    this.sseRetry = null; // the server's `retry:` (ms), the least wait before an SSE reconnect
    this.sseOpened = false; // an SSE request of this client got a stream once: later ones reconnect
    this.timers = new Set();
    // Subscribes and unsubscribes the server refused with `rate_limited`, retried in order.
    this.throttle = { jobs: [], timer: null, busy: null, attempt: 0 };
    this.pendingCorrelations = new Set();
    this.closed = true;
    this.ended = false; // closed after a connect(): nothing is sent until the next connect()
    this.transport = null;
    this.lockGeneration = 0; // a lock grant for an older generation is released at once
    this.socketGeneration = 0; // a socket opened for an older generation is dropped
    this.probeGeneration = 0; // a probe for a fallback that has stopped is dropped
    this.probeSocket = null; // the probe still connecting, if any
    this.emitting = null; // the `event` being dispatched, if any (_emitFrame)
    this._onVisibility = () => this._visibilityChanged();
  }

  on(type, listener) {
    const wrapped = (e) => listener(e.detail);
    this.addEventListener(type, wrapped);
    return () => this.removeEventListener(type, wrapped);
  }

  _emit(type, detail) {
    // dispatchEvent reports a listener's exception itself and goes on with the next one.
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /**
   * Call one of the page's handlers. Its exception is reported, not thrown: thrown here it
   * would stop the delivery, fill or subscribe under way, and events would be lost or a
   * reset faked for a bug in the page.
   */
  _call(handler, ...args) {
    try {
      return handler(...args);
    } catch (error) {
      this.reportError(error);
      return undefined;
    }
  }

  /** A server frame the client cannot use: dropped and said (an `error` event), never thrown. */
  _malformed(frame, why) {
    this._emit("error", { code: "malformed_frame", message: `a server frame was dropped: ${why}`, frame });
  }

  /**
   * Handle a server frame. One malformed in a way no check foresaw must not throw out of the
   * socket's or the stream's reader (on SSE that would end the stream): it is dropped.
   */
  _safely(frame, handle) {
    try {
      handle();
    } catch (error) {
      this._malformed(frame, error.message);
    }
  }

  /** The members of a presence list, by user id; entries without a user are left out. */
  _presenceMap(list, stream) {
    const members = list.filter(isMember);
    if (members.length < list.length) this._malformed({ stream, presence: list }, "a presence entry without a user");
    return new Map(members.map((m) => [m.user.id, m]));
  }

  _setStatus(status, extra = {}) {
    this.status = status;
    const detail = { status, transport: this.transport, ...extra };
    this._emit("status", detail);
    if (this.role === "leader") this._post({ kind: "status", detail });
  }

  _later(ms, fn) {
    const id = this.setTimeout(() => {
      this.timers.delete(id);
      fn();
    }, ms);
    this.timers.add(id);
    return id;
  }

  _cancel(id) {
    if (id == null) return;
    this.clearTimeout(id);
    this.timers.delete(id);
  }

  /**
   * A request's deadline: `ms` after it was made, or after its last `touch()`, its `signal`
   * aborts and what it `race()`s rejects with `code: "timeout"`. A half-open connection
   * neither answers nor closes, and the browser may take minutes to notice; the race also
   * ends a read that its abort does not. `parent` (the fallback's signal) aborts it as well.
   */
  _deadline(ms, parent, what) {
    const controller = new AbortController();
    let expire;
    const expired = new Promise((_, reject) => (expire = reject));
    expired.catch(() => {}); // it may expire while nothing races it
    let timer = null;
    const abort = () => {
      this._cancel(timer);
      expire(parent.reason ?? new Error("aborted"));
      controller.abort();
    };
    const deadline = {
      signal: controller.signal,
      race: (promise) => Promise.race([promise, expired]),
      touch: () => {
        this._cancel(timer);
        timer = this._later(ms, () => {
          expire(Object.assign(new Error(`${what} gave nothing for ${ms} ms`), { code: "timeout" }));
          controller.abort();
        });
      },
      clear: () => {
        this._cancel(timer);
        if (parent) parent.removeEventListener("abort", abort);
      },
    };
    deadline.touch();
    if (parent?.aborted) abort();
    else if (parent) parent.addEventListener("abort", abort, { once: true });
    return deadline;
  }

  // -- lifecycle ---------------------------------------------------------------------------

  connect() {
    if (!this.closed) return this;
    this.closed = false;
    this.ended = false;
    // A new start: the failures of the last run say nothing about the transports now.
    this.attempt = this.wsFailures = this.sseFailures = this.sseAttempt = 0;
    this.sseRetry = null;
    if (this.document && this.document.addEventListener) {
      this.document.addEventListener("visibilitychange", this._onVisibility);
    }
    if (this.options.shareTabs && this.BroadcastChannel && this.locks) {
      this._joinTabs();
    } else {
      this._openSocket();
    }
    return this;
  }

  // -- tabs sharing one connection -----------------------------------------------------------

  /** What the tabs that share a connection have in common: its URL, and the version it reads. */
  _tabKey() {
    const { wsUrl, version } = this.options;
    return version ? `${wsUrl}#${version}` : wsUrl;
  }

  _joinTabs() {
    this.role = "follower";
    this.leaderId = null;
    this.tabStreams = new Map(); // leader only: stream -> Set of follower tab ids
    this.channel = new this.BroadcastChannel(`realtime:${this._tabKey()}`);
    this.channel.onmessage = (message) => this._fromTab(message.data || {});
    this._setStatus(STATUS.CONNECTING);
    this._post({ kind: "hello" });
    this._requestLead();
    if (!this._onPageHide && globalThis.addEventListener) {
      this._onPageHide = () => this._post({ kind: "bye" });
      globalThis.addEventListener("pagehide", this._onPageHide);
    }
  }

  /**
   * Ask for the leader lock: wait in line, or (`steal`) take it from a holder that never
   * answered, such as a tab frozen or left over by an older version of this client.
   */
  _requestLead({ steal = false } = {}) {
    const generation = ++this.lockGeneration;
    this._abortLockRequest();
    const options = {};
    if (steal) options.steal = true; // the spec forbids `signal` with `steal`
    else if (globalThis.AbortController) options.signal = (this._lockAbort = new AbortController()).signal;
    if (!steal) this._awaitLeader();
    this.locks
      .request(`realtime-leader:${this._tabKey()}`, options, () => new Promise((release) => {
        if (this.closed || generation !== this.lockGeneration) return release();
        this._releaseLeadership = release;
        this._lead();
      }))
      .catch(() => {
        // Rejected while held: another tab stole the lock, so it leads now and this one follows.
        if (generation === this.lockGeneration && this.role === "leader" && !this.closed) this._stepDown();
      });
  }

  _abortLockRequest() {
    if (this._lockAbort) this._lockAbort.abort();
    this._lockAbort = null;
  }

  /** The leader's heartbeat period, and how long a follower waits for an answer to a probe. */
  _beatEvery() {
    return Math.max(1, Math.floor(this.options.leaderWait / 3));
  }

  /**
   * A follower (re)starts its wait, on joining and on every message from its leader. One that
   * hears no leader within `leaderWait` takes the lead itself. One whose leader has been silent
   * for `leaderWait` probes it first and takes over only if the probe gets no answer within
   * leaderWait / 3: a leader whose timers a hidden tab holds back still answers at once, a
   * frozen one does not.
   */
  _awaitLeader() {
    this._cancel(this.leaderTimer);
    this.leaderTimer = this._later(this.options.leaderWait, () => {
      this.leaderTimer = null;
      if (this.closed || this.role !== "follower") return;
      if (!this.leaderId) return this._requestLead({ steal: true });
      this._post({ kind: "probe" });
      this.leaderTimer = this._later(this._beatEvery(), () => {
        this.leaderTimer = null;
        if (!this.closed && this.role === "follower") this._requestLead({ steal: true });
      });
    });
  }

  /** A follower heard from a leader: frames sent to a previous one are lost with it. */
  _heardLeader(id) {
    if (this.leaderId && this.leaderId !== id) this._connectionLost();
    this.leaderId = id;
    this._awaitLeader();
  }

  /** The leader tells the followers it is alive, every leaderWait / 3. */
  _beatTabs() {
    this._cancel(this.beatTimer);
    this.beatTimer = this._later(this._beatEvery(), () => {
      this.beatTimer = null;
      if (this.closed || this.role !== "leader") return;
      this._post({ kind: "alive" });
      this._beatTabs();
    });
  }

  _post(message) {
    if (this.channel) this.channel.postMessage({ ...message, from: this.tabId });
  }

  _lead() {
    this._abortLockRequest();
    this._cancel(this.leaderTimer);
    this.leaderTimer = null;
    if (this.role === "follower") this._connectionLost(); // sent to the old leader: gone
    this.role = "leader";
    this.leaderId = this.tabId;
    this.tabStreams = new Map();
    this.goneTabs = new Set(); // tabs whose streams a roll call dropped
    this.shownTabs = new Set(); // follower tabs that are visible (they say so: _postVisibility)
    this.rollHeard = null; // tabs heard from since the roll call under way, if any
    for (const state of this.streams.values()) state.live = false;
    this.transport = null; // the old leader's, mirrored: this tab has no connection yet
    this._openSocket();
    this._post({ kind: "leader" });
    this._beatTabs();
    this._callRoll();
  }

  /**
   * Every `tabCheck` ms the leader asks its followers to answer. A tab it keeps streams for
   * that says nothing within `leaderWait` has gone without its `bye` (a crash): its streams
   * are dropped. A hidden tab still answers at once (messages are not held back like
   * timers); a frozen one that wakes later is told to subscribe again (see _leaderHears).
   */
  _callRoll() {
    this._cancel(this.rollTimer);
    this.rollTimer = this._later(this.options.tabCheck, () => {
      this.rollTimer = null;
      if (this.closed || this.role !== "leader") return;
      const called = new Set([...this.tabStreams.values()].flatMap((tabs) => [...tabs]));
      // Tabs dropped earlier are called too: one that was only frozen answers, and is told.
      if (called.size || this.goneTabs.size) {
        const heard = (this.rollHeard = new Set());
        this._post({ kind: "roll" });
        this.rollDeadline = this._later(this.options.leaderWait, () => {
          this.rollDeadline = null;
          if (this.closed || this.role !== "leader" || this.rollHeard !== heard) return;
          this.rollHeard = null;
          for (const tab of called) {
            if (heard.has(tab)) continue;
            this.shownTabs.delete(tab);
            for (const stream of [...this.tabStreams.keys()]) this._tabLeaves(tab, stream);
            if (this.goneTabs.size >= 1000) this.goneTabs.clear(); // bounded
            this.goneTabs.add(tab);
          }
        });
      }
      this._callRoll();
    });
  }

  /** The lock was stolen: give up the connection and follow the tab that holds it now. */
  _stepDown() {
    this._releaseLeadership = null; // the browser has released it already
    this._cancel(this.beatTimer);
    this._cancel(this.rollTimer);
    this._cancel(this.rollDeadline);
    this.beatTimer = this.rollTimer = this.rollDeadline = null;
    this.rollHeard = null;
    this._dropConnection();
    this._connectionLost();
    for (const [stream, state] of [...this.streams]) {
      if (state.handlers.size) continue; // followed only for other tabs: theirs to resubscribe
      this.streams.delete(stream);
      this._cancel(state.gapTimer);
    }
    this.tabStreams = new Map();
    this.role = "follower";
    this.leaderId = null;
    this._setStatus(STATUS.CONNECTING);
    this._post({ kind: "hello" });
    this._requestLead();
  }

  _fromTab(message) {
    if (this.closed) return;
    if (this.role === "leader") return this._leaderHears(message);
    // Any word from the leader says it is alive: wait for it again from now.
    if (message.from && message.from === this.leaderId && message.kind !== "bye") this._awaitLeader();
    if (message.to && message.to !== this.tabId) return; // for another tab
    switch (message.kind) {
      case "leader":
        // A (new) leader: subscribe again through it, then send what waited.
        this._heardLeader(message.from);
        this._resubscribe();
        this._flush();
        this._postVisibility();
        return;
      case "alive":
        // A heartbeat. From a leader this tab has lost track of (it said bye on pagehide and
        // came back, or its announcement was missed): follow it, as after "leader".
        if (this.leaderId) return;
        this._heardLeader(message.from);
        this._resubscribe();
        this._flush();
        this._postVisibility();
        return;
      case "roll":
        this._post({ kind: "here" }); // the leader's roll call: this tab is still here
        return;
      case "bye":
        if (message.from !== this.leaderId) return;
        // The leader left: what it was sending for us is lost; the lock goes to the next tab.
        this.leaderId = null;
        this._connectionLost();
        this._awaitLeader();
        return;
      case "status":
        // Before a new leader's "leader" message, its status: ignore an old leader's last word.
        if (this.leaderId && message.from !== this.leaderId) return;
        this._heardLeader(message.from);
        this.transport = message.detail.transport;
        this.status = message.detail.status;
        this._emit("status", message.detail);
        return;
      case "server":
        if (!message.to || message.to === this.tabId) this._frame(message.frame);
        return;
      case "presence": {
        // The leader's new subscribe reply (after its socket reconnected) lists who is present now.
        const state = this.streams.get(message.stream);
        if (!state || !Array.isArray(message.presence)) return;
        state.presence = this._presenceMap(message.presence, message.stream);
        this._presence(message.stream, state);
        return;
      }
      default:
    }
  }

  _leaderHears(message) {
    const tab = message.from;
    if (tab) {
      if (this.rollHeard) this.rollHeard.add(tab);
      // A tab whose streams a roll call dropped (it was frozen, not gone): it subscribes again,
      // from its own positions, as with a new leader.
      if (this.goneTabs.delete(tab) && message.kind !== "bye") this._post({ kind: "leader", to: tab });
    }
    if (message.kind === "hello") {
      // To the new tab alone: the others follow this leader already, and would subscribe
      // everything again (a new leader's own announcement, in _lead, is for every tab).
      this._post({ kind: "leader", to: tab });
      this._post({ kind: "status", to: tab, detail: { status: this.status, transport: this.transport } });
      return;
    }
    if (message.kind === "probe") {
      this._post({ kind: "alive" }); // a follower has not heard this leader for leaderWait
      return;
    }
    if (message.kind === "visibility") {
      const wasHidden = this._hidden();
      if (message.hidden) this.shownTabs.delete(tab);
      else if (this.shownTabs.size < 1000) this.shownTabs.add(tab); // bounded
      if (wasHidden && !this._hidden()) this._visibilityChanged(); // a tab shows: poll now, and fast
      return;
    }
    if (message.kind === "bye") {
      this.shownTabs.delete(tab);
      for (const stream of [...this.tabStreams.keys()]) this._tabLeaves(tab, stream);
      return;
    }
    if (message.kind !== "frame") return;
    const frame = message.frame;
    const answer = (reply) => this._post({ kind: "server", to: tab, frame: { op: "reply", ref: frame.ref, ...reply } });
    if (frame.op === "subscribe") {
      let tabs = this.tabStreams.get(frame.stream);
      if (!tabs) this.tabStreams.set(frame.stream, (tabs = new Set()));
      tabs.add(tab);
      // Follow it here for the tab (no handler of this page's own), from the tab's position.
      // A stream made for it is subscribed from that position: the server judges it, and a
      // reset it answers reaches the tab too (_serverReset).
      const judged = !this.streams.has(frame.stream);
      const state = this._follow(frame.stream, { since: frame.since ?? null, epoch: frame.epoch ?? null });
      const reply = (error) => {
        const s = this.streams.get(frame.stream);
        if (error) return answer({ ok: false, error: { code: error.code || "error", message: error.message } });
        const seq = s ? s.order.seq : null; // null: not known yet (a fallback that started "now")
        const epoch = s ? s.order.epoch : null;
        answer({
          ok: true,
          data: {
            seq,
            epoch,
            recovered: judged || this._resumable(frame, seq, epoch),
            shared: true,
            presence: s ? Array.from(s.presence.values()) : [],
          },
        });
      };
      reply.tab = tab;
      // Answer once the server has answered this connection's own subscribe (a rate-limited
      // one keeps the tab waiting while it is retried here).
      if (state.live) reply();
      else if (state.refused) reply(state.refused);
      else state.waiting.push(reply);
      return;
    }
    if (frame.op === "unsubscribe") {
      this._tabLeaves(tab, frame.stream);
      answer({ ok: true });
      return;
    }
    if (frame.op === "publish") {
      this.publish(frame.stream, frame.type, frame.data).then(
        (data) => answer({ ok: true, data }),
        (error) => answer({ ok: false, error: { code: error.code || "error", message: error.message } }),
      );
    }
  }

  /**
   * Can a follower's subscribe resume from this leader's position, as the server would judge
   * it (protocol.md, section 5): not from another epoch, nor, without an epoch to compare,
   * from past the leader's seq. In one epoch the log only grows, so a leader behind the
   * follower (its next events still on their way) catches up and loses nothing for it.
   * A position this leader does not know yet (a fallback that started "now") judges nothing.
   */
  _resumable(frame, seq, epoch) {
    if (frame.since == null || seq === null) return true;
    if (frame.epoch && epoch) return frame.epoch === epoch;
    return frame.since <= seq;
  }

  _tabLeaves(tab, stream) {
    const tabs = this.tabStreams.get(stream);
    if (!tabs || !tabs.delete(tab)) return;
    if (tabs.size) return;
    this.tabStreams.delete(stream);
    const state = this.streams.get(stream);
    if (state && !state.handlers.size) this._drop(stream, state);
  }

  close() {
    this._end();
    this._setStatus(STATUS.OFFLINE, { reason: "closed" });
  }

  /**
   * Stop for good (close(), or a close code reconnecting cannot fix): release the leader
   * lock and the tab channel so another tab can lead, and fail every frame still waiting.
   */
  _end() {
    this.closed = true;
    this.ended = true;
    this._stopFrame();
    this.lockGeneration += 1; // a grant still to come is released at once
    this._abortLockRequest();
    if (this._releaseLeadership) this._releaseLeadership();
    this._releaseLeadership = null;
    if (this.channel) {
      this._post({ kind: "bye" });
      this.channel.close();
      this.channel = null;
    }
    if (this._onPageHide && globalThis.removeEventListener) {
      globalThis.removeEventListener("pagehide", this._onPageHide);
    }
    this._onPageHide = null;
    this._dropConnection();
    for (const id of this.timers) this.clearTimeout(id);
    this.timers.clear();
    this.limitStrikes = 0; // its timer is gone with the others: forget the 4429s now
    if (this.document && this.document.removeEventListener) {
      this.document.removeEventListener("visibilitychange", this._onVisibility);
    }
    // Nothing will be sent any more: each waiting frame fails now, once, and is forgotten.
    this.queue = [];
    this._clearThrottle();
    const waiting = [...this.replies.values()];
    this.replies.clear();
    for (const pending of waiting) pending.reject(closedError());
    for (const [stream, state] of this.streams) {
      state.live = state.onServer = false;
      state.gapTimer = null; // cleared with the other timers: a later gap arms it again
      this._stopReads(stream, state);
      this._settleReaders(state, closedError()); // each handle's `ready` still pending
    }
    this.role = "solo";
    this.leaderId = null;
  }

  /**
   * Stop the stream's feed reads under way (a gap fill, a joining handle's): their deadlines
   * went with the other timers, and one that hangs would hold the stream for good. A handle
   * whose read stops resets at the stream's position before its next event.
   */
  _stopReads(stream, state) {
    if (state.fillAbort) state.fillAbort.abort();
    state.fillAbort = null;
    state.filling = false;
    for (const h of state.handlers) {
      if (!h.reading) continue;
      h.reading.abort.abort();
      Object.assign(h, { reading: null, backlog: null, reset: { stream, seq: state.order.seq, epoch: state.order.epoch } });
    }
  }

  /** Close the socket (and one still connecting) without the reconnect that follows a close. */
  _dropConnection() {
    this.socketGeneration += 1;
    this._cancel(this.retryTimer);
    this._cancel(this.watchdog);
    this._cancel(this.stableTimer);
    this._stopFallback();
    for (const socket of [this.socket, this.connecting]) if (socket) this._forget(socket);
    this.socket = this.connecting = null;
    this.transport = null;
  }

  /** Close a socket without the reconnect that follows a close. */
  _forget(socket, code = 1000) {
    socket.onclose = socket.onmessage = socket.onerror = socket.onopen = null;
    if (this.connecting === socket) this.connecting = null;
    try {
      socket.close(code);
    } catch (_) {
      /* already closed */
    }
  }

  /**
   * The connection the sent frames went out on is gone: each fails with `closed` (the server
   * may or may not have acted on it; it is never resent). Frames still queued stay queued,
   * their promises pending, until a later connection sends them.
   */
  _connectionLost() {
    const queued = new Set(this.queue);
    for (const [ref, pending] of this.replies) {
      if (queued.has(pending.frame)) continue;
      this.replies.delete(ref);
      // A subscribe is sent again on the next connection, with a new ref; the handles'
      // `ready` promises wait for that one.
      if (pending.frame.op !== "subscribe") pending.reject(closedError());
    }
    this._clearThrottle(); // the next connection starts with a fresh bucket and no subscription
    for (const state of this.streams.values()) state.live = state.onServer = state.resuming = false;
  }

  // -- WebSocket ----------------------------------------------------------------------------

  /**
   * The socket's URL, with a fresh ticket when `ticketUrl` is set. Without a ticket the server
   * closes 4401, which ends the client, so a failed ticket request fails the try instead (a
   * retry with backoff); only a 401 or 403 from the ticket endpoint is final, as 4401/4403.
   */
  async _socketUrl(signal) {
    const url = new URL(this.options.wsUrl);
    url.searchParams.set("v", this.options.clientVersion);
    // For the server's reconnect rate: a storm of clients coming back, not new users.
    if (this.welcomed) url.searchParams.set("reconnect", "1");
    if (this.options.ticketUrl && this.fetch) {
      const response = await this.fetch(this.options.ticketUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: this._csrfHeaders(),
        signal,
      });
      if (!response.ok) {
        throw Object.assign(new Error(`ticket answered ${response.status}`), { status: response.status });
      }
      const ticket = (await response.json()).ticket;
      if (!ticket) throw new Error("no ticket in the answer");
      url.searchParams.set("ticket", ticket);
    }
    return url.toString();
  }

  async _openSocket({ probe = false } = {}) {
    if (this.closed || !this.WebSocket) return;
    const generation = this.socketGeneration;
    if (!probe) this._setStatus(this.attempt ? STATUS.RECONNECTING : STATUS.CONNECTING);
    const probing = this.probeGeneration;
    let socket = null;
    let timedOut = false;
    // A timed-out ticket request is aborted: tries that each left one open would pile up
    // against the browser's connections per host and stall the page's own requests.
    const ticketAbort = globalThis.AbortController ? new AbortController() : null;
    // A probe whose fallback stopped meanwhile (the WebSocket is being retried) is not needed.
    const stale = () =>
      timedOut || this.closed || generation !== this.socketGeneration || (probe && probing !== this.probeGeneration);
    // A try that hangs (a ticket request or a handshake with no answer, no open and no close)
    // fails after connectTimeout, as a close would: the next try, or the fallback, follows.
    const timeout = this._later(this.options.connectTimeout, () => {
      // Not after a newer try took over (it closed this socket: one at a time).
      if (stale() || (socket && this.connecting !== socket)) return;
      timedOut = true;
      if (ticketAbort) ticketAbort.abort();
      if (socket) this._forget(socket);
      if (socket && this.probeSocket === socket) this.probeSocket = null;
      this._socketFailed(null, probe);
    });
    let url;
    try {
      url = await this._socketUrl(ticketAbort ? ticketAbort.signal : undefined);
    } catch (error) {
      if (stale()) return this._cancel(timeout);
      this._cancel(timeout);
      if (error.status === 401 || error.status === 403) return this._refused(error.status === 401 ? 4401 : 4403);
      return this._socketFailed(null, probe);
    }
    if (stale()) return this._cancel(timeout);
    if (this.connecting) this._forget(this.connecting); // an older try still connecting: one at a time
    try {
      socket = new this.WebSocket(url);
    } catch (error) {
      this._cancel(timeout);
      return this._socketFailed(null, probe);
    }
    this.connecting = socket;
    if (probe) this.probeSocket = socket;
    let promoted = false; // welcomed: this socket became the connection
    socket.onopen = () => {};
    socket.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (_) {
        return this._malformed(message.data, "not JSON");
      }
      if (!isObject(frame)) return this._malformed(frame, "not an object");
      if (frame.op === "welcome") {
        this._cancel(timeout);
        promoted = true;
        if (this.connecting === socket) this.connecting = null;
        if (probe) this._stopFallback();
        this.socket = socket;
        this.transport = "websocket";
        this.welcomed = true;
        this.wsFailures = 0;
        this.sseFailures = this.sseAttempt = 0;
        this.heartbeat = (Number(frame.heartbeat) > 0 ? Number(frame.heartbeat) : 25) * 1000;
        this._setStatus(STATUS.OPEN);
        this._emit("welcome", frame);
        this._watchdog();
        this._cancel(this.stableTimer);
        this.stableTimer = this._later(this.options.stableAfter, () => (this.attempt = 0));
        this._resubscribe();
        this._flush();
        return;
      }
      this._watchdog();
      this._safely(frame, () => this._frame(frame));
    };
    socket.onclose = (event) => {
      this._cancel(timeout);
      if (this.socket === socket) this.socket = null;
      if (this.connecting === socket) this.connecting = null;
      if (this.probeSocket === socket) this.probeSocket = null;
      if (promoted) {
        this._cancel(this.watchdog);
        this._cancel(this.stableTimer);
        // Only a welcomed socket carried frames; a failed try leaves the queue pending.
        this._connectionLost();
      }
      if (this.closed) return;
      if (FINAL_CLOSE.has(event.code)) return this._refused(event.code);
      this._socketFailed(event.code, probe && !promoted, promoted);
    };
    socket.onerror = () => {
      /* onclose follows */
    };
  }

  /**
   * A 4401 or 4403 (or a 401 or 403 from the ticket endpoint, a 401 from SSE or the feed):
   * reconnecting cannot help.
   */
  _refused(code) {
    this._setStatus(STATUS.OFFLINE, { code }); // followers see it too
    this._emit("error", {
      code: code === 4401 ? "unauthenticated" : "forbidden",
      message: `the server refused the connection (${code})`,
    });
    this._end();
  }

  _socketFailed(code, probe, wasOpen = false) {
    if (this.closed) return;
    if (probe) return this._scheduleProbe();
    // A close code of the server's own (4000-4999: 4429 before the welcome, say) proves the
    // WebSocket gets through; only a try that never reached the server hints at a blocked one.
    const fromServer = code >= 4000 && code < 5000;
    if (!wasOpen && !fromServer) this.wsFailures += 1;
    // A ticket client without `httpFallback` has nothing SSE and the feed would take.
    if (this.wsFailures >= this.options.wsAttempts && this.fetch && this._httpReads()) return this._startSSE();
    let delay = backoffDelay(this.attempt, { ...this.options.backoff, random: this.random });
    this.attempt += 1;
    if (code === 4429 || CLIENT_FAULT_CLOSE.has(code)) delay = Math.max(delay, this._limitedDelay());
    this._setStatus(STATUS.RECONNECTING, { retryIn: delay, code });
    this.retryTimer = this._later(delay, () => this._openSocket());
  }

  /**
   * The long backoff after a 4429: between half and all of min(cap, 4 s × 2^n) for the n-th
   * in a row (2–4 s, 4–8 s … 15–30 s), n forgotten after `limitForget` ms without one.
   */
  _limitedDelay() {
    const { base, cap } = this.options.backoff;
    const ceiling = Math.min(cap, base * 4 * 2 ** this.limitStrikes);
    this.limitStrikes += 1;
    this._cancel(this.limitTimer);
    this.limitTimer = this._later(this.options.limitForget, () => (this.limitStrikes = 0));
    return Math.floor(ceiling / 2 + (this.random() * ceiling) / 2);
  }

  _watchdog() {
    // The server pings every `heartbeat`; silence for two intervals means a dead link.
    this._cancel(this.watchdog);
    this.watchdog = this._later(2 * this.heartbeat + 1000, () => {
      // On a dead link the browser may fire onclose only minutes later: forget the socket and
      // go through its close path now, as a heartbeat timeout.
      const socket = this.socket;
      if (!socket) return;
      const onclose = socket.onclose;
      this._forget(socket, 4000);
      if (onclose) onclose({ code: 4408 });
    });
  }

  _send(frame) {
    if (this.role === "follower") {
      if (!this.leaderId || !this.channel) return false;
      this.channel.postMessage({ kind: "frame", from: this.tabId, frame });
      return true;
    }
    if (this.socket && this.socket.readyState === 1) {
      this.socket.send(JSON.stringify(frame));
      const pending = frame.ref && this.replies.get(frame.ref);
      if (pending) {
        // Moved to the end: the sent frames are kept in the order they were sent, which is the
        // order of their replies (see _oldestSent).
        this.replies.delete(frame.ref);
        this.replies.set(frame.ref, Object.assign(pending, { sent: true }));
      }
      return true;
    }
    return false;
  }

  /** Send a frame now, or queue it until the socket is open (bounded: the oldest is dropped). */
  _enqueue(frame) {
    const control = frame.op === "subscribe" || frame.op === "unsubscribe";
    // A publish goes behind those still queued, in order and within the pace of _flush.
    if ((control || !this.queue.length) && this._send(frame)) return;
    if (control) return; // resent on (re)connect
    this.queue.push(frame);
    // A keystroke's typing frame replaces the one queued before it, so typing through an
    // outage cannot fill the queue and push out the frames that matter.
    if (frame.op === "publish" && TYPING.test(frame.type)) this._supersede();
    while (this.queue.length > this.options.maxQueue) {
      const dropped = this.queue.shift();
      const pending = this.replies.get(dropped.ref);
      if (pending) {
        this.replies.delete(dropped.ref);
        pending.reject(Object.assign(new Error("dropped from the full queue"), { code: "queue_full" }));
      }
      this._emit("error", { code: "queue_full", message: "outbound queue full: oldest frame dropped", frame: dropped });
    }
  }

  /**
   * Send what waited for a socket (or a leader): of the typing frames, no `typing.started`
   * older than `typingExpires` (they reject with `expired`) and the newest per stream and type
   * (the older ones reject with `superseded`), and the rest FLUSH_BATCH at a time, every
   * FLUSH_EVERY ms, so a long queue does not meet the server's publish limits.
   */
  _flush() {
    this._cancel(this.flushTimer);
    this.flushTimer = null;
    this._expire();
    this._supersede();
    for (let sent = 0; sent < FLUSH_BATCH && this.queue.length && this._send(this.queue[0]); sent++) this.queue.shift();
    if (this.queue.length && this._canSend()) this.flushTimer = this._later(FLUSH_EVERY, () => this._flush());
  }

  /** Drop the queued `typing.started` frames older than their useful life. */
  _expire() {
    const oldest = this.now() - this.options.typingExpires;
    const expired = (frame) => {
      const pending = frame.op === "publish" && TYPING_STARTED.test(frame.type) && this.replies.get(frame.ref);
      return Boolean(pending) && pending.queuedAt < oldest;
    };
    const stale = this.queue.filter(expired);
    if (!stale.length) return;
    this.queue = this.queue.filter((frame) => !expired(frame));
    for (const frame of stale) {
      const pending = this.replies.get(frame.ref);
      this.replies.delete(frame.ref);
      pending.reject(Object.assign(new Error("a typing indicator queued for too long"), { code: "expired" }));
    }
  }

  /** Drop the queued typing frames a newer one of the same stream and type makes stale. */
  _supersede() {
    const key = (frame) => (frame.op === "publish" && TYPING.test(frame.type) ? `${frame.stream} ${frame.type}` : null);
    const newest = new Map();
    for (const frame of this.queue) if (key(frame)) newest.set(key(frame), frame);
    const stale = this.queue.filter((frame) => key(frame) && newest.get(key(frame)) !== frame);
    if (!stale.length) return;
    this.queue = this.queue.filter((frame) => !key(frame) || newest.get(key(frame)) === frame);
    for (const frame of stale) {
      const pending = this.replies.get(frame.ref);
      if (!pending) continue;
      this.replies.delete(frame.ref);
      pending.reject(Object.assign(new Error("replaced by a newer typing frame"), { code: "superseded" }));
    }
  }

  _request(frame) {
    this.refs += 1;
    const ref = String(this.refs);
    const full = { ...frame, ref };
    return new Promise((resolve, reject) => {
      this.replies.set(ref, { resolve, reject, frame: full, queuedAt: this.now() });
      this._enqueue(full);
    });
  }

  /** The ref of the oldest frame sent on the socket whose reply has not come yet. */
  _oldestSent() {
    for (const [ref, pending] of this.replies) if (pending.sent) return ref;
    return null;
  }

  _frame(frame) {
    if (this.role === "leader" && !["ping", "reply", "reset"].includes(frame.op)) {
      this._post({ kind: "server", frame }); // events, unsubscribed: for every tab
    }
    switch (frame.op) {
      case "ping":
        this._send({ op: "pong" });
        return;
      case "reply": {
        // An error the server could not tie to its frame (`internal_error`, `too_deep`) comes
        // with `ref` null. It handles a socket's frames one at a time and replies in order
        // (protocol.md, section 2), so the reply is the oldest sent frame's still unanswered.
        const ref = frame.ref ?? (frame.ok ? null : this._oldestSent());
        const pending = ref != null && this.replies.get(ref);
        if (!pending) return;
        this.replies.delete(ref);
        if (frame.ok) pending.resolve(frame.data || {});
        else {
          const error = frame.error || { code: "error", message: "refused" };
          pending.reject(Object.assign(new Error(error.message), { code: error.code }));
        }
        return;
      }
      case "event":
        this._event(frame);
        return;
      case "reset":
        this._serverReset(frame.stream, frame.seq, frame.epoch);
        return;
      case "unsubscribed": {
        const state = this.streams.get(frame.stream);
        if (state) {
          // The server ended it (the user lost access, say): later handles learn why at once;
          // the next connection subscribes again.
          state.active = state.live = state.onServer = false;
          state.refused = Object.assign(new Error(`unsubscribed from ${frame.stream}`), { code: frame.reason, stream: frame.stream });
        }
        // A leader passes it to every tab: it is an error only in a page that follows the stream.
        if (state && state.handlers.size) {
          this._emit("error", { code: frame.reason, message: `unsubscribed from ${frame.stream}`, stream: frame.stream });
        }
        return;
      }
      default:
    }
  }

  // -- subscriptions ---------------------------------------------------------------------------

  /**
   * Follow a stream. `onEvent(frame)` gets its events in order, once each; `onReset(info)`
   * (or the client's) is called when history was lost and the app should refetch over REST.
   * `since`/`epoch` resume from a known position (see `snapshot`). Returns a handle with
   * `unsubscribe()` and `ready`: a promise of the first successful subscribe reply's data,
   * however many sockets (or leader tabs) that takes; `{}` when the stream is followed over
   * a fallback. It rejects when the subscribe is refused (not for `rate_limited`: that one
   * is retried), when the client is closed, or with code `unsubscribed` when the handle
   * unsubscribes before.
   */
  subscribe(stream, { onEvent, onReset, onPresence, since = null, epoch = null } = {}) {
    const existing = this.streams.get(stream);
    const state = this._follow(stream, { since, epoch });
    const handler = { onEvent, onReset, onPresence, backlog: null, reset: null, reading: null, joining: null, since: null };
    state.handlers.add(handler); // counted even without callbacks: the page follows the stream
    if (existing && since != null) this._join(stream, state, handler, since, epoch);
    const reader = {};
    const ready = new Promise((resolve, reject) => Object.assign(reader, { resolve, reject }));
    ready.catch(() => {});
    if (state.live) reader.resolve(state.data || {});
    else if (state.refused) reader.reject(state.refused);
    else state.readers.add(reader);
    return {
      ready,
      unsubscribe: () => {
        if (!state.handlers.delete(handler)) return; // once: a stale handle drops nothing
        if (state.readers.delete(reader)) reader.reject(unsubscribedError(stream));
        if (this.streams.get(stream) !== state) return;
        const shared = this.tabStreams && this.tabStreams.get(stream);
        if (state.handlers.size || (shared && shared.size)) return;
        this._drop(stream, state);
      },
    };
  }

  /**
   * A handle joins a stream already followed from an earlier position than the stream's: it
   * gets the events after `since` from those kept (HISTORY), or else from the event feed, for
   * it alone. They come after a turn of the event loop (so a snapshot()'s caller has its data
   * first) and before any later event. A `since` of another epoch, or one the feed cannot
   * serve, gets the handle a reset of its own instead. While the stream's position is not
   * known yet (its subscribe not answered, a fallback that started "now"), the handle waits for
   * it (_joinWaiting): the position the server then gives may well be past `since`.
   */
  _join(stream, state, handler, since, epoch) {
    const at = state.order.seq;
    if (at === null) {
      handler.joining = { since, epoch };
      return;
    }
    const sameEpoch = !epoch || !state.order.epoch || epoch === state.order.epoch;
    if (since >= at) {
      // Ahead of the stream (its snapshot() read later than the socket's delivered): the
      // events up to `since` are in its data already (_deliver skips them).
      if (sameEpoch && since > at) handler.since = since;
      return;
    }
    const missed = sameEpoch ? state.history.filter((f) => f.seq > since) : [];
    const later = () => this._later(0, () => {
      if (this._delivering(stream, state) && state.handlers.has(handler)) this._catchUp(state, handler);
    });
    if (missed.length && missed[0].seq === since + 1) {
      handler.backlog = missed;
      return later();
    }
    const reset = { stream, seq: at, epoch: state.order.epoch };
    if (!sameEpoch || !this.fetch) {
      handler.reset = reset;
      return later();
    }
    // Live events wait in the backlog, behind what the feed gives, while it is read.
    const reading = (handler.reading = { abort: new AbortController() }); // close() aborts it
    handler.backlog = [];
    const read = this._readMissed(stream, since, epoch ?? state.order.epoch, at, reading.abort.signal);
    read.catch(() => null).then((frames) => {
      if (handler.reading !== reading) return; // a reset of the stream came first, and told it
      handler.reading = null;
      if (frames) handler.backlog = frames.concat(handler.backlog);
      else Object.assign(handler, { backlog: null, reset: { ...reset, seq: state.order.seq } });
      if (this._delivering(stream, state) && state.handlers.has(handler)) this._catchUp(state, handler);
    });
  }

  /** The stream's position is known now: the handles that joined before it was catch up from their own. */
  _joinWaiting(stream, state) {
    for (const handler of state.handlers) {
      const joining = handler.joining;
      if (!joining) continue;
      handler.joining = null;
      this._join(stream, state, handler, joining.since, joining.epoch);
    }
  }

  /** The logged events after `since` up to `to`, read page by page from the feed; throws if it cannot serve them. */
  async _readMissed(stream, since, epoch, to, signal) {
    const frames = [];
    let seq = since;
    while (seq < to) {
      const body = await this._readFeed([stream], { [stream]: [seq, epoch] }, 0, { signal });
      if ((body.resets || []).some((r) => (r.stream || r) === stream)) throw new Error("reset");
      const mine = body.events.filter((f) => f.stream === stream && f.seq > seq && f.seq <= to);
      if (!mine.length || mine[0].seq !== seq + 1) throw new Error("gap");
      for (const frame of mine) {
        if (frame.seq !== seq + 1) break; // the next page goes on from here
        frames.push(frame);
        seq = frame.seq;
      }
    }
    return frames;
  }

  /** Give a joining handle what it missed (see _join), once. */
  _catchUp(state, handler) {
    if (handler.reading) return; // the feed is still being read: its events come first
    const { backlog, reset } = handler;
    handler.backlog = handler.reset = null;
    if (reset) {
      if (handler.onReset) this._call(handler.onReset, reset);
      else if (this.onReset) this._call(this.onReset, reset);
    }
    for (const frame of backlog || []) {
      if (this.closed || !state.handlers.has(handler)) return;
      if (handler.onEvent) this._call(handler.onEvent, frame);
    }
  }

  /**
   * The stream's state, made and subscribed on first use. `handlers`: this page's handles;
   * `readers`: their `ready` promises still pending; `live`: the current connection's
   * subscription is confirmed; `onServer`: the server has it or may have it (a subscribe on
   * its way); `refused`: the last refusal, final; `waiting`: other tabs' subscribes to answer
   * (leader only).
   */
  _follow(stream, { since = null, epoch = null } = {}) {
    let state = this.streams.get(stream);
    if (state) return state;
    state = {
      order: new StreamOrder({ seq: since, epoch }),
      handlers: new Set(),
      readers: new Set(),
      active: true,
      live: false,
      onServer: false,
      refused: null,
      data: null,
      presence: new Map(),
      ended: new Map(), // user id -> `since` of their newest presence seen to end
      history: [], // the last HISTORY events delivered, in order (see _join)
      gapTimer: null,
      filling: false, // a gap fill under way (_fillGap); fillAbort stops its read
      fillAbort: null,
      waiting: [],
    };
    this.streams.set(stream, state);
    if (this.role !== "follower" && this._onFallback()) this._restartFallback(); // marks it live
    else if (this._canSend()) this._control({ op: "subscribe", stream, state });
    // Else it is subscribed when a socket is welcomed or a leader heard (_resubscribe).
    return state;
  }

  _onFallback() {
    return this.transport === "sse" || this.transport === "polling";
  }

  /** Can a frame go out now: an open socket, or (a follower) a known leader. */
  _canSend() {
    if (this.role === "follower") return Boolean(this.leaderId && this.channel);
    return Boolean(this.socket && this.socket.readyState === 1);
  }

  _settleReaders(state, error, data = {}) {
    const readers = [...state.readers];
    state.readers.clear();
    for (const reader of readers) {
      if (error) reader.reject(error);
      else reader.resolve(data);
    }
  }

  _drop(stream, state) {
    this.streams.delete(stream);
    this._stopFrame(stream);
    this._cancel(state.gapTimer);
    this._settleReaders(state, unsubscribedError(stream));
    if (this.role === "follower") {
      // Always: the leader keeps the stream for this tab until told, even one refused or
      // revoked (it would subscribe it again on every reconnect).
      if (this._canSend()) this._request({ op: "unsubscribe", stream }).catch(() => {});
    } else if (this.transport === "websocket") {
      // Only a subscription the server has, or may have, is unsubscribed: a subscribe still
      // waiting for its retry is just forgotten.
      if (state.onServer && this._canSend()) this._control({ op: "unsubscribe", stream, state });
    } else if (this.transport) this._restartFallback();
  }

  // Subscribe and unsubscribe frames go through _control. The server takes both from one
  // token bucket per socket and refuses them with `rate_limited` when it is empty (and counts
  // those refusals towards closing the socket). A refused frame is retried after a backoff
  // delay, one at a time, and while any waits, new ones queue behind it in order.

  _control(job) {
    const t = this.throttle;
    if (t.busy || t.jobs.length) {
      t.jobs.push(job);
      return this._schedulePump();
    }
    this._sendJob(job);
  }

  _sendJob(job) {
    const { stream, state } = job;
    if (job.op === "unsubscribe") {
      this._request({ op: "unsubscribe", stream }).then(
        () => {
          state.onServer = false;
          this._jobDone(job, false);
        },
        (error) => {
          if (error.code === "closed") return; // the connection went, and the subscription with it
          const limited = error.code === "rate_limited" && state.onServer;
          if (!limited) state.onServer = false;
          this._jobDone(job, limited);
        },
      );
      return;
    }
    const frame = { op: "subscribe", stream };
    if (this.options.version) frame.version = this.options.version;
    if (state.order.seq !== null) {
      frame.since = state.order.seq;
      if (state.order.epoch) frame.epoch = state.order.epoch;
    }
    state.refused = null;
    state.onServer = true;
    this._request(frame).then(
      (data) => {
        try {
          this._subscribed(stream, state, isObject(data) ? data : {}, frame);
        } catch (error) {
          // A reply this client cannot fully read: the subscription stands, and no `ready`
          // (nor another tab) is left waiting for ever.
          this._malformed(data, error.message);
          this._answerTabs(state, null);
          this._settleReaders(state, null, data);
        }
        this._jobDone(job, false);
      },
      (error) => this._subscribeRefused(job, error),
    );
  }

  _subscribeRefused(job, error) {
    const { stream, state } = job;
    if (error.code === "closed") return; // subscribed again on the next connection
    state.onServer = false;
    if (this.streams.get(stream) !== state) {
      // Unsubscribed meanwhile: nothing to retry, and nothing left on the server to unsubscribe.
      this.throttle.jobs = this.throttle.jobs.filter((j) => j.state !== state);
      return this._jobDone(job, false);
    }
    // `already_subscribed` behind a refused unsubscribe of the stream: the server still has
    // the old subscription; retry after that unsubscribe.
    const behind = error.code === "already_subscribed" &&
      this.throttle.jobs.some((j) => j.op === "unsubscribe" && j.stream === stream);
    if (error.code === "rate_limited" || behind) return this._jobDone(job, true, behind);
    this._refuseStream(state, Object.assign(error, { stream }));
    this._jobDone(job, false);
  }

  /** The server refused the stream (a subscribe's reply, a fallback's 403): final until it is subscribed again. */
  _refuseStream(state, error) {
    state.resuming = false;
    state.refused = error;
    if (MALFORMED.has(error.code)) state.malformed = true; // never sent again (see _resubscribe)
    // Only this page's own handles make it this page's error: a stream a leader follows only
    // for other tabs is theirs, and they hear of the refusal from _answerTabs.
    if (state.handlers.size) this._emit("error", { code: error.code, message: error.message, stream: error.stream });
    this._answerTabs(state, error);
    this._settleReaders(state, error);
  }

  /** A control frame's answer: a refused one goes back in line, a retry's success sends the next. */
  _jobDone(job, limited, last = false) {
    const t = this.throttle;
    const wasBusy = t.busy === job;
    if (wasBusy) t.busy = null;
    if (limited) {
      if (wasBusy) t.attempt += 1;
      if (!t.jobs.some((j) => j.op === job.op && j.state === job.state)) {
        if (wasBusy && !last) t.jobs.unshift(job);
        else t.jobs.push(job);
      }
    } else if (wasBusy) {
      t.attempt = 0;
      return this._pump(); // the bucket had a token: try the next one now
    }
    this._schedulePump();
  }

  _schedulePump() {
    const t = this.throttle;
    if (t.busy || t.timer != null || !t.jobs.length) return;
    const { base, cap } = this.options.subscribeRetry;
    const ceiling = Math.min(cap, base * 2 ** t.attempt);
    const delay = Math.floor(ceiling / 2 + (this.random() * ceiling) / 2);
    t.timer = this._later(delay, () => {
      t.timer = null;
      this._pump();
    });
  }

  _pump() {
    const t = this.throttle;
    if (t.busy || t.timer != null || this.closed) return;
    while (t.jobs.length) {
      const job = t.jobs.shift();
      const wanted = job.op === "subscribe" ? this.streams.get(job.stream) === job.state : job.state.onServer;
      if (!wanted) continue;
      if (!this._canSend()) return this._clearThrottle(); // the next connection resubscribes
      t.busy = job;
      this._sendJob(job);
      return;
    }
  }

  _clearThrottle() {
    this._cancel(this.throttle.timer);
    this.throttle = { jobs: [], timer: null, busy: null, attempt: 0 };
  }

  _subscribed(stream, state, data, frame) {
    state.resuming = false;
    if (this.streams.get(stream) !== state) return data; // unsubscribed meanwhile
    state.active = true;
    state.live = true;
    state.onServer = true;
    state.refused = null;
    state.data = data;
    const seq = Number.isInteger(data.seq) ? data.seq : null; // null: a leader on a fallback knows none
    if (frame.since != null && data.recovered === false) {
      this._serverReset(stream, seq, data.epoch);
    } else if (state.order.seq === null) {
      state.order.reset(seq, data.epoch ?? null);
      if (seq !== null) this._joinWaiting(stream, state);
    } else {
      if (data.epoch != null) state.order.epoch = data.epoch; // a leader on a fallback may know none
      // Another tab's connection already follows the stream from a later position: read
      // what this tab missed from the feed, page by page up to that position.
      if (data.shared && seq > state.order.seq) {
        state.behind = Math.max(state.behind ?? 0, seq);
        this._fillGap(stream);
      }
    }
    if (Array.isArray(data.presence)) {
      state.presence = this._presenceMap(data.presence, stream);
      state.presenceLive = true; // the socket's list: stale once on a fallback (_stalePresence)
      this._presence(stream, state);
      this._presenceToTabs(stream, state);
    }
    this._answerTabs(state, null); // other tabs waiting on this subscription (leader only)
    this._settleReaders(state, null, data);
    return data;
  }

  /**
   * A leader's (re)subscribe replaced the stream's presence: the tabs following it are told,
   * but not those whose own subscribe waits for this reply (it carries the presence).
   */
  _presenceToTabs(stream, state) {
    if (this.role !== "leader") return;
    const tabs = this.tabStreams.get(stream);
    if (!tabs) return;
    const answered = new Set(state.waiting.map((reply) => reply.tab));
    const presence = Array.from(state.presence.values());
    for (const tab of tabs) if (!answered.has(tab)) this._post({ kind: "presence", to: tab, stream, presence });
  }

  /** A new connection (or leader): subscribe every stream again, at once. */
  _resubscribe() {
    this._clearThrottle();
    for (const [stream, state] of this.streams) {
      state.live = false;
      // Refused for its frame: the same frame again would only count towards a 4400.
      if (state.malformed) continue;
      this._sendJob({ op: "subscribe", stream, state });
    }
  }

  /** On a fallback every stream is followed by the SSE stream or the polls: it is live. */
  _fallbackLive() {
    for (const state of this.streams.values()) {
      if (state.refused) continue;
      state.live = true;
      this._answerTabs(state, null);
      this._settleReaders(state, null, {});
    }
  }

  _answerTabs(state, error) {
    const waiting = state.waiting || [];
    state.waiting = [];
    for (const reply of waiting) reply(error);
  }

  /**
   * The server says a stream's history is lost (a `reset`, or `recovered: false`): a leader
   * tells its followers too, whose positions the server no longer covers either.
   */
  _serverReset(stream, seq, epoch) {
    if (!Number.isInteger(seq)) return this._malformed({ op: "reset", stream, seq, epoch }, "a reset without a seq");
    if (this.role === "leader") this._post({ kind: "server", frame: { op: "reset", stream, seq, epoch } });
    this._reset(stream, seq, epoch);
  }

  _reset(stream, seq, epoch) {
    const state = this.streams.get(stream);
    if (!state) return;
    // Early events dropped with the buffer were never delivered: a later copy (a resume's
    // replay) must not be taken for a duplicate.
    for (const frame of state.order.pending.values()) this.deduper.forget(frame.eventId);
    state.order.reset(seq, epoch);
    this._cancel(state.gapTimer);
    state.gapTimer = null; // a later gap arms it again
    state.history = []; // the events before a reset are no base to continue from
    for (const h of state.handlers) {
      if (h.reading) h.reading.abort.abort(); // what it reads is no base any more
      h.backlog = h.reset = h.reading = h.joining = h.since = null; // the reset below tells them
    }
    const info = { stream, seq, epoch };
    this._emit("reset", info);
    let handled = false;
    for (const h of state.handlers) {
      if (h.onReset) {
        handled = true;
        this._call(h.onReset, info);
      }
    }
    if (!handled && this.onReset) this._call(this.onReset, info);
  }

  _event(frame) {
    if (this.role === "leader" && this.transport !== "websocket") this._post({ kind: "server", frame });
    const state = this.streams.get(frame.stream);
    if (!state) return;
    if (this.deduper.has(frame.eventId)) return;
    if (frame.seq == null) {
      this.deduper.fresh(frame.eventId);
      return this._ephemeral(frame, state); // not logged
    }
    if (!Number.isInteger(frame.seq) || frame.seq < 1) return this._malformed(frame, "a seq that is not a positive integer");
    if (state.order.seq === null) {
      // The first event places a stream that had no position (offer() would do the same):
      // handles that joined from an earlier one read up to it first.
      state.order.seq = frame.seq - 1;
      this._joinWaiting(frame.stream, state);
    }
    const ready = state.order.offer(frame);
    if (ready === null) {
      // Too many events early: drop this one (not seen: the log has it), stop waiting and
      // fill from the log up to at least it.
      state.behind = Math.max(state.behind ?? 0, frame.seq);
      return this._fillGap(frame.stream);
    }
    // Seen only once delivered or kept in the buffer: a copy of one ignored here may still count.
    if (ready.length || state.order.pending.get(frame.seq) === frame) this.deduper.fresh(frame.eventId);
    this._deliverAll(ready, state);
    if (!this._delivering(frame.stream, state)) return;
    if (state.order.hasGap && state.gapTimer == null) {
      state.gapTimer = this._later(this.options.gapWait, () => {
        state.gapTimer = null;
        if (state.order.hasGap) this._fillGap(frame.stream);
      });
    }
  }

  /** Still delivering to this stream's state: not closed, and the stream still followed. */
  _delivering(stream, state) {
    return !this.closed && this.streams.get(stream) === state;
  }

  /**
   * Deliver frames taken from the stream's order. A handler may close the client or drop the
   * stream: then what it did not get is taken back (the position goes back to before it, and
   * its ids are forgotten), so that a later resume sends it again and it is delivered then.
   */
  _deliverAll(frames, state) {
    for (let i = 0; i < frames.length; i++) {
      if (!this._delivering(frames[i].stream, state)) {
        state.order.seq = frames[i].seq - 1;
        for (const f of frames.slice(i)) this.deduper.forget(f.eventId);
        return;
      }
      this._deliver(frames[i], state);
    }
  }

  _deliver(frame, state) {
    if (frame.correlationId && this.pendingCorrelations.has(frame.correlationId)) {
      frame = { ...frame, own: true };
    }
    this._emitFrame(frame);
    state.history.push(frame);
    if (state.history.length > HISTORY) state.history.shift();
    for (const h of state.handlers) {
      if (!this._delivering(frame.stream, state)) return; // a handler closed the client, or dropped the stream
      if (h.since !== null) {
        if (frame.seq <= h.since) continue; // in its data already: it joined ahead (_join)
        h.since = null;
      }
      if (h.reading) {
        h.backlog.push(frame); // after what the feed is reading for it
        continue;
      }
      if (h.backlog || h.reset) this._catchUp(state, h); // what it missed comes first
      if (h.onEvent && state.handlers.has(h)) this._call(h.onEvent, frame);
    }
  }

  _ephemeral(frame, state) {
    if (frame.type === "v1:presence.joined" || frame.type === "v1:presence.left") {
      if (!isMember(frame.data)) return this._malformed(frame, "a presence diff without a user");
      if (this._presenceChange(frame, state)) this._presence(frame.stream, state);
    }
    this._emitFrame(frame);
    for (const h of state.handlers) {
      if (!this._delivering(frame.stream, state)) return;
      if (h.onEvent) this._call(h.onEvent, frame);
    }
  }

  /**
   * Emit a frame as an `event`. A listener that closes the client, or drops the stream, stops
   * it for the listeners after it (see _stopFrame), as for the handlers.
   */
  _emitFrame(frame) {
    const event = new CustomEvent("event", { detail: frame });
    const outer = this.emitting;
    this.emitting = event;
    try {
      this.dispatchEvent(event);
    } finally {
      this.emitting = outer;
    }
  }

  /** The frame being emitted, if it is of `stream` (any, without one), goes to no more listeners. */
  _stopFrame(stream) {
    if (this.emitting && (!stream || this.emitting.detail.stream === stream)) this.emitting.stopImmediatePropagation();
  }

  // Diffs sent by other sockets or nodes may arrive out of order (a tab reloaded: its old
  // socket's `left` after its new one's `joined`). `since` names the presence a diff is
  // about, so a `left` of an older presence than the one shown, or a `joined` of one already
  // seen to end, changes nothing. ISO timestamps of one format compare as strings.
  _presenceChange(frame, state) {
    const id = frame.data.user.id;
    const since = frame.data.since;
    if (frame.type === "v1:presence.joined") {
      const ended = state.ended.get(id);
      if (since != null && ended != null && since <= ended) return false;
      state.presence.set(id, frame.data);
      return true;
    }
    if (since != null) {
      const shown = state.presence.get(id);
      if (shown && shown.since != null && shown.since > since) return false;
      state.ended.delete(id); // re-added last: the map is cut oldest first
      state.ended.set(id, since);
      if (state.ended.size > 1000) state.ended.delete(state.ended.keys().next().value);
    }
    state.presence.delete(id);
    return true;
  }

  _presence(stream, state) {
    const members = Array.from(state.presence.values());
    this._emit("presence", { stream, members });
    for (const h of state.handlers) if (h.onPresence) this._call(h.onPresence, members);
  }

  /**
   * Read the missing events from the event feed, page by page, up to the early events held
   * and those dropped from a full buffer; reset the stream if that fails. One at a time per
   * stream: events arriving meanwhile wait in the buffer (or are read by this fill).
   */
  async _fillGap(stream) {
    const state = this.streams.get(stream);
    if (!state || state.filling || this._resumeOnSocket(stream, state)) return;
    if (!this.fetch) return;
    state.filling = true;
    const abort = (state.fillAbort = new AbortController()); // close() aborts it
    // Aborted: close() stopped this fill, and a connect() may have followed it at once.
    const gone = () => this.closed || abort.signal.aborted || this.streams.get(stream) !== state;
    try {
      for (;;) {
        const before = state.order.seq;
        const positions = { [stream]: [state.order.seq, state.order.epoch] };
        const body = await this._readFeed([stream], positions, 0, { signal: abort.signal });
        if (gone()) return;
        const reset = (body.resets || []).find((r) => (r.stream || r) === stream);
        // The log no longer covers our position: start again from the server's.
        if (reset) throw Object.assign(new Error("reset"), { seq: reset.seq ?? 0, epoch: reset.epoch ?? null });
        for (const frame of body.events) {
          if (gone()) return; // closed by a handler: the rest is read again on a resume
          const ready = state.order.offer(frame) || [];
          if (ready.length) this.deduper.fresh(frame.eventId);
          this._deliverAll(ready, state);
        }
        if (gone()) return;
        const behind = state.behind != null && state.order.seq < state.behind;
        if (!state.order.hasGap && !behind) break;
        if (state.order.seq === before) {
          // The log has nothing more up to the early events: they were published out of
          // order but the missing ones are gone. Skip ahead to what we hold.
          const [first] = Array.from(state.order.pending.keys()).sort((a, b) => a - b);
          throw Object.assign(new Error("gap"), { seq: first === undefined ? state.behind : first - 1 });
        }
      }
      state.behind = null;
    } catch (error) {
      if (gone()) return;
      // The session (or the credentials) is gone: as a 4401 close. A ticket client without
      // `httpFallback` (a follower tab's) has none to lose: the feed refuses it, and the stream resets.
      if (error.status === 401 && this._httpReads()) return this._refused(4401);
      let seq = error.seq;
      if (seq == null) {
        // No position from the server (a network error; a feed that refuses this client, as a
        // ticket client's follower tab): go on from the furthest one known, before the early
        // events held past it. From where it was, every later event would open the gap again.
        const known = Math.max(state.behind ?? state.order.seq, state.order.seq);
        const [first] = [...state.order.pending.keys()].filter((s) => s > known).sort((a, b) => a - b);
        seq = first === undefined ? known : first - 1;
      }
      state.behind = null;
      // Early events past a new position are still good: delivered after the reset, not forgotten.
      const held = [...state.order.pending.values()].filter((f) => f.seq > seq);
      for (const frame of held) state.order.pending.delete(frame.seq);
      this._reset(stream, seq, error.epoch ?? state.order.epoch);
      held.sort((a, b) => a.seq - b.seq);
      for (let i = 0; i < held.length; i++) {
        if (gone()) {
          // Out of the buffer and not delivered: a resume's copy must not be taken for a duplicate.
          for (const f of held.slice(i)) this.deduper.forget(f.eventId);
          break;
        }
        this._deliverAll(state.order.offer(held[i]) || [], state);
      }
    } finally {
      if (state.fillAbort === abort) {
        state.filling = false;
        state.fillAbort = null;
      }
    }
    if (!gone() && state.order.hasGap && state.gapTimer == null) {
      // Events that arrived early during the fill, after what it read.
      state.gapTimer = this._later(this.options.gapWait, () => {
        state.gapTimer = null;
        if (state.order.hasGap) this._fillGap(stream);
      });
    }
  }

  /**
   * Whether SSE and the event feed authenticate this client: its session, or for a ticket
   * client the credentials its `fetch` sends (`httpFallback`).
   */
  _httpReads() {
    return !this.options.ticketUrl || this.options.httpFallback;
  }

  /**
   * A ticket client without `httpFallback` has nothing the event feed takes (it would answer
   * 401). It fills a gap on the socket instead: it unsubscribes the stream and subscribes it
   * again from its position, and the server replays what is missing; the early events held
   * are dropped as duplicates when they come again. One at a time per stream, until the
   * reply. False: not for this client.
   */
  _resumeOnSocket(stream, state) {
    if (this._httpReads() || this.role === "follower" || this.transport !== "websocket") return false;
    if (!this._canSend() || !state.onServer) return false;
    if (!state.resuming) {
      state.resuming = true;
      state.behind = null; // the replay goes on to the stream's newest event
      this._cancel(state.gapTimer);
      state.gapTimer = null;
      this._control({ op: "unsubscribe", stream, state });
      this._control({ op: "subscribe", stream, state });
    }
    return true;
  }

  /**
   * Read the feed for `streams`; a stream absent from `positions` starts at the server's now.
   * A request with no answer `feedTimeout` ms past its `wait` is aborted, and throws.
   */
  async _readFeed(streams, positions, wait, { etag = null, signal } = {}) {
    const url = new URL(this.options.feedUrl);
    url.searchParams.set("streams", streams.join(","));
    if (Object.keys(positions).length) url.searchParams.set("cursor", encodeCursor(positions));
    url.searchParams.set("limit", "500");
    if (wait) url.searchParams.set("wait", String(wait));
    if (this.options.version) url.searchParams.set("version", this.options.version);
    const headers = etag ? { "If-None-Match": etag } : {};
    const deadline = this._deadline(wait * 1000 + this.options.feedTimeout, signal, "the event feed");
    try {
      const init = { credentials: "same-origin", headers, signal: deadline.signal };
      const response = await deadline.race(this.fetch(url.toString(), init));
      if (response.status === 304) return { events: [], resets: [], cursor: null, notModified: true };
      if (!response.ok) throw await this._httpError(response, "feed", deadline);
      const body = await deadline.race(response.json());
      body.etag = response.headers.get("ETag");
      return body;
    } finally {
      deadline.clear();
    }
  }

  /** Publish a client event (typing); resolves with the reply's data. */
  publish(stream, type, data = {}) {
    // After close() (or 4401, 4403) nothing would send it, and nothing would settle it.
    if (this.ended) return Promise.reject(closedError());
    if (this.role !== "follower" && this.transport && this.transport !== "websocket") {
      return Promise.reject(noWebsocketError());
    }
    return this._request({ op: "publish", stream, type, data });
  }

  members(stream) {
    const state = this.streams.get(stream);
    return state ? Array.from(state.presence.values()) : [];
  }

  // -- HTTP helpers ----------------------------------------------------------------------------

  _csrfHeaders() {
    const cookie = this.document && this.document.cookie ? this.document.cookie : "";
    const match = cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? { "X-CSRFToken": decodeURIComponent(match[1]) } : {};
  }

  /** Mark the events that carry `correlationId` as own (`own: true`) for the next minute. */
  _expectOwn(correlationId) {
    this.pendingCorrelations.add(correlationId);
    this._later(60000, () => this.pendingCorrelations.delete(correlationId));
  }

  /**
   * A REST call that makes a change: sends `X-Correlation-ID` (`correlationId`, by default a
   * fresh one: the events the change causes carry it, and arrive with `own: true`), the CSRF
   * token and JSON. Rejects with an error holding `status` and the server's message on a
   * non-2xx answer, and with a `RangeError` for a `correlationId` the server would not take.
   */
  async request(url, { method = "POST", body, headers = {}, correlationId = randomId() } = {}) {
    if (typeof correlationId !== "string" || !CORRELATION_ID.test(correlationId)) {
      throw new RangeError(`correlationId must match ${CORRELATION_ID}, got ${JSON.stringify(correlationId)}`);
    }
    this._expectOwn(correlationId);
    const response = await this.fetch(url, {
      method,
      credentials: "same-origin",
      headers: {
        "Content-Type": "application/json",
        "X-Correlation-ID": correlationId,
        ...this._csrfHeaders(),
        ...headers,
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = text;
    }
    if (!response.ok) {
      const message =
        (data && (data.detail || (data.error && data.error.message))) ||
        (typeof data === "object" && data ? JSON.stringify(data) : `HTTP ${response.status}`);
      throw Object.assign(new Error(message), { status: response.status, data });
    }
    return { data, status: response.status, correlationId, positions: parsePositions(response.headers.get("X-Stream-Position")), etag: response.headers.get("ETag") };
  }

  /**
   * Optimistic update: `apply({correlationId})` changes the page at once (it may return a
   * temporary id); `request(temp, {correlationId})` does the change on the server, passing the
   * id to `request()`, so the page knows the events of its change before the answer; on
   * success `reconcile(result, temp)` swaps in the server's state, on failure
   * `rollback(temp, error)` undoes it and the error is re-thrown (and emitted as an `error`
   * event) so the page can show it. An exception in `reconcile` or `rollback` is reported, as
   * a handler's: the server's change stands, and is not rolled back.
   */
  async optimistic({ apply, request, reconcile, rollback }) {
    const correlationId = randomId();
    this._expectOwn(correlationId);
    const temp = apply ? apply({ correlationId }) : undefined;
    let result;
    try {
      result = await request(temp, { correlationId });
    } catch (error) {
      if (rollback) this._call(rollback, temp, error);
      this._emit("error", { code: "rolled_back", message: error.message, status: error.status });
      throw error;
    }
    if (reconcile) this._call(reconcile, result, temp);
    return result;
  }

  /**
   * Load a resource over REST and follow `stream` from exactly the position the response was
   * read at (`X-Stream-Position`): no event between page load and subscribe is lost or doubled.
   */
  async snapshot(url, stream, handlers = {}) {
    const response = await this.fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) throw Object.assign(new Error(`HTTP ${response.status}`), { status: response.status });
    const data = await response.json();
    const positions = parsePositions(response.headers.get("X-Stream-Position"));
    const since = positions[stream] ?? null;
    const subscription = this.subscribe(stream, { ...handlers, since });
    return { data, since, subscription };
  }

  // -- fallbacks: SSE, then polling --------------------------------------------------------

  /**
   * The fallback's cursor: the known position of each stream. One with none yet (subscribed
   * without `since`, no event seen) is left out, and the server starts it at its current
   * position: [0, null] would replay the whole retained history as new events.
   */
  _positions() {
    const positions = {};
    for (const [stream, state] of this.streams) {
      if (!state.refused && state.order.seq !== null) positions[stream] = [state.order.seq, state.order.epoch];
    }
    return positions;
  }

  /**
   * The streams a fallback follows: not those refused or revoked, since SSE and the feed
   * answer 403 to the whole request when any stream of it is refused.
   */
  _fallbackStreams() {
    return Array.from(this.streams).filter(([, state]) => !state.refused).map(([stream]) => stream);
  }

  /**
   * A 403 of SSE or the feed names the streams refused (protocol.md, section 14): each is
   * refused as a `forbidden` subscribe reply would be, and the fallback goes on without them.
   * False if it names none not refused yet (an older server names none): the 403 is then a
   * failed try, with its backoff, rather than a restart in a loop.
   */
  _fallbackRefused(error) {
    let refused = false;
    for (const stream of error.streams || []) {
      const state = this.streams.get(stream);
      if (!state || state.refused) continue;
      refused = true;
      state.live = state.onServer = false;
      if (this.role === "leader") {
        // The tabs answered already (on a fallback, at once) learn it as a revocation; those
        // still waiting get the refusal as their reply (_refuseStream).
        const waiting = new Set(state.waiting.map((reply) => reply.tab));
        const frame = { op: "unsubscribed", stream, reason: "forbidden" };
        for (const tab of this.tabStreams.get(stream) || []) {
          if (!waiting.has(tab)) this._post({ kind: "server", to: tab, frame });
        }
      }
      this._refuseStream(state, Object.assign(new Error(error.message), { code: "forbidden", stream }));
    }
    return refused;
  }

  /**
   * An HTTP error answer of SSE or the feed, with its `status`. A 403's body names the streams
   * refused (`streams`), and its message is the server's.
   */
  async _httpError(response, what, deadline) {
    const error = Object.assign(new Error(`${what} answered ${response.status}`), { status: response.status });
    if (response.status !== 403 || typeof response.json !== "function") return error;
    try {
      const body = await deadline.race(response.json());
      const refusal = isObject(body) && isObject(body.error) ? body.error : {};
      if (typeof refusal.message === "string") error.message = refusal.message;
      if (Array.isArray(refusal.streams)) error.streams = refusal.streams.filter((s) => typeof s === "string");
    } catch (_) {
      /* no JSON: no streams named */
    }
    return error;
  }

  /**
   * A stream that started at the server's now continues from there, not from a new now: give
   * the streams with no position yet the ones the server said ({stream: [seq, epoch]}).
   */
  _placeUnplaced(positions) {
    for (const [stream, state] of this.streams) {
      const at = positions[stream];
      if (state.order.seq === null && Array.isArray(at) && Number.isInteger(at[0])) {
        state.order.reset(at[0], at[1] ?? null);
        this._joinWaiting(stream, state);
      }
    }
  }

  /**
   * Stop the fallback's request and timers. Leaving the fallbacks (`probe` true) stops the
   * WebSocket probe too; going on with one (a restart, SSE to polling) keeps it, so that
   * frequent restarts (subscribes, visibility changes) do not postpone it for ever.
   */
  _stopFallback({ probe = true } = {}) {
    if (this.fallbackAbort) this.fallbackAbort.abort();
    this.fallbackAbort = null;
    this._cancel(this.pollTimer);
    this.pollTimer = null;
    if (probe) {
      this._cancel(this.probeTimer);
      this.probeTimer = null;
      // A probe still connecting goes with its fallback: the WebSocket is tried (or is) anew.
      this.probeGeneration += 1;
      if (this.connecting && this.connecting === this.probeSocket) this._forget(this.connecting);
      this.probeSocket = null;
    }
    if (this._onFallback()) for (const state of this.streams.values()) state.live = false;
    if (this.transport !== "websocket") this.transport = null;
  }

  _restartFallback() {
    const mode = this.transport;
    this._stopFallback({ probe: false });
    if (mode === "sse") this._startSSE();
    else if (mode === "polling") this._startPolling();
  }

  _scheduleProbe() {
    this._cancel(this.probeTimer);
    this.probeTimer = this._later(this.options.probeEvery, () => {
      this.probeTimer = null;
      this._openSocket({ probe: true });
    });
  }

  /** A fallback (re)started: probe the WebSocket unless a probe waits or is connecting already. */
  _keepProbing() {
    if (this.probeTimer == null && !this.probeSocket) this._scheduleProbe();
  }

  /**
   * On a fallback: nothing sends the publishes queued for a socket, so they fail now, as
   * publishes made on a fallback do (`no_websocket`), instead of waiting for a probe that may
   * never be welcomed.
   */
  _failQueued() {
    if (!this.queue.length) return;
    const queued = this.queue;
    this.queue = [];
    this._cancel(this.flushTimer);
    this.flushTimer = null;
    for (const frame of queued) {
      const pending = this.replies.get(frame.ref);
      if (!pending) continue;
      this.replies.delete(frame.ref);
      pending.reject(noWebsocketError());
    }
  }

  /**
   * On a fallback the socket's presence lists go stale: its diffs no longer come, and this
   * client is not present any more (SSE and polls do not count). Each list is emptied at once,
   * then read again from the presence API (the fallback's diffs patch it from then on).
   */
  _stalePresence() {
    for (const [stream, state] of this.streams) {
      if (!state.presenceLive) continue;
      state.presenceLive = false;
      state.presence = new Map();
      this._presence(stream, state);
      this._presenceToTabs(stream, state);
      this._loadPresence(stream, state);
    }
  }

  async _loadPresence(stream, state) {
    if (!this.fetch) return;
    let body;
    try {
      const url = `${this.options.presenceUrl}${encodeURIComponent(stream)}/`;
      const response = await this.fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) return;
      body = await response.json();
    } catch (_) {
      return; // the list stays empty; the fallback's diffs still patch it
    }
    // A socket welcomed meanwhile has sent a fresher list with its subscribe reply.
    if (!this._delivering(stream, state) || !this._onFallback() || state.presenceLive) return;
    if (!isObject(body) || !Array.isArray(body.members)) return this._malformed(body, "a presence answer without members");
    state.presence = this._presenceMap(body.members, stream);
    this._presence(stream, state);
    this._presenceToTabs(stream, state);
  }

  /**
   * Follow the streams over one SSE request, and reconnect when it ends. As EventSource does,
   * a reconnect waits at least the server's `retry:`, and longer after `rate_limited` (too
   * many connections). A stream that opened proves SSE gets through: only tries that got no
   * stream count towards polling, and only a stream open for `stableAfter` resets the backoff.
   */
  async _startSSE() {
    if (this.closed || this.role === "follower") return; // a follower's leader holds the connection
    this._stopFallback({ probe: false });
    this.transport = "sse";
    this._failQueued();
    this._fallbackLive();
    this._stalePresence();
    this._setStatus(STATUS.SSE);
    this._keepProbing();
    const controller = (this.fallbackAbort = new AbortController());
    const streams = this._fallbackStreams();
    if (!streams.length) return; // nothing to follow yet; subscribe() restarts it
    const url = new URL(this.options.sseUrl);
    url.searchParams.set("streams", streams.join(","));
    const positions = this._positions();
    if (Object.keys(positions).length) url.searchParams.set("cursor", encodeCursor(positions));
    if (this.options.version) url.searchParams.set("version", this.options.version);
    // As on the socket: a client that was connected before (either way) comes back.
    if (this.welcomed || this.sseOpened) url.searchParams.set("reconnect", "1");
    let opened = false; // this try got a stream
    let limited = false; // the server refused it for too many connections (429, `rate_limited`)
    let stable = null;
    // Every chunk (a `: heartbeat` comment too) puts it off: a stream silent for longer is
    // half-open, and ends as a closed one would, to be resumed from the cursor.
    const deadline = this._deadline(this.options.sseTimeout, controller.signal, "the SSE stream");
    try {
      const response = await deadline.race(this.fetch(url.toString(), {
        credentials: "same-origin",
        headers: { Accept: "text/event-stream" },
        signal: deadline.signal,
      }));
      if (!response.ok || !response.body) {
        limited = response.status === 429;
        throw await this._httpError(response, "SSE", deadline);
      }
      opened = this.sseOpened = true;
      stable = this._later(this.options.stableAfter, () => {
        if (this.fallbackAbort === controller) this.sseFailures = this.sseAttempt = 0;
      });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const parser = new SSEParser();
      for (;;) {
        deadline.touch();
        const { value, done } = await deadline.race(reader.read());
        if (done) break;
        for (const message of parser.push(decoder.decode(value, { stream: true }))) {
          // close() or another transport, from a handler of the messages before: the rest of
          // the chunk is not ours any more (a resume sends it again).
          if (controller.signal.aborted || this.closed) return;
          if (Number.isInteger(message.retry) && message.retry >= 0) this.sseRetry = message.retry;
          if (message.event === "rate_limited") {
            limited = true; // too many connections: the server ends the stream next
            continue;
          }
          // An `id:` with no data: where the streams that started now begin.
          if (message.id && !message.data) this._placeUnplaced(decodeCursor(message.id));
          if (!message.data) continue;
          let frame;
          try {
            frame = JSON.parse(message.data);
          } catch (_) {
            this._malformed(message.data, "not JSON");
            continue;
          }
          if (!isObject(frame)) {
            this._malformed(frame, "not an object");
            continue;
          }
          this._safely(frame, () => {
            if (message.event === "reset" || frame.op === "reset") this._serverReset(frame.stream, frame.seq, frame.epoch);
            else if (frame.op === "event") this._event(frame);
            else this._frame(frame);
          });
        }
      }
      throw new Error("SSE stream ended");
    } catch (error) {
      this._cancel(stable);
      if (controller.signal.aborted || this.closed) return;
      if (error.status === 401) return this._refused(4401); // the session is gone: as a 4401 close
      if (error.status === 403 && this._fallbackRefused(error)) {
        // Again at once, without the streams refused (a handler may have restarted it already).
        if (this.fallbackAbort === controller && !this.closed) this._restartFallback();
        return;
      }
      if (error.status === undefined && !opened && !(await this._reachable())) {
        // No HTTP answer at all, not even from the feed: the server is down, rather than the
        // WebSocket and SSE blocked. Keep trying the WebSocket with backoff (its next
        // failure tries SSE again).
        if (controller.signal.aborted || this.closed) return;
        this._stopFallback();
        this.wsFailures = this.options.wsAttempts - 1;
        const delay = backoffDelay(this.attempt, { ...this.options.backoff, random: this.random });
        this.attempt += 1;
        this._setStatus(STATUS.RECONNECTING, { retryIn: delay });
        this.retryTimer = this._later(delay, () => this._openSocket());
        return;
      }
      if (!opened && !limited) this.sseFailures += 1;
      if (this.sseFailures >= this.options.sseAttempts) return this._startPolling();
      this.sseAttempt += 1;
      let delay = this._sseDelay();
      if (limited) delay = Math.max(delay, this._limitedDelay());
      this._setStatus(STATUS.SSE, limited ? { retryIn: delay, code: "rate_limited" } : { retryIn: delay });
      this.pollTimer = this._later(delay, () => this._startSSE());
    } finally {
      deadline.clear();
    }
  }

  /**
   * The wait before the next SSE request: the backoff, or, once the server said `retry:`, that
   * plus a random share of the retry (or of the backoff's step, when longer). EventSource waits
   * the retry exactly, so the clients of a stream that a restart ended would all come back at
   * one instant; this spreads them, and never comes back sooner than the server asked.
   */
  _sseDelay() {
    const retry = this.sseRetry ?? 0;
    if (!retry) return backoffDelay(this.sseAttempt, { ...this.options.backoff, random: this.random });
    const { base, cap } = this.options.backoff;
    const step = Math.min(cap, base * 2 ** this.sseAttempt);
    return retry + Math.floor(this.random() * Math.min(cap, Math.max(retry, step)));
  }

  async _reachable() {
    try {
      const streams = this._fallbackStreams();
      if (!streams.length) return false; // nothing to ask about: no answer to go by
      await this._readFeed(streams, this._positions(), 0);
      return true;
    } catch (error) {
      return error.status !== undefined; // an HTTP error is still an answer
    }
  }

  /** This tab is hidden. */
  _ownHidden() {
    return Boolean(this.document && this.document.visibilityState === "hidden");
  }

  /** Hidden for polling: this tab and, in a leader, every tab that follows it. */
  _hidden() {
    return this._ownHidden() && !(this.role === "leader" && this.shownTabs && this.shownTabs.size);
  }

  _visibilityChanged() {
    // A follower polls nothing (its leader holds the connection): it tells the leader instead.
    if (this.role === "follower") return this._postVisibility();
    if (this.transport === "polling" && !this._hidden()) this._startPolling(); // poll now
  }

  /** A follower tells its leader whether it is shown: the leader polls fast while any tab is. */
  _postVisibility() {
    if (this.role === "follower" && this.leaderId) this._post({ kind: "visibility", hidden: this._ownHidden() });
  }

  async _startPolling() {
    if (this.closed || this.role === "follower") return; // a follower's leader holds the connection
    this._stopFallback({ probe: false });
    this.transport = "polling";
    this._failQueued();
    this._fallbackLive();
    this._stalePresence();
    this._setStatus(STATUS.POLLING);
    this._keepProbing();
    const controller = (this.fallbackAbort = new AbortController());
    let etag = null;
    let failures = 0;
    const poll = async () => {
      if (controller.signal.aborted || this.closed) return;
      const streams = this._fallbackStreams();
      if (!streams.length) return; // nothing to follow yet; subscribe() restarts it
      const hidden = this._hidden();
      try {
        const body = await this._readFeed(
          streams,
          this._positions(),
          hidden ? 0 : this.options.pollVisible,
          { etag, signal: controller.signal },
        );
        failures = 0;
        if (controller.signal.aborted || this.closed) return;
        if (!body.notModified) {
          etag = body.etag;
          // A handler may close the client or leave polling: the rest is not ours any more.
          const stopped = () => controller.signal.aborted || this.closed;
          for (const stream of body.resets || []) {
            if (stopped()) return;
            this._safely(stream, () => this._serverReset(stream.stream || stream, stream.seq ?? 0, stream.epoch ?? null));
          }
          for (const frame of body.events) {
            if (stopped()) return;
            if (isObject(frame)) this._safely(frame, () => this._event(frame));
            else this._malformed(frame, "not an object");
          }
          if (stopped()) return;
          this._placeUnplaced(body.cursor ? decodeCursor(body.cursor) : {});
        }
      } catch (error) {
        if (controller.signal.aborted || this.closed) return; // stopped meanwhile: not ours any more
        if (error.status === 401) return this._refused(4401); // the session is gone: as a 4401 close
        if (error.status === 403 && this._fallbackRefused(error)) {
          // Again at once, without the streams refused (a handler may have restarted it already).
          if (this.fallbackAbort === controller && !this.closed) this._startPolling();
          return;
        }
        failures += 1;
        this._setStatus(STATUS.POLLING, { error: error.message });
      }
      // Never a hot loop, even if a proxy answers long polls at once.
      const delay = hidden
        ? this.options.pollHidden
        : failures
          ? Math.max(250, backoffDelay(failures, { ...this.options.backoff, random: this.random }))
          : 250;
      this.pollTimer = this._later(delay, poll);
    };
    poll();
  }
}

export default RealtimeClient;
