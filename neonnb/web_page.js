"use strict";
// The dashboard's page: everything it shows comes from the JSON API (see neonnb/web.py).
const tokenBox = document.getElementById("token");
const fromUrl = new URLSearchParams(location.search).get("token");
if (fromUrl) {
  // Kept for this tab only, and taken out of the address bar (and so out of history and bookmarks).
  sessionStorage.setItem("neonnb-token", fromUrl);
  const url = new URL(location.href); url.searchParams.delete("token");
  window.history.replaceState(null, "", url.pathname + url.search + url.hash);
}
tokenBox.value = sessionStorage.getItem("neonnb-token") || "";
// Behind Jupyter's proxy there is no token to give (the page's cookie proves its writes): no box.
if (document.cookie.split("; ").some(c => c.startsWith("neonnb_csrf="))) document.getElementById("token-box").hidden = true;
tokenBox.addEventListener("change", () => { sessionStorage.setItem("neonnb-token", tokenBox.value); complain(""); });
const base = location.pathname.replace(/\/$/, "");
const depth = {};  // queue -> waiting counts of the last minute

function headers() {
  const sent = tokenBox.value ? {"Authorization": "Bearer " + tokenBox.value} : {};
  // Behind Jupyter's proxy the dashboard sets this cookie; echoing it proves the write comes from this page.
  const csrf = document.cookie.split("; ").find(c => c.startsWith("neonnb_csrf="));
  if (csrf) sent["X-Neonnb-CSRF"] = csrf.slice("neonnb_csrf=".length);
  return sent;
}
async function api(path, method = "GET") {
  const response = await fetch(base + path, {method, headers: headers(), credentials: "same-origin"});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}
