// The broker's dashboard: plain JS, no build step, no dependency.
//
// #/            the workflows of a tenant: GET /v1/workflows for the list,
//               then /v1/stream?tenant=… (snapshots of every workflow in
//               memory, then their state and progress as they change)
// #/wf/<id>     one workflow: /v1/workflows/<id>/stream (tasks, timeline,
//               logs, the last error), a cancel button with a control channel
//
// EventSource reconnects by itself with Last-Event-ID: the stream goes on
// after the last event shown, nothing twice; the header says
// "reconnecting…" meanwhile. With auth on, the token is kept in the
// `broker_token` cookie, which the broker reads (EventSource cannot send
// headers). Rows are updated in place, at most once per animation frame.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["completed", "failed", "cancelled", "timed_out", "skipped"]);
const LEVELS = { debug: 10, info: 20, warning: 30, error: 40, critical: 50 };
const KINDS = ["snapshot", "resync", "state", "progress", "log", "event", "gap", "end", "error"];
const MAX_LOGS = 2000;
const MAX_TIMELINE = 1000;

let info = { auth: "none", control: false };
let view = null; // the open view: { close() }

// ------------------------------------------------------------- helpers

function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

function clock(ms) {
  if (typeof ms !== "number") return "";
  const d = new Date(ms);
  return d.toTimeString().slice(0, 8);
}

