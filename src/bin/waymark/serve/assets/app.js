// Waymark's dashboard: polls the JSON API under /api and draws the view
// the URL's fragment names. No framework, no build step.
"use strict";

const view = document.getElementById("view");
const message = document.getElementById("message");
const tokenInput = document.getElementById("token");
const POLL_MS = 1000;

tokenInput.value = localStorage.getItem("waymark-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("waymark-token", tokenInput.value));

// The runs view's filters and page, kept across redraws.
const runsState = { state: "", workflow: "", pages: [null] };

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function when(ms) {
  if (ms === null || ms === undefined) return "";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function pill(state) {
  return `<span class="pill ${esc(state)}">${esc(String(state).replace(/_/g, " "))}</span>`;
}

function headers() {
  const h = { Accept: "application/json" };
  const token = tokenInput.value || localStorage.getItem("waymark-token");
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

async function get(path) {
  const response = await fetch(path, { headers: headers() });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

async function post(path) {
  const response = await fetch(path, { method: "POST", headers: headers() });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function say(text, isError) {
  message.hidden = !text;
  message.textContent = text || "";
  message.className = isError ? "error" : "";
}

// A button's action: POST, then say what happened and redraw.
async function act(path, done) {
  try {
    const answer = await post(path);
    say(done(answer), false);
  } catch (e) {
    say(e.message, true);
  }
  refresh();
}

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [name, ...rest] = hash.split("/");
  return { name: name || "runs", arg: decodeURIComponent(rest.join("/")) };
}

async function drawRuns() {
  const params = new URLSearchParams();
  if (runsState.state) params.set("state", runsState.state);
  if (runsState.workflow) params.set("workflow", runsState.workflow);
  const after = runsState.pages[runsState.pages.length - 1];
  if (after) params.set("after", after);
  params.set("limit", "50");
  const page = await get(`/api/runs?${params}`);
  const states = ["", "live", "ended", "pending", "scheduled", "running", "parked", "waiting_for_signal",
    "waiting_for_children", "succeeded", "failed", "cancelled", "timed_out"];
  const rows = page.runs.map((r) => `<tr data-run="${esc(r.run_id)}">
      <td><a href="#/run/${encodeURIComponent(r.run_id)}">${esc(r.run_id)}</a></td>
      <td>${esc(r.workflow)}</td><td>${pill(r.state)}</td><td class="num">${r.step}</td>
      <td>${r.live ? `<button class="danger" data-cancel="${esc(r.run_id)}">cancel</button>` : ""}</td></tr>`).join("");
  view.innerHTML = `<h1>Runs</h1>
    <div class="filters">
      <select id="f-state">${states.map((s) => `<option value="${s}" ${s === runsState.state ? "selected" : ""}>${s || "any state"}</option>`).join("")}</select>
      <input id="f-workflow" placeholder="workflow" value="${esc(runsState.workflow)}">
      <button id="prev" ${runsState.pages.length > 1 ? "" : "disabled"}>previous</button>
      <button id="next" ${page.next ? "" : "disabled"} data-next="${esc(page.next || "")}">next</button>
      <span class="muted">live: refreshed every second</span>
    </div>
    <table id="runs"><thead><tr><th>run</th><th>workflow</th><th>state</th><th>step</th><th></th></tr></thead>
    <tbody>${rows || `<tr><td colspan="5" class="muted">no runs</td></tr>`}</tbody></table>
    ${page.unreadable.length ? `<div class="unreadable" id="unreadable"><strong>${page.unreadable.length} run(s) left out: their records do not decode</strong>
      (corrupt, or written by a newer Waymark)<ul>${page.unreadable.map((u) => `<li>${esc(u.run_id)}: ${esc(u.error)}</li>`).join("")}</ul></div>` : ""}`;
  document.getElementById("f-state").onchange = (e) => { runsState.state = e.target.value; runsState.pages = [null]; refresh(); };
  document.getElementById("f-workflow").onchange = (e) => { runsState.workflow = e.target.value.trim(); runsState.pages = [null]; refresh(); };
  document.getElementById("prev").onclick = () => { runsState.pages.pop(); refresh(); };
  document.getElementById("next").onclick = (e) => { runsState.pages.push(e.target.dataset.next); refresh(); };
  view.querySelectorAll("[data-cancel]").forEach((b) => {
    b.onclick = () => act(`/api/runs/${encodeURIComponent(b.dataset.cancel)}/cancel`,
      (a) => a.cancelled ? `cancelled ${a.run_id}` : `${a.run_id} was not cancelled (it had ended)`);
  });
}

// What an attempt became, in words, and whether it failed or waits.
function became(a) {
  const o = a.outcome || {};
  switch (o.kind) {
    case "continued": return ["continued", ""];
    case "delayed": return ["delayed", `next step at ${when(o.until_ms)}`];
    case "waiting_for_signal": return ["waiting for signal", `until ${when(o.until_ms)}`];
    case "spawned_children": return ["spawned children", `${o.children} children`];
    case "continued_as_new": return ["continued as new", `segment ${o.segment}`];
    case "retrying": return ["retrying", `next attempt at ${when(o.at_ms)}`];
    case "deferred": return ["deferred", `breaker backoff until ${when(o.until_ms)}`];
    case "parked": return ["parked", "breaker tripped"];
    case "ended": return [String(o.status).replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase(), ""];
    default: return [o.kind || "?", ""];
  }
}

function timeline(history) {
  if (!history) return `<p class="muted">No step history is kept for this run.</p>`;
  const items = [];
  for (const step of history.steps || []) {
    for (const a of step.attempts || []) {
      const [what, detail] = became(a);
      const cls = a.error ? "failed" : (["retrying", "deferred", "parked", "waiting for signal", "delayed"].includes(what) ? "waiting" : "");
      items.push(`<li class="${cls}" data-step="${step.step}" data-attempt="${a.attempt}" data-outcome="${esc(what)}">
        <strong>step ${step.step}</strong> attempt ${a.attempt} ${pill(what)}${a.signalled ? " " + pill("signalled") : ""}
        <span class="muted">${when(a.started_ms)} → ${when(a.ended_ms)}</span>
        ${detail ? `<div class="muted">${esc(detail)}</div>` : ""}
        ${a.error ? `<pre>${esc(a.error)}</pre>` : ""}</li>`);
    }
  }
  const dropped = history.dropped ? `<p class="muted">${history.dropped} older entries dropped</p>` : "";
  return items.length ? `${dropped}<ol class="timeline" id="timeline">${items.join("")}</ol>` : `<p class="muted">No step has settled yet.</p>`;
}

async function drawRun(id) {
  const run = await get(`/api/runs/${encodeURIComponent(id)}`);
  const live = run.live;
  const outcome = run.outcome;
  const facts = [["workflow", esc(run.workflow)]];
  if (live) {
    facts.push(["state", pill(live.state)], ["step", live.step]);
    if (live.scheduled_for_ms) facts.push(["runs at", when(live.scheduled_for_ms)]);
    if (live.children_live !== null) facts.push(["children live", live.children_live]);
  }
  if (outcome) {
    facts.push(["ended", pill(outcome.status)], ["final step", outcome.final_step]);
    if (outcome.error) facts.push(["error", `<pre>${esc(outcome.error)}</pre>`]);
    if (outcome.result) facts.push(["result", `<pre>${esc(outcome.result)}</pre>`]);
  }
  const children = run.children.map((c) => `<tr><td><a href="#/run/${encodeURIComponent(c.run_id)}">${esc(c.run_id)}</a></td>
    <td>${pill(c.state)}</td><td class="num">${c.step}</td></tr>`).join("")
    + run.children_unreadable.map((c) => `<tr><td>${esc(c.run_id)}</td><td colspan="2">unreadable: ${esc(c.error)}</td></tr>`).join("");
  view.innerHTML = `<h1>Run ${esc(run.run_id)} ${live ? `<button class="danger" id="cancel">cancel</button>` : ""}</h1>
    <dl>${facts.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("")}</dl>
    <h2>Step timeline</h2>${timeline(run.history)}
    ${children ? `<h2>Children</h2><table><thead><tr><th>run</th><th>state</th><th>step</th></tr></thead><tbody>${children}</tbody></table>` : ""}`;
  const cancel = document.getElementById("cancel");
  if (cancel) cancel.onclick = () => act(`/api/runs/${encodeURIComponent(id)}/cancel`,
    (a) => a.cancelled ? `cancelled ${a.run_id}` : `${a.run_id} was not cancelled`);
}

async function drawWorkflows() {
  const all = await get("/api/workflows");
  // On a fleet each shard has its own breaker: one row per shard.
  const fleet = all.some((w) => "shard" in w);
  const rows = all.map((w) => `<tr data-workflow="${esc(w.name)}"${fleet ? ` data-shard="${w.shard}"` : ""}>
      <td>${esc(w.name)}</td>${fleet ? `<td class="num">${w.shard}</td>` : ""}<td class="breaker">${pill(w.breaker.state)}
      ${w.breaker.since_ms ? `<div class="muted">since ${when(w.breaker.since_ms)}</div>` : ""}
      ${w.breaker.until_ms ? `<div class="muted">until ${when(w.breaker.until_ms)}</div>` : ""}</td>
      <td class="num">${w.failure_streak}</td><td class="num">${w.runs_succeeded}</td><td class="num">${w.runs_failed}</td>
      <td><pre>${esc(w.last_error || "")}</pre></td>
      <td>${w.breaker.state !== "closed" ? `<button class="danger" data-reset="${esc(w.name)}">reset</button>` : ""}</td></tr>`).join("");
  const columns = fleet ? 8 : 7;
  view.innerHTML = `<h1>Workflows</h1>
    ${fleet ? `<p class="muted">A fleet: each shard keeps its own breaker; reset closes it on every shard.</p>` : ""}
    <table id="workflows"><thead><tr><th>workflow</th>${fleet ? "<th>shard</th>" : ""}<th>breaker</th><th>failure streak</th><th>succeeded</th><th>failed</th><th>last error</th><th></th></tr></thead>
    <tbody>${rows || `<tr><td colspan="${columns}" class="muted">no workflow has run yet</td></tr>`}</tbody></table>`;
  view.querySelectorAll("[data-reset]").forEach((b) => {
    b.onclick = () => act(`/api/workflows/${encodeURIComponent(b.dataset.reset)}/reset`, (a) => {
      if (a.shards_open) {
        return a.shards_open.length
          ? `reset ${a.workflow} on shard ${a.shards_open.join(", ")}: its breaker there closed and its parked steps run`
          : `reset ${a.workflow}: it was not open on any shard`;
      }
      return `reset ${a.workflow}: ${a.was_open ? "its breaker closed and its parked steps run" : "it was not open"}`;
    });
  });
}

async function drawSchedules() {
  const all = await get("/api/schedules");
  const rows = all.map((s) => `<tr><td>${esc(s.id)}</td><td>${esc(s.fires)}</td><td>${esc(s.workflow)}</td>
      <td>${s.paused ? pill("paused") : s.active ? pill("active") : pill("inactive")}</td>
      <td>${when(s.next_fire_ms)}</td><td>${when(s.last_fire_ms)}</td>
      <td>${s.last_run_id ? `<a href="#/run/${encodeURIComponent(s.last_run_id)}">${esc(s.last_run_id)}</a> ${pill(s.last_outcome)}` : ""}</td>
      <td class="num">${s.run_count}</td><td><pre>${esc(s.last_error || "")}</pre></td>
      <td><button data-trigger="${esc(s.id)}">trigger</button></td></tr>`).join("");
  view.innerHTML = `<h1>Schedules</h1>
    <table id="schedules"><thead><tr><th>schedule</th><th>fires</th><th>workflow</th><th>state</th><th>next fire</th><th>last fire</th><th>last run</th><th>runs</th><th>last error</th><th></th></tr></thead>
    <tbody>${rows || `<tr><td colspan="10" class="muted">no schedules</td></tr>`}</tbody></table>`;
  view.querySelectorAll("[data-trigger]").forEach((b) => {
    b.onclick = () => act(`/api/schedules/${encodeURIComponent(b.dataset.trigger)}/trigger`, (a) => `fired ${a.schedule}: run ${a.run_id}`);
  });
}

async function drawDead() {
  const [steps, hooks] = await Promise.all([get("/api/dead?kind=step"), get("/api/dead?kind=hook")]);
  const jobs = steps.jobs.concat(hooks.jobs);
  const fleet = jobs.some((j) => "shard" in j);
  const rows = jobs.map((j) => `<tr data-job="${esc(j.job_id)}"><td>${esc(j.job_id)}</td>${fleet ? `<td class="num">${j.shard}</td>` : ""}<td>${esc(j.kind)}</td>
      <td>${j.run_id ? `<a href="#/run/${encodeURIComponent(j.run_id)}">${esc(j.run_id)}</a>` : ""}</td>
      <td>${esc(j.workflow || "")}</td><td class="num">${j.step ?? ""}</td><td class="num">${j.attempts}</td><td><pre>${esc(j.reason || "")}</pre></td>
      <td><button data-requeue="${esc(j.job_id)}">requeue</button></td></tr>`).join("");
  const more = steps.next || hooks.next ? `<p class="muted">showing the first ${steps.jobs.length + hooks.jobs.length}; use the API's paging for the rest</p>` : "";
  view.innerHTML = `<h1>Dead letters</h1>
    <table id="dead"><thead><tr><th>job</th>${fleet ? "<th>shard</th>" : ""}<th>kind</th><th>run</th><th>workflow</th><th>step</th><th>attempts</th><th>reason</th><th></th></tr></thead>
    <tbody>${rows || `<tr><td colspan="9" class="muted">no dead letters</td></tr>`}</tbody></table>${more}`;
  view.querySelectorAll("[data-requeue]").forEach((b) => {
    b.onclick = () => act(`/api/dead/${encodeURIComponent(b.dataset.requeue)}/requeue`, (a) => a.requeued === "rerun"
      ? `requeued ${a.job_id}: run ${a.run_id} runs again from that step (re-run ${a.rerun})`
      : `requeued ${a.job_id}: the hook is delivered again`);
  });
}

// A heartbeat is live when it is not a clean stop and is no older than
// three of its intervals (by this browser's clock).
function beating(beat) {
  return beat.last_beat_ms !== null && !beat.closed && Date.now() - beat.last_beat_ms < 3 * beat.interval_ms;
}

async function drawWorker() {
  const w = document.getElementById("worker");
  try {
    const beat = await get("/api/worker");
    if (beat.shards) {
      const live = beat.shards.filter(beating).length;
      w.textContent = `fleet of ${beat.shards.length} shards: ${live} with a live worker` +
        (beat.last_beat_ms === null ? "" : `, newest beat ${when(beat.last_beat_ms)}`);
    } else if (beat.last_beat_ms === null) w.textContent = "no worker has run";
    else if (beat.closed) w.textContent = `worker stopped ${when(beat.last_beat_ms)}`;
    else w.textContent = `worker beat ${when(beat.last_beat_ms)}`;
  } catch (e) {
    w.textContent = "";
  }
}

let drawing = false;
async function refresh() {
  if (drawing) return;
  drawing = true;
  const { name, arg } = route();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === name || (name === "run" && a.dataset.view === "runs")));
  // Keep a focused filter field while the table redraws.
  if (document.activeElement && document.activeElement.id && document.activeElement.id.startsWith("f-")) { drawing = false; return; }
  try {
    if (name === "run") await drawRun(arg);
    else if (name === "workflows") await drawWorkflows();
    else if (name === "schedules") await drawSchedules();
    else if (name === "dead") await drawDead();
    else await drawRuns();
    document.body.dataset.loaded = name;
  } catch (e) {
    say(e.message, true);
  } finally {
    drawing = false;
  }
  drawWorker();
}

window.addEventListener("hashchange", () => { say(""); refresh(); });
refresh();
setInterval(refresh, POLL_MS);
