// The live board of one project: items appear, change and disappear as events arrive;
// add, rename, toggle and delete with optimistic updates and a visible rollback on error;
// presence avatars and "… is typing".
import { client } from "/static/realtime/page.js";
import { BoardItems } from "./items.js";

const root = document.querySelector("[data-board]");
const projectId = Number(root.dataset.project);
const stream = `project:${projectId}`;
const me = Number(root.dataset.user);
const list = root.querySelector("[data-items]");
const message = root.querySelector("[data-message]");
const form = root.querySelector("[data-add]");
const input = form.querySelector("input[name=title]");
const avatars = root.querySelector("[data-presence]");
const typing = root.querySelector("[data-typing]");

const items = new BoardItems(); // keeps the newest version of each item, forgets no deletion
let tempIds = 0;

function say(text, kind = "error") {
  message.textContent = text;
  message.dataset.kind = kind;
  message.hidden = !text;
}

function render() {
  const sorted = [...items.values()].sort((a, b) => a.position - b.position || String(a.id).localeCompare(String(b.id)));
  list.replaceChildren(
    ...sorted.map((item) => {
      const li = document.createElement("li");
      li.dataset.id = item.id;
      li.className = [item.done ? "done" : "", item.pending ? "pending" : ""].join(" ").trim();
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = item.done;
      box.disabled = Boolean(item.pending);
      box.setAttribute("aria-label", `done: ${item.title}`);
      box.addEventListener("change", () => toggle(item.id));
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = item.title;
      title.title = "Double-click to rename";
      title.addEventListener("dblclick", () => rename(item.id));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `delete ${item.title}`);
      remove.disabled = Boolean(item.pending);
      remove.addEventListener("click", () => destroy(item.id));
      li.append(box, " ", title, " ", remove);
      return li;
    }),
  );
  if (!sorted.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "No items yet.";
    list.append(li);
  }
}

function apply(frame) {
  if (items.apply(frame)) render();
}

async function refetch() {
  const since = items.mark(); // events during the request are newer than the list
  const response = await fetch(`/api/projects/${projectId}/items/`, { credentials: "same-origin" });
  if (!response.ok) return;
  items.load(await response.json(), since);
  render();
}

// -- writes, optimistic ------------------------------------------------------------------

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const title = input.value.trim();
  if (!title) return;
  input.value = "";
  client.publish(stream, "v1:typing.stopped", {}).catch(() => {});
  const position = Math.max(0, ...[...items.values()].map((i) => i.position + 1));
  try {
    await client.optimistic({
      apply: ({ correlationId }) => {
        const id = `tmp-${++tempIds}`;
        // Our own `item.created` often comes over the socket before the answer: it replaces
        // this temp item then, so the item is never shown twice.
        items.local(id, { id, title, done: false, position }, correlationId);
        render();
        return id;
      },
      request: (_temp, { correlationId }) =>
        client.request(`/api/projects/${projectId}/items/`, {
          body: { title, position },
          headers: { "Idempotency-Key": `${me}-${Date.now()}-${tempIds}` },
          correlationId,
        }),
      reconcile: (result, temp) => {
        items.forget(temp); // unless the event already replaced it
        items.put(result.data); // unless an event already brought a newer version, or a delete
        render();
      },
      rollback: (temp, error) => {
        items.forget(temp);
        render();
        say(`Could not add "${title}": ${error.message}`);
      },
    });
    say("");
  } catch (_) {
    /* shown by rollback */
  }
});

async function change(id, patch, what) {
  const before = items.get(id);
  if (!before) return;
  try {
    await client.optimistic({
      apply: () => {
        items.local(id, { ...before, ...patch });
        render();
      },
      request: () => client.request(`/api/items/${id}/`, { method: "PATCH", body: patch, headers: before.etag ? { "If-Match": before.etag } : {} }),
      reconcile: (result) => {
        items.put(result.data); // a late answer never undoes a newer event or a delete
        render();
      },
      rollback: (_temp, error) => {
        items.rollback(id, before);
        render();
        say(`Could not ${what}: ${error.message}`);
      },
    });
    say("");
  } catch (_) {
    /* shown by rollback */
  }
}

function toggle(id) {
  const item = items.get(id);
  if (item) change(id, { done: !item.done }, `update "${item.title}"`);
}

function rename(id) {
  const item = items.get(id);
  if (!item) return;
  const title = window.prompt("Rename", item.title);
  if (title && title.trim() && title !== item.title) change(id, { title: title.trim() }, `rename "${item.title}"`);
}

async function destroy(id) {
  const before = items.get(id);
  if (!before) return;
  try {
    await client.optimistic({
      apply: () => {
        items.hide(id);
        render();
      },
      request: () => client.request(`/api/items/${id}/`, { method: "DELETE" }),
      reconcile: () => items.remove(id),
      rollback: (_temp, error) => {
        items.unhide(id);
        render();
        say(`Could not delete "${before.title}": ${error.message}`);
      },
    });
  } catch (_) {
    /* shown by rollback */
  }
}

// -- presence and typing -------------------------------------------------------------------

const typists = new Map(); // user id -> timer
function showPresence(members) {
  avatars.replaceChildren(
    ...members.map((m) => {
      const span = document.createElement("span");
      span.className = "avatar";
      span.dataset.user = m.user.id;
      span.title = `${m.user.name} (here since ${new Date(m.since).toLocaleTimeString()})`;
      span.textContent = (m.user.name || m.user.username || "?").slice(0, 2).toUpperCase();
      return span;
    }),
  );
}
function showTyping() {
  const names = [...typists.keys()].map((id) => {
    const m = client.members(stream).find((x) => x.user.id === id);
    return m ? m.user.name : "someone";
  });
  typing.textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}
function onTyping(frame) {
  const id = frame.from && frame.from.user;
  if (id == null || id === me) return;
  clearTimeout(typists.get(id));
  if (frame.type === "v1:typing.stopped") typists.delete(id);
  else typists.set(id, setTimeout(() => { typists.delete(id); showTyping(); }, frame.data.expiresIn || 3000));
  showTyping();
}
input.addEventListener("input", () => {
  if (input.value) client.publish(stream, "v1:typing.started", {}).catch(() => {});
});
input.addEventListener("blur", () => client.publish(stream, "v1:typing.stopped", {}).catch(() => {}));

// -- start: the list and the stream from one position ------------------------------------

try {
  // The REST list and its X-Stream-Position, then the stream from exactly there.
  const { data } = await client.snapshot(`/api/projects/${projectId}/items/`, stream, {
    onEvent: (frame) => (frame.type.startsWith("v1:typing.") ? onTyping(frame) : apply(frame)),
    onReset: refetch,
    onPresence: showPresence,
  });
  items.load(data); // events that came first are kept if newer
} catch (error) {
  say(`Could not load the items: ${error.message}`);
}
render();
root.dataset.ready = "true";