function duration(ms) {
  if (typeof ms !== "number" || ms < 0) return "";
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor(s / 3600) % 24}h`;
}

function short(value) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text && text.length > 400 ? text.slice(0, 399) + "…" : text || "";
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function badge(node, state) {
  node.dataset.state = state || "";
  node.textContent = state || "";
}

function progressCell(td) {
  const track = el("span", "track");
  const fill = el("span", "fill");
  track.append(fill);
  const pct = el("span", "pct");
  td.append(track, pct);
  return (value, state) => {
    const v = Math.max(0, Math.min(100, value || 0));
    fill.style.width = `${v}%`;
    fill.dataset.state = state || "";
    pct.textContent = value === null || value === undefined ? "" : `${Math.round(v)}%`;
  };
}

function onFrame(fn) {
  let queued = false;
  return () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      fn();
    });
  };
}

// One stream: its messages to `handle(kind, body)`, its state in the
// header. EventSource retries a dropped connection itself (with
// Last-Event-ID), but gives up on an HTTP error (a broker draining for a
// restart answers 503): then this asks `probe` (a plain GET the stream's
// refusal would share) why, stops on what a retry does not mend (401: a
// token is needed; 403; 404) and otherwise opens a new one after a pause,
// resuming with `last_event_id=`, until the page closes it.
function openStream(url, handle, onFirstOpen, probe) {
  let es = null;
  let lastId = "";
  let closed = false;
  let delay = 500;
  let timer = null;

  function open() {
    const sep = url.includes("?") ? "&" : "?";
    es = new EventSource(lastId ? `${url}${sep}last_event_id=${encodeURIComponent(lastId)}` : url, { withCredentials: true });
    es.onopen = () => {
      delay = 500;
      setStatus("live", "● live");
      if (onFirstOpen) onFirstOpen();
      onFirstOpen = null;
    };
    es.onerror = (e) => {
      if (e.data !== undefined || closed) return; // the broker's own `error` message, below
      setStatus("reconnecting", "reconnecting…");
      if (es.readyState === EventSource.CLOSED) retry();
    };
    for (const kind of KINDS) {
      es.addEventListener(kind, (e) => {
        if (e.data === undefined) return; // a connection error, not a message
        if (e.lastEventId) lastId = e.lastEventId;
        handle(kind, JSON.parse(e.data));
      });
    }
  }

  async function retry() {
    try {
      await api(probe);
    } catch (err) {
      if (closed) return;
      if (err.status === 401) return setStatus("error", "token needed");
      if (err.status === 403 || err.status === 404) return setStatus("error", err.message);
    }
    if (closed) return;
    timer = setTimeout(open, delay);
    delay = Math.min(delay * 2, 10000);
  }

  setStatus("connecting", "connecting…");
  open();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      es.close();
    },
  };
}

// ------------------------------------------------------------- token

function cookieToken() {
  const m = document.cookie.match(/(?:^|; )broker_token=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : "";
}

function setupToken() {
  const form = $("token-form");
  form.hidden = info.auth === "none";
  $("token").value = cookieToken();
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    document.cookie = `broker_token=${encodeURIComponent(t)}; path=/; SameSite=Strict` + (t ? "" : "; max-age=0");
    route();
  });
}

async function api(path, options = {}) {
  const r = await fetch(path, { credentials: "same-origin", ...options });
  const body = r.headers.get("content-type") === "application/json" ? await r.json() : null;
  if (!r.ok) {
    const err = body && body.error ? body.error : { code: `http_${r.status}`, message: r.statusText };
    if (r.status === 401) setStatus("error", "token needed");
    throw Object.assign(new Error(err.message), { code: err.code, status: r.status });
  }
  return body;
}

// ------------------------------------------------------------- the list

function workflowProgress(w) {
  const tasks = Object.values(w.tasks);
  if (!tasks.length) return TERMINAL.has(w.state) ? 100 : null;
  let sum = 0;
  for (const t of tasks) sum += t.state === "completed" || t.state === "skipped" ? 100 : t.progress || 0;
  return sum / tasks.length;
}

function openList() {
  const tenant = localStorage.getItem("tenant") || "default";
  $("tenant").value = tenant;
  $("list-view").hidden = false;
  const tbody = $("workflow-rows");
  tbody.replaceChildren();
  const rows = new Map(); // id → { w, tr, cells }
  const dirty = new Set();
  let closed = false;

  const flush = onFrame(() => {
    for (const id of dirty) paint(rows.get(id));
    dirty.clear();
    filter();
  });

  function row(id, atTop) {
    let r = rows.get(id);
    if (r) return r;
    const tr = el("tr");
    tr.dataset.id = id;
    const idCell = el("td", "id");
    const link = el("a", "", id);
    link.href = `#/wf/${encodeURIComponent(id)}`;
    idCell.append(link);
    const stateCell = el("td", "state");
    const b = el("span", "badge");
    stateCell.append(b);
    const progressTd = el("td", "progress");
    const setProgress = progressCell(progressTd);
    const tasksCell = el("td", "tasks");
    const ageCell = el("td", "age");
    const updatedCell = el("td", "updated");
    tr.append(idCell, stateCell, progressTd, tasksCell, ageCell, updatedCell);
    tr.addEventListener("click", (e) => {
      if (e.target.tagName !== "A") location.hash = link.getAttribute("href");
    });
    r = { w: { id, state: "created", tasks: {}, created: null, updated: null }, tr, b, setProgress, tasksCell, ageCell, updatedCell };
    rows.set(id, r);
    if (atTop) tbody.prepend(tr);
    else tbody.append(tr);
    return r;
  }

  function paint(r) {
    const w = r.w;
    badge(r.b, w.state);
    r.setProgress(workflowProgress(w), w.state);
    const tasks = Object.values(w.tasks);
    r.tasksCell.textContent = tasks.length ? `${tasks.filter((t) => t.state === "completed").length}/${tasks.length}` : "";
    r.ageCell.textContent = w.created ? duration(Date.now() - w.created) : "";
    r.updatedCell.textContent = clock(w.updated);
    r.tr.dataset.state = w.state;
  }

  function filter() {
    const find = $("find").value.trim();
    const state = $("state-filter").value;
    let shown = 0, running = 0, failed = 0;
    for (const r of rows.values()) {
      const s = r.w.state;
      const ok = (!find || r.w.id.includes(find)) && (!state || (state === "active" ? !TERMINAL.has(s) : s === state));
      r.tr.hidden = !ok;
      if (ok) shown++;
      if (s === "running") running++;
      if (s === "failed") failed++;
    }
    $("counts").textContent = `${rows.size} workflows · ${running} running · ${failed} failed` + (shown !== rows.size ? ` · ${shown} shown` : "");
    $("list-empty").hidden = rows.size > 0;
  }

  function touch(r) {
    dirty.add(r.w.id);
    flush();
  }

  function handle(kind, m) {
    const id = m.workflow_id;
    if (!id) return;
    const r = row(id, true);
    const w = r.w;
    if (kind === "snapshot" || kind === "resync") {
      Object.assign(w, { state: m.state, created: m.created, updated: m.updated, tasks: {} });
      for (const [tid, t] of Object.entries(m.tasks || {})) w.tasks[tid] = { state: t.state, progress: t.progress };
    } else if (kind === "state" || kind === "progress") {
      if (m.task_id && m.type.startsWith("task.")) {
        const t = (w.tasks[m.task_id] = w.tasks[m.task_id] || { state: "created", progress: null });
        if (m.progress !== undefined) t.progress = m.progress;
        if (kind === "state") t.state = m.state;
      } else if (kind === "state" && m.type.startsWith("workflow.")) {
        w.state = m.state;
      }
      if (w.created === null) w.created = m.ts;
      w.updated = m.ts;
    } else if (kind === "end") {
      w.state = m.state || w.state;
    } else {
      return;
    }
    touch(r);
  }

  // The stream first, then the listing: once the stream is open, nothing
  // that changes is missed (it comes from the stream), and the listing
  // brings what the stream does not show (workflows that ended before it
  // opened, those only in the store). A listed state applies only where
  // it is newer than what the stream said.
  async function list() {
    try {
      const listing = await api(`/v1/workflows?tenant=${encodeURIComponent(tenant)}&limit=1000`);
      if (closed) return;
      for (const s of listing.workflows) {
        const known = rows.has(s.workflow_id);
        const r = row(s.workflow_id, false);
        if (known && (r.w.updated || 0) >= (s.updated || 0)) continue;
        Object.assign(r.w, { state: s.state, created: r.w.created || s.created, updated: s.updated });
        paint(r);
      }
      filter();
    } catch (err) {
      $("counts").textContent = `listing: ${err.message}`;
    }
  }
  const es = openStream(
    `/v1/stream?tenant=${encodeURIComponent(tenant)}&types=state,progress`,
    handle,
    list,
    `/v1/workflows?tenant=${encodeURIComponent(tenant)}&limit=1`,
  );

  const ages = setInterval(() => {
    const now = Date.now();
    for (const r of rows.values()) if (!r.tr.hidden && r.w.created) r.ageCell.textContent = duration(now - r.w.created);
  }, 1000);
  const refilter = () => filter();
  $("find").addEventListener("input", refilter);
  $("state-filter").addEventListener("change", refilter);
  const onTenant = () => {
    localStorage.setItem("tenant", $("tenant").value.trim() || "default");
    route();
  };
  $("tenant").addEventListener("change", onTenant);

  return {
    close() {
      closed = true;
      es.close();
      clearInterval(ages);
      $("find").removeEventListener("input", refilter);
      $("state-filter").removeEventListener("change", refilter);
      $("tenant").removeEventListener("change", onTenant);
      $("list-view").hidden = true;
    },
  };
}

