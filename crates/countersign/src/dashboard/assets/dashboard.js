// Countersign dashboard: the little script the server-rendered pages need. It listens to /ui/events (SSE)
// and re-fetches the pending list or appends audit rows; it opens an approval in the drawer. Every page
// works without it (links and forms are plain HTML).
"use strict";
(function () {
  const page = document.body.dataset.page;
  const list = document.getElementById("pending-list");
  const drawer = document.getElementById("drawer");
  const audit = document.getElementById("audit");
  let openId = null;

  // `background`: a fetch no one clicked for (the queue's timer, live updates); the server does not count it
  // as activity, so a page left open still logs out when idle.
  async function fetchHtml(url, background) {
    const headers = { "accept": "text/html" };
    if (background) headers["x-countersign-background"] = "1";
    const response = await fetch(url, { credentials: "same-origin", headers });
    if (response.redirected && response.url.includes("/ui/login")) { location.href = "/ui/login"; return null; }
    if (!response.ok) { return null; }
    return response.text();
  }

  async function refreshQueue() {
    if (!list) return;
    const html = await fetchHtml("/ui/pending/list", true);
    if (html === null) return;
    list.innerHTML = html;
    markSelected();
    if (openId && !list.querySelector(`tr[data-approval="${openId}"]`)) refreshDrawer();
  }

  function markSelected() {
    if (!list) return;
    list.querySelectorAll("tr[data-approval]").forEach((tr) => tr.classList.toggle("selected", tr.dataset.approval === openId));
  }

  async function openDrawer(id, focus, background) {
    const html = await fetchHtml(`/ui/approvals/${encodeURIComponent(id)}?partial=1`, background);
    if (html === null) return;
    openId = id;
    drawer.innerHTML = html;
    drawer.hidden = false;
    drawer.parentElement.classList.add("open");
    markSelected();
    if (focus) drawer.focus();
  }

  function refreshDrawer() { if (openId) openDrawer(openId, false, true); }

  function closeDrawer() {
    if (!drawer || drawer.hidden) return;
    const id = openId;
    openId = null;
    drawer.hidden = true;
    drawer.innerHTML = "";
    drawer.parentElement.classList.remove("open");
    markSelected();
    const link = list && list.querySelector(`tr[data-approval="${id}"] a.open`);
    if (link) link.focus();
  }

  if (list && drawer) {
    list.addEventListener("click", (event) => {
      const link = event.target.closest("a.open");
      if (!link || event.ctrlKey || event.metaKey || event.shiftKey) return;
      event.preventDefault();
      openDrawer(link.closest("tr").dataset.approval, true);
    });
    drawer.addEventListener("click", (event) => { if (event.target.closest("[data-close]")) closeDrawer(); });
    document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeDrawer(); });
    // Ages and "expires in" move on even when nothing happens.
    setInterval(refreshQueue, 15000);
  }

  // The audit page showing the newest events adds new ones as they are written: at the top when it lists
  // newest first ("prepend"), at the bottom when oldest first ("append"); other pages stay as they are.
  async function tailAudit() {
    const mode = audit.dataset.live;
    if (mode !== "prepend" && mode !== "append") return;
    const last = audit.dataset.last || "0";
    const html = await fetchHtml(`/ui/audit/rows?after=${encodeURIComponent(last)}&${audit.dataset.query}`, true);
    if (!html || !html.trim()) return;
    const body = document.getElementById("audit-rows");
    body.insertAdjacentHTML(mode === "prepend" ? "afterbegin" : "beforeend", html);
    const seqs = Array.from(body.querySelectorAll("tr[data-seq]"), (tr) => Number(tr.dataset.seq));
    if (seqs.length) audit.dataset.last = String(Math.max(...seqs));
    const empty = document.getElementById("audit-empty");
    if (empty) empty.remove();
  }

  // One tail request at a time (each starts after the newest row shown); a wake during one runs another.
  let tailing = false;
  let tailAgain = false;
  function tail() {
    if (tailing) { tailAgain = true; return; }
    tailing = true;
    tailAudit().finally(() => {
      tailing = false;
      if (tailAgain) { tailAgain = false; tail(); }
    });
  }

  if (window.EventSource && (list || audit)) {
    const live = document.getElementById("live");
    let retry = 5000;
    const connect = () => {
      const source = new EventSource("/ui/events");
      source.addEventListener("ready", () => { retry = 5000; if (live) live.classList.add("on"); refreshQueue(); });
      source.addEventListener("approvals", () => { refreshQueue(); });
      source.addEventListener("audit", () => { if (audit) tail(); });
      source.onerror = () => {
        if (live) live.classList.remove("on");
        // The browser retries a dropped stream itself, but gives up on an answer that is not a stream (a
        // 429 when the user already holds as many open as they may, a restart's 503, a login that ended).
        // A login that ended shows the login page (fetchHtml follows the redirect there); anything else is
        // tried again later, backing off to a minute, with jitter.
        if (source.readyState !== EventSource.CLOSED) return;
        fetchHtml("/ui/pending/list", true).catch(() => null).finally(() => {
          setTimeout(connect, retry / 2 + Math.random() * retry / 2);
          retry = Math.min(retry * 2, 60000);
        });
      };
    };
    connect();
  }
})();
