// Tollgate console: the only script, served from here (the Content-Security-Policy allows no other).
// The approvals inbox stays live: server-sent events say when the approvals changed, and the
// list is fetched again and swapped in, without reloading the page.
"use strict";

function liveInbox() {
  const inbox = document.getElementById("inbox");
  if (!inbox || !window.EventSource) return;
  const state = document.getElementById("live-state");
  let shown = inbox.dataset.revision;
  const events = new EventSource(inbox.dataset.events);
  events.addEventListener("revision", async (event) => {
    const revision = String(JSON.parse(event.data).revision);
    if (state) state.textContent = " (live)";
    if (revision === shown) return;
    const answer = await fetch(inbox.dataset.list, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (answer.status === 401 || answer.redirected) { window.location.reload(); return; }
    if (!answer.ok) return;
    inbox.innerHTML = await answer.text();
    shown = revision;
  });
  events.addEventListener("error", () => { if (state) state.textContent = " (reconnecting…)"; });
}

document.addEventListener("DOMContentLoaded", liveInbox);
