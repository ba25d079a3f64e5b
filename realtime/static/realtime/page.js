// One RealtimeClient per page, shared by every widget on it (bell, board, dashboard), and a
// connection status badge. Widgets: `import { client } from ".../page.js"`.
import { RealtimeClient } from "./realtime.js";

export const client = new RealtimeClient({
  onReset: () => {}, // widgets pass their own onReset
});

function badgeText(detail) {
  switch (detail.status) {
    case "open":
      return ["live", "Live"];
    case "connecting":
      return ["connecting", "Connecting…"];
    case "reconnecting":
      return [
        "reconnecting",
        detail.retryIn != null ? `Reconnecting in ${Math.ceil(detail.retryIn / 1000)} s` : "Reconnecting…",
      ];
    case "fallback-sse":
      return ["fallback", "Live (fallback: SSE)"];
    case "fallback-polling":
      return ["fallback", "Live (fallback: polling)"];
    default:
      return ["offline", "Offline"];
  }
}

export function attachBadge(element) {
  let countdown = null;
  const show = (detail) => {
    clearInterval(countdown);
    const [kind, text] = badgeText(detail);
    element.dataset.status = detail.status;
    element.className = `status-badge status-${kind}`;
    element.textContent = text;
    if (detail.status === "reconnecting" && detail.retryIn != null) {
      // Count the seconds down until the next try.
      const at = Date.now() + detail.retryIn;
      countdown = setInterval(() => {
        const left = Math.max(0, Math.ceil((at - Date.now()) / 1000));
        element.textContent = left ? `Reconnecting in ${left} s` : "Reconnecting…";
        if (!left) clearInterval(countdown);
      }, 1000);
    }
  };
  show({ status: client.status });
  client.on("status", show);
}

for (const el of document.querySelectorAll("[data-realtime-status]")) attachBadge(el);
client.on("error", (e) => {
  const box = document.querySelector("[data-realtime-errors]");
  if (!box || e.code === "queue_full" || e.code === "closed") return;
  if (e.code === "malformed_frame") return console.warn(e.message, e.frame); // for developers, not users
  if (e.code === "rolled_back") return; // widgets show their own rollback message
  box.textContent = e.message;
  box.hidden = false;
});
client.connect();