// --------------------------------------------------------- one workflow

function openWorkflow(id) {
  $("wf-view").hidden = false;
  $("wf-id").textContent = id;
  $("wf-id").title = id;
  document.title = `${id} · workflow event broker`;
  badge($("wf-state"), "");
  $("wf-meta").textContent = "";
  $("wf-error").hidden = true;
  $("task-rows").replaceChildren();
  $("timeline").replaceChildren();
  $("logs").replaceChildren();
  $("cancel-result").textContent = "";
  const cancel = $("cancel");
  cancel.hidden = !info.control;
  cancel.disabled = false;

  let w = null; // the workflow as known: { state, seq, tenant, parent_id, created, updated, tasks: Map }
  const taskRows = new Map(); // task id → { tr, cells }
  const dirty = new Set();
  let ended = false;

  const flush = onFrame(() => {
    for (const tid of dirty) paintTask(tid);
    dirty.clear();
    paintHead();
  });

  function paintHead() {
    if (!w) return;
    badge($("wf-state"), w.state);
    const parts = [`tenant ${w.tenant}`, `seq ${w.seq}`];
    if (w.created) parts.push(`age ${duration((TERMINAL.has(w.state) ? w.updated : Date.now()) - w.created)}`);
    if (w.parent_id) parts.push(`parent ${w.parent_id}`);
    $("wf-meta").textContent = parts.join(" · ");
    $("tasks-empty").hidden = w.tasks.size > 0;
    cancel.disabled = TERMINAL.has(w.state);
  }

  function taskRow(tid) {
    let r = taskRows.get(tid);
    if (r) return r;
    const tr = el("tr");
    tr.dataset.task = tid;
    const name = el("td", "task", tid);
    const stateTd = el("td", "state");
    const b = el("span", "badge");
    stateTd.append(b);
    const attempt = el("td", "try");
    const progressTd = el("td", "progress");
    const setProgress = progressCell(progressTd);
    const time = el("td", "time");
    const msg = el("td", "msg");
    tr.append(name, stateTd, attempt, progressTd, time, msg);
    $("task-rows").append(tr);
    r = { tr, b, attempt, setProgress, time, msg };
    taskRows.set(tid, r);
    return r;
  }

  function paintTask(tid) {
    const t = w.tasks.get(tid);
    const r = taskRow(tid);
    badge(r.b, t.state);
    r.attempt.textContent = t.attempt ? String(t.attempt) : "";
    r.setProgress(t.progress, t.state);
    r.time.textContent = t.started ? duration((t.finished || Date.now()) - t.started) : "";
    r.msg.textContent = t.message || "";
    r.msg.title = t.message || "";
    r.tr.dataset.state = t.state;
  }

  function replace(m) {
    w = { state: m.state, seq: m.seq, tenant: m.tenant, parent_id: m.parent_id, created: m.created, updated: m.updated, tasks: new Map() };
    $("task-rows").replaceChildren();
    taskRows.clear();
    for (const [tid, t] of Object.entries(m.tasks || {})) {
      w.tasks.set(tid, { ...t });
      dirty.add(tid);
    }
    // The timeline starts with what the snapshot says: each task's state
    // as of its last change (the transitions before it are in the history).
    const known = [...w.tasks].sort((a, b) => (a[1].updated || 0) - (b[1].updated || 0));
    if (m.created) timeline(m.created, "workflow", "created");
    for (const [tid, t] of known) timeline(t.updated, `task ${tid}`, t.state);
    if (m.error) showError("workflow", m.error);
    for (const [tid, t] of w.tasks) if (t.error && t.state !== "completed") showError(`task ${tid}`, t.error);
  }

  function showError(where, error) {
    const box = $("wf-error");
    box.hidden = false;
    box.textContent = `last error (${where}): ${short(error)}`;
  }

  function addLine(list, node, max) {
    const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    list.append(node);
    while (list.childElementCount > max) list.firstElementChild.remove();
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function timeline(ts, what, state) {
    const li = el("li");
    li.append(el("span", "t", clock(ts)), document.createTextNode(`${what} → `));
    const b = el("span", "badge");
    badge(b, state);
    li.append(b);
    addLine($("timeline"), li, MAX_TIMELINE);
  }

  function logLine(m) {
    addLine($("logs"), logNode(m), MAX_LOGS);
  }

  // Opened on a running workflow: its latest log lines before the
  // snapshot, from the history (the ring, or the store), above the live ones.
  async function recentLogs(upTo) {
    if (upTo <= 0) return;
    try {
      const since = Math.max(0, upTo - 1000);
      const page = await api(`/v1/workflows/${encodeURIComponent(id)}/history?since=${since}&types=log&limit=1000`);
      const list = $("logs");
      const first = list.firstChild;
      for (const e of page.events) if (e.seq <= upTo) list.insertBefore(logNode(e), first);
      while (list.childElementCount > MAX_LOGS) list.firstElementChild.remove();
      list.scrollTop = list.scrollHeight;
    } catch (err) {
      // Out of the history's reach: the live lines only.
    }
  }

  function logNode(m) {
    const li = el("li");
    const level = m.level || "info";
    li.dataset.level = level;
    li.append(el("span", "t", clock(m.ts)), el("span", `lvl lvl-${level}`, level));
    if (m.task_id) li.append(el("span", "dim", `[${m.task_id}] `));
    li.append(document.createTextNode(m.message || ""));
    if (LEVELS[level] < LEVELS[$("level-filter").value]) li.classList.add("hidden");
    return li;
  }

  function handle(kind, m) {
    if (!w && kind !== "snapshot" && kind !== "resync") {
      // A stream that waited for the workflow: everything from its first event.
      replace({ state: "created", seq: 0, tenant: m.tenant || "default", parent_id: m.parent_id || null, created: m.ts, updated: m.ts, tasks: {} });
    }
    if (kind === "snapshot" || kind === "resync") {
      const first = w === null;
      replace(m);
      if (kind === "resync") timeline(m.updated, "resync: the state as it is now", m.state);
      else if (first) recentLogs(m.seq);
    } else if (kind === "state" || kind === "progress") {
      w.seq = m.seq;
      w.updated = m.ts;
      if (m.task_id && m.type.startsWith("task.")) {
        let t = w.tasks.get(m.task_id);
        if (!t) w.tasks.set(m.task_id, (t = { state: "created", progress: null, attempt: 0, started: null, finished: null, message: null }));
        if (m.message !== undefined) t.message = m.message;
        if (m.progress !== undefined) t.progress = m.progress;
        if (kind === "state") {
          t.state = m.state;
          if (m.state === "running") {
            t.attempt += 1;
            t.started = t.started || m.ts;
            t.finished = null;
          } else if (TERMINAL.has(m.state)) {
            t.finished = m.ts;
            if (m.state === "completed") t.progress = 100;
          }
          if (m.error !== undefined) showError(`task ${m.task_id}`, m.error);
          timeline(m.ts, `task ${m.task_id}`, m.state);
        }
        dirty.add(m.task_id);
      } else if (kind === "state" && m.type.startsWith("workflow.")) {
        w.state = m.state;
        if (m.error !== undefined) showError("workflow", m.error);
        timeline(m.ts, "workflow", m.state);
      }
    } else if (kind === "log") {
      w.seq = m.seq;
      logLine(m);
    } else if (kind === "event") {
      w.seq = m.seq;
      const li = el("li");
      li.append(el("span", "t", clock(m.ts)), document.createTextNode(m.type));
      addLine($("timeline"), li, MAX_TIMELINE);
    } else if (kind === "gap") {
      addLine($("logs"), el("li", "dim", `… ${m.dropped} lines skipped (the stream fell behind)`), MAX_LOGS);
    } else if (kind === "end") {
      w.state = m.state || w.state;
      ended = true;
      es.close();
      setStatus("ended", "■ ended");
    } else if (kind === "error") {
      addLine($("logs"), el("li", "lvl-error", `broker: ${m.code}: ${m.message}`), MAX_LOGS);
    }
    flush();
  }

  const es = openStream(`/v1/workflows/${encodeURIComponent(id)}/stream`, handle, null, `/v1/workflows/${encodeURIComponent(id)}`);
  const tick = setInterval(() => {
    if (!w || ended) return;
    paintHead();
    for (const [tid, t] of w.tasks) if (t.state === "running") paintTask(tid);
  }, 1000);
  const onLevel = () => {
    const min = LEVELS[$("level-filter").value];
    for (const li of $("logs").children) li.classList.toggle("hidden", LEVELS[li.dataset.level] < min);
  };
  $("level-filter").addEventListener("change", onLevel);
  const onCancel = async () => {
    cancel.disabled = true;
    try {
      const r = await api(`/v1/workflows/${encodeURIComponent(id)}/cancel`, { method: "POST", body: "{}", headers: { "Content-Type": "application/json" } });
      $("cancel-result").textContent = `cancel requested (${r.request_id})`;
    } catch (err) {
      $("cancel-result").textContent = `cancel refused: ${err.message}`;
      cancel.disabled = false;
    }
  };
  cancel.addEventListener("click", onCancel);

  return {
    close() {
      es.close();
      clearInterval(tick);
      $("level-filter").removeEventListener("change", onLevel);
      cancel.removeEventListener("click", onCancel);
      $("wf-view").hidden = true;
      document.title = "Workflow event broker";
    },
  };
}

// ------------------------------------------------------------- routing

function route() {
  if (view) view.close();
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/wf\/(.+)$/);
  view = m ? openWorkflow(decodeURIComponent(m[1])) : openList();
}

async function start() {
  try {
    info = await api("/v1/info");
    $("node").textContent = `node ${info.node} · ${info.version}`;
  } catch (err) {
    setStatus("error", `broker: ${err.message}`);
  }
  setupToken();
  window.addEventListener("hashchange", route);
  route();
}

start();