function cell(text, cls = "") {
  const td = document.createElement("td");
  td.textContent = text; if (cls) td.className = cls; return td;
}
function fill(table, head, rows, empty) {
  table.replaceChildren();
  if (!rows.length) { const tr = table.insertRow(); tr.append(cell(empty, "muted")); return; }
  const tr = table.insertRow(); for (const h of head) { const th = document.createElement("th"); th.textContent = h; tr.append(th); }
  for (const row of rows) { const r = table.insertRow(); for (const c of row) r.append(c); }
}
function spark(values) {
  const td = document.createElement("td"); const max = Math.max(1, ...values);
  const points = values.map((v, i) => `${i * 2},${20 - 18 * v / max}`).join(" ");
  td.innerHTML = `<svg width="120" height="20"><polyline fill="none" stroke="var(--accent)" points="${points}"/></svg>`;
  return td;
}
function button(label, action) {
  const td = document.createElement("td"); const b = document.createElement("button");
  b.textContent = label; b.dataset.action = label.toLowerCase();
  b.onclick = () => act(action);
  td.append(b); return td;
}
function say(text, error = false) {
  const s = document.getElementById("status"); s.textContent = text; s.className = error ? "error" : "muted";
}
// What a click led to stays shown until the next click or token: the refresh doesn't overwrite it.
function complain(text) { document.getElementById("problem").textContent = text; }
async function act(action) {
  complain("");
  try { await action(); await refresh(); } catch (e) { complain(e.message); }
}
function jobsQuery() {
  const params = new URLSearchParams({limit: "30"});
  const status = document.getElementById("f-status").value, queue = document.getElementById("f-queue").value.trim();
  if (status) params.set("status", status);
  if (queue) params.set("queue", queue);
  return "/api/jobs?" + params.toString();
}
function idCell(id) {
  const td = cell(id.slice(-8)); td.title = id; td.dataset.jobId = id; td.className = "link";
  td.onclick = () => showJob(id); return td;
}
// One job, whole: what it was given, what it returned or why it failed, what it printed.
async function showJob(id) {
  const box = document.getElementById("job");
  try {
    const j = await api(`/api/jobs/${encodeURIComponent(id)}`);
    const when = t => t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "-";
    const rows = [["job", j.id], ["name", j.name], ["queue", j.queue], ["status", j.status],
      ["attempts", `${j.attempts} of ${j.max_attempts}`], ["created (UTC)", when(j.created_at)],
      ["started (UTC)", when(j.started_at)], ["finished (UTC)", when(j.finished_at)], ["worker", j.worker_id || "-"],
      ["arguments", JSON.stringify(j.arguments)], ["result", j.result_shown === null ? "-" : JSON.stringify(j.result_shown)]];
    if (j.error) rows.push(["error", `${j.error.type}: ${j.error.message}`]);
    const table = document.createElement("table");
    for (const [k, v] of rows) { const r = table.insertRow(); r.append(cell(k, "muted"), cell(v)); }
    const parts = [table];
    for (const [title, text] of [["traceback", j.error && j.error.traceback], ["output", j.output]]) {
      if (!text) continue;
      const h = document.createElement("h3"); h.textContent = title;
      const pre = document.createElement("pre"); pre.textContent = text; parts.push(h, pre);
    }
    box.replaceChildren(...parts); box.hidden = false;
    complain("");
  } catch (e) { complain(e.message); }
}
async function refresh() {
  const [queues, running, failed, workers, schedules, listed, history] = await Promise.all([
    api("/api/queues"), api("/api/jobs?status=running&limit=40"), api("/api/failed?limit=50&offset=0"),
    api("/api/workers"), api("/api/schedules"), api(jobsQuery()), api("/api/history")]);
  const name = document.getElementById("f-name").value.trim().toLowerCase();
  fill(document.getElementById("jobs"), ["job", "name", "queue", "status", "attempts", "finished (UTC)"],
    listed.jobs.filter(j => !name || j.name.toLowerCase().includes(name)).map(j => [idCell(j.id), cell(j.name),
      cell(j.queue), cell(j.status, j.status), cell(`${j.attempts}/${j.max_attempts}`, "num"),
      cell(j.finished_at ? new Date(j.finished_at * 1000).toISOString().replace("T", " ").slice(0, 19) : "-")]),
    "no such jobs");
  let waiting = 0, runningCount = 0, failedCount = 0;
  const queueRows = Object.entries(queues).map(([name, c]) => {
    const now = c.waiting.high + c.waiting.normal + c.waiting.low;
    waiting += now; runningCount += c.running; failedCount += c.failed;
    (depth[name] = depth[name] || []).push(now); if (depth[name].length > 60) depth[name].shift();
    // The last hour by the minute (since the dashboard started): attempts that ended, the share that failed.
    const hour = history.queues[name] || {ended: [], failed: []};
    const ended = hour.ended.reduce((a, b) => a + b, 0), lost = hour.failed.reduce((a, b) => a + b, 0);
    const throughput = spark(hour.ended); throughput.classList.add("throughput");
    throughput.title = `${ended} attempts ended in the last hour`;
    const rate = cell(ended ? `${(100 * lost / ended).toFixed(1)}%` : "-", "num failure-rate" + (lost ? " failed" : ""));
    rate.title = `${lost} of ${ended} attempts failed in the last hour`;
    const toggle = c.paused ? "Resume" : "Pause";
    const steer = button(toggle, () => api(`/api/queues/${encodeURIComponent(name)}/${toggle.toLowerCase()}`, "POST"));
    const state = [c.paused ? "paused" : "active", c.rate ? `at most ${c.rate}` : "",
                   c.concurrency ? `at most ${c.concurrency} at once` : ""].filter(Boolean).join(", ");
    return [cell(name), cell(state, c.paused ? "failed" : "muted"), cell(now, "num"),
            cell(c.delayed, "num"), cell(c.running, "num"), cell(c.succeeded, "num"),
            cell(c.failed, "num" + (c.failed ? " failed" : "")), spark(depth[name]), throughput, rate, steer];
  });
  fill(document.getElementById("queues"), ["queue", "state", "waiting", "delayed", "running", "succeeded", "failed",
       "waiting, last minute", "ended per minute, last hour", "failed, last hour", ""], queueRows, "no jobs yet");
  fill(document.getElementById("running"), ["job", "name", "queue", "progress", ""], running.jobs.map(j => {
    const p = j.progress || {}; const td = document.createElement("td");
    const share = p.total ? Math.min(1, p.done / p.total) : 0;
    td.innerHTML = `<div class="bar"><div style="width:${(share * 100).toFixed(0)}%"></div></div>`;
    return [cell(j.id.slice(-8)), cell(j.name), cell(j.queue), td, cell(p.message || "", "muted")];
  }), "nothing running");
  fill(document.getElementById("failed"), ["job", "name", "queue", "arguments", "error", "", ""], failed.jobs.map(f => {
    const args = JSON.stringify(f.arguments);  // shortened by the API; frames by their shape
    const shown = cell(args.length > 60 ? args.slice(0, 59) + "…" : args, "muted"); shown.title = args;
    const row = [cell(f.id.slice(-8)), cell(f.name), cell(f.queue), shown, cell(`${f.error_type}: ${f.error}`, "failed"),
                 button("Retry", () => api(`/api/failed/${f.id}/retry`, "POST")),
                 button("Forget", () => api(`/api/failed/${f.id}`, "DELETE"))];
    row[0].title = f.id; row[0].dataset.jobId = f.id; return row;
  }), "no failed jobs");
  const retryAll = document.getElementById("retry-all"); retryAll.hidden = failed.total < 2;
  retryAll.onclick = () => act(() => api("/api/failed/retry-all", "POST"));
  fill(document.getElementById("workers"), ["worker", "host", "pid", "queues", "state", "busy", "done", "failed"],
    workers.workers.map(w => [cell(w.id), cell(w.host), cell(w.pid, "num"), cell(w.queues.join(", ")),
      cell(w.state, w.state), cell(`${w.running.length} of ${w.concurrency}`), cell(w.jobs_done, "num"),
      cell(w.jobs_failed, "num")]), "no workers");
  const when = t => t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "-";
  fill(document.getElementById("schedules"), ["schedule", "rule", "tz", "queue", "job", "last tick (UTC)",
       "next tick (UTC)", "scheduler"], schedules.schedules.map(s => [cell(s.name), cell(s.rule), cell(s.tz),
      cell(s.queue), cell(s.job), cell(when(s.last_tick)), cell(when(s.next_tick)),
      cell(`${s.scheduler} (${s.state})`, s.state)]), "no scheduler runs");
  document.getElementById("summary").textContent =
    `${waiting} waiting · ${runningCount} running · ${failedCount} failed · ${workers.workers.length} worker(s)`;
  say("updated " + new Date().toLocaleTimeString());
}
async function loop() {
  try { await refresh(); } catch (e) { say(e.message, true); }
  setTimeout(loop, 1000);
}
for (const id of ["f-status", "f-queue", "f-name"]) document.getElementById(id).addEventListener("change", refresh);
document.getElementById("f-id").addEventListener("change", e => { if (e.target.value.trim()) showJob(e.target.value.trim()); });
loop();
