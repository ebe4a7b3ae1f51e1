// cellpay demo dashboard: polls GET /api/state and draws it; the buttons POST
// to /api/cut, /api/heal and /api/switchover. No build step, no libraries.
"use strict";

const POLL_MS = 500;
const CELL_COLOURS = ["#8b949e", "#58a6ff", "#3fb950", "#d29922", "#bc8cff", "#f778ba", "#39c5cf", "#ff7b72",
  "#a5d6ff", "#7ee787", "#e3b341", "#d2a8ff"];
const cellColour = (cell) => CELL_COLOURS[cell % CELL_COLOURS.length];
const $ = (id) => document.getElementById(id);
const fmt = (n, digits = 0) => (n === null || n === undefined) ? "–" :
  Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
let controlsBuiltFor = "";


function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function post(path, body) {
  const message = $("control-message");
  try {
    const response = await fetch(path, { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify(body || {}) });
    const answer = await response.json();
    message.textContent = answer.ok || answer.error || "";
    message.className = response.ok ? "muted" : "link-down";
  } catch (error) {
    message.textContent = "request failed: " + error;
    message.className = "link-down";
  }
  poll();
}

function buildControls(state) {
  const key = state.regions.map((r) => r.name + ":" + r.datacenters.map((d) => d.name).join(",")).join(";");
  if (key === controlsBuiltFor) return;
  controlsBuiltFor = key;
  const controls = $("controls");
  controls.replaceChildren();
  for (const region of state.regions) {
    const row = el("div", { class: "control-region" }, el("b", {}, region.name));
    row.append(el("button", { class: "cut", "data-cut": "region:" + region.name,
      onclick: () => post("/api/cut", { target: "region:" + region.name }) }, "Cut region " + region.name));
    for (const datacenter of region.datacenters) {
      row.append(el("button", { class: "cut", "data-cut": "datacenter:" + datacenter.name,
        onclick: () => post("/api/cut", { target: "datacenter:" + datacenter.name }) }, "Cut " + datacenter.name));
    }
    row.append(el("button", { "data-switchover": region.name,
      onclick: () => post("/api/switchover", { region: region.name }) }, "Switch over"));
    row.append(el("button", { "data-switch-back": region.name,
      onclick: () => post("/api/switchover", { region: region.name, back: true }) }, "Back"));
    controls.append(row);
  }
  $("heal").onclick = () => post("/api/heal");
}

function renderControls(state) {
  const phase = state.drill.phase;
  for (const button of document.querySelectorAll("button[data-cut]")) button.disabled = phase !== "normal";
  $("heal").disabled = phase !== "cut";
  const drained = state.drill.switched_over;
  for (const button of document.querySelectorAll("button[data-switchover]")) button.disabled = drained !== null;
  for (const button of document.querySelectorAll("button[data-switch-back]")) {
    button.disabled = drained !== button.getAttribute("data-switch-back");
  }
  const pill = $("phase");
  const labels = { normal: "all regions connected", cut: "CUT: " + (state.drill.cut ? state.drill.cut.target : ""),
    healing: "healing", auditing: "auditing" };
  pill.textContent = labels[phase] + (drained ? " · " + drained + " switched over" : "");
  pill.className = "pill " + phase;
  $("uptime").textContent = "up " + fmt(state.uptime_s) + " s · gateway " + state.gateway;
}

function renderRecovery(state) {
  const drill = state.drill;
  const rto = $("rto"), rtoDetail = $("rto-detail"), rpo = $("rpo"), rpoDetail = $("rpo-detail");
  const cellLines = (cells) => cells.map((c) => "cell " + c.cell + ": " + (c.kept ? "kept node " : "new leader node ") +
    c.leader + " at " + fmt(c.after_ms) + " ms").join(" · ");
  if (drill.cut) {
    if (drill.cut.rto_ms !== null) {
      rto.textContent = "RTO " + fmt(drill.cut.rto_ms) + " ms";
      rto.className = "big pass";
      rtoDetail.textContent = "every cell commits again without " + drill.cut.target + " · " + cellLines(drill.cut.cells);
    } else {
      rto.textContent = "RTO: measuring… " + fmt(drill.cut.for_ms / 1000, 1) + " s";
      rto.className = "big waiting";
      rtoDetail.textContent = "waiting for cells " + drill.cut.waiting.join(", ") + " to commit again";
    }
    rpo.textContent = "RPO audit: after the heal";
    rpo.className = "big muted";
    rpoDetail.textContent = "";
    return;
  }
  const report = drill.last;
  if (drill.phase === "healing" || drill.phase === "auditing") {
    rpo.textContent = "RPO audit: " + drill.phase + "…";
    rpo.className = "big waiting";
  } else if (report) {
    rpo.textContent = report.passed ? "RPO = 0 · audit passed" : "RPO audit FAILED";
    rpo.className = "big " + (report.passed ? "pass" : "fail");
    const total = report.acknowledged_before + report.acknowledged_during;
    rpoDetail.textContent = fmt(report.found) + " of " + fmt(total) + " acknowledged transfers found (" +
      fmt(report.acknowledged_before) + " in the 10 s before the cut (or since the last audit), " + fmt(report.acknowledged_during) +
      " during it), " + fmt(report.missing) + " missing; money " + (report.conserved ? "conserved" : "NOT conserved") +
      " in every cell; healed replicas caught up in " + fmt(report.caught_up_ms) + " ms" +
      (report.problems.length ? " · " + report.problems.join("; ") : "");
  }
  if (report && drill.phase === "normal") {
    rto.textContent = report.rto_ms !== null ? "RTO " + fmt(report.rto_ms) + " ms" : "RTO: healed first";
    rto.className = "big " + (report.rto_ms !== null ? "pass" : "waiting");
    rtoDetail.textContent = report.target + " was cut for " + fmt(report.cut_ms / 1000, 1) + " s · " +
      cellLines(report.cells);
  }
}

function renderTopology(state) {
  const topology = $("topology");
  const nodes = new Map(state.nodes.map((n) => [n.id, n]));
  const regions = state.regions.map((region) => {
    const regionNodes = region.datacenters.flatMap((d) => d.nodes);
    const regionCut = regionNodes.every((id) => nodes.get(id).cut);
    const box = el("div", { class: "region" + (regionCut ? " cut" : "") }, el("div", { class: "name" }, region.name));
    const datacenters = el("div", { class: "datacenters" });
    for (const datacenter of region.datacenters) {
      const dc = el("div", { class: "datacenter" }, el("div", { class: "name" }, datacenter.name));
      for (const id of datacenter.nodes) {
        const node = nodes.get(id);
        const leads = el("div", { class: "leads" }, "leads: ");
        if (node.leads.length === 0) leads.append("–");
        for (const cell of node.leads) {
          leads.append(el("span", { class: "badge", style: "background:" + cellColour(cell) },
            cell === 0 ? "G" : cell));
        }
        const up = node.links.filter((l) => l.connected).length;
        const stateText = node.cut ? "CUT OFF" : (node.running ? "up" : "stopped") + " · links " + up + "/" +
          node.links.length;
        dc.append(el("div", { class: "node" + (node.cut ? " cut" : ""), "data-node": id },
          el("div", { class: "title" }, "node " + id), el("div", { class: "state" }, stateText), leads));
      }
      datacenters.append(dc);
    }
    box.append(datacenters);
    return box;
  });
  topology.replaceChildren(...regions);
  const latency = state.latency;
  $("latency").textContent = latency.enabled ? "emulated one-way latency " + latency.same_datacenter_us / 1000 +
    " / " + latency.same_region_us / 1000 + " / " + latency.cross_region_us / 1000 +
    " ms (datacenter / region / across)" : "emulated latency off";
  const ids = state.nodes.map((n) => n.id);
  const header = el("tr", {}, el("th", {}, ""), ...ids.map((id) => el("th", {}, id)));
  const rows = state.nodes.map((node) => {
    const links = new Map(node.links.map((l) => [l.peer, l]));
    return el("tr", {}, el("th", {}, node.id), ...ids.map((peer) => {
      if (peer === node.id) return el("td", { class: "muted" }, "·");
      const link = links.get(peer);
      const good = link && link.connected && !link.blocked;
      return el("td", { class: good ? "link-up" : "link-down", title: link && link.blocked ? "blocked" : "" },
        good ? "●" : (link && link.blocked ? "✕" : "○"));
    }));
  });
  $("links").replaceChildren(header, ...rows);
}

function renderCells(state) {
  const nodes = new Map(state.nodes.map((n) => [n.id, n]));
  const header = el("tr", {}, ...["cell", "shards", "leader", "term", "commit", "replicas (node: applied)",
    "prefers"].map((h) => el("th", {}, h)));
  const shardCounts = new Map();
  for (const owner of state.routing.owners) shardCounts.set(owner, (shardCounts.get(owner) || 0) + 1);
  const rows = state.cells.map((cell) => {
    const leader = cell.leader !== null ? nodes.get(cell.leader) : null;
    const replicas = el("td", {});
    for (const replica of cell.replicas) {
      const lagging = cell.commit !== null && replica.applied + 1000 < cell.commit;
      const cut = nodes.get(replica.node).cut;
      replicas.append(el("span", { class: "replica " + replica.role + (lagging ? " lagging" : "") + (cut ? " cut" : ""),
        title: replica.role + ", term " + replica.term + ", commit " + replica.commit },
      replica.node + ": " + fmt(replica.applied)));
    }
    return el("tr", {},
      el("td", {}, el("span", { class: "badge", style: "background:" + cellColour(cell.id) },
        cell.global ? "global" : cell.id)),
      el("td", {}, cell.global ? "routing, topology, ledgers" : fmt(shardCounts.get(cell.id) || 0)),
      el("td", {}, leader ? "node " + leader.id + " (" + leader.datacenter + ")" : "electing…"),
      el("td", {}, fmt(cell.term)), el("td", {}, fmt(cell.commit)), replicas,
      el("td", { class: "muted" }, cell.leader_preference.join(" › ")));
  });
  $("cells").replaceChildren(header, ...rows);
}

function renderShards(state) {
  const owners = state.routing.owners;
  const shards = owners.map((owner, shard) => el("div", { class: "shard",
    style: "background:" + (owner === null ? "#333" : cellColour(owner)),
    title: "shard " + String(shard).padStart(2, "0") + " → cell " + owner }, String(shard).padStart(2, "0")));
  $("shards").replaceChildren(...shards);
  $("routing-version").textContent = "routing table version " + state.routing.version + ", " + owners.length +
    " shards";
  const cells = [...new Set(owners)].sort((a, b) => a - b);
  $("shard-legend").replaceChildren(...cells.map((cell) => el("span", { class: "badge",
    style: "background:" + cellColour(cell) }, "cell " + cell)));
}

// A line chart: series = [{label, colour, values: [[t, v], ...]}]; marks = [[t, label]].
function drawChart(canvas, series, marks, unit) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 52, right = 8, top = 20, bottom = 20;
  ctx.clearRect(0, 0, w, h);
  const points = series.flatMap((s) => s.values);
  canvas.setAttribute("data-points", String(points.length));
  if (points.length === 0) {
    ctx.fillStyle = "#7d8b99";
    ctx.fillText("waiting for data…", left, h / 2);
    return;
  }
  const tMin = Math.min(...points.map((p) => p[0])), tMax = Math.max(tMin + 1, ...points.map((p) => p[0]));
  const vMax = Math.max(1, ...points.map((p) => p[1])) * 1.1;
  const x = (t) => left + (t - tMin) / (tMax - tMin) * (w - left - right);
  const y = (v) => top + (1 - v / vMax) * (h - top - bottom);
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = "#2a3440";
  ctx.fillStyle = "#7d8b99";
  for (let i = 0; i <= 4; i++) {
    const v = vMax * i / 4;
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(w - right, y(v)); ctx.stroke();
    ctx.fillText(fmt(v, v < 10 ? 1 : 0) + unit, 2, y(v) + 4);
  }
  ctx.fillText(fmt(tMin) + " s", left, h - 4);
  ctx.fillText(fmt(tMax) + " s", w - right - 40, h - 4);
  for (const [t, label] of marks) {
    if (t < tMin || t > tMax) continue;
    ctx.strokeStyle = label.startsWith("cut") ? "#f85149" : "#3fb950";
    ctx.beginPath(); ctx.moveTo(x(t), top); ctx.lineTo(x(t), h - bottom); ctx.stroke();
  }
  let legendX = left;
  for (const s of series) {
    ctx.strokeStyle = s.colour;
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    s.values.forEach(([t, v], i) => (i === 0 ? ctx.moveTo(x(t), y(v)) : ctx.lineTo(x(t), y(v))));
    ctx.stroke();
    ctx.lineWidth = 1;
    ctx.fillStyle = s.colour;
    ctx.fillText(s.label, legendX, 12);
    legendX += ctx.measureText(s.label).width + 14;
  }
}

function renderCharts(state) {
  const series = state.series;
  const marks = state.drill.events.filter((e) => e.text.startsWith("cut ") || e.text.startsWith("healing "))
    .map((e) => [e.t, e.text.startsWith("cut ") ? "cut" : "heal"]);
  const line = (label, colour, f) => ({ label, colour, values: series.map((p) => [p.t, f(p)]) });
  drawChart($("chart-tps"), [line("answered", "#58a6ff", (p) => p.transfers_per_s),
    line("accepted", "#3fb950", (p) => p.ok_per_s)], marks, "");
  drawChart($("chart-latency"), [line("p50", "#58a6ff", (p) => p.p50_ms), line("p99", "#d29922", (p) => p.p99_ms)],
    marks, "");
  drawChart($("chart-errors"), [line("failed transfers", "#f85149", (p) => p.errors),
    line("cross-cell %", "#bc8cff", (p) => p.cross_cell_percent)], marks, "");
  const cells = state.cells.map((c) => c.id);
  drawChart($("chart-commits"), cells.map((cell) => line(cell === 0 ? "global" : "cell " + cell, cellColour(cell),
    (p) => p.commits_per_s[cell] || 0)), marks, "");
  const now = series[series.length - 1];
  if (now) {
    $("tps-now").textContent = fmt(now.transfers_per_s) + "/s";
    $("latency-now").textContent = "p50 " + fmt(now.p50_ms, 1) + " · p99 " + fmt(now.p99_ms, 1);
    $("errors-now").textContent = fmt(now.errors) + " failed · " + fmt(now.cross_cell_percent, 1) + "% cross-cell";
    const total = Object.values(now.commits_per_s).reduce((a, b) => a + b, 0);
    $("commits-now").textContent = fmt(total) + "/s";
  }
}

function renderEvents(state) {
  const events = state.drill.events.slice().reverse();
  $("events").replaceChildren(...events.map((e) => el("li", {}, "[" + fmt(e.t, 1) + " s] " + e.text)));
  const totals = state.totals;
  const results = Object.entries(totals.results).map(([code, n]) => code + " " + fmt(n)).join(" · ");
  $("totals").replaceChildren(
    el("div", {}, "results: " + (results || "none yet")),
    el("div", {}, "cross-cell payments: " + fmt(totals.cross_cell_ok) + " of " + fmt(totals.cross_cell_sent) + " ok"),
    el("div", {}, "failed batches: " + fmt(totals.batches_failed) + " (" + fmt(totals.transfers_failed) +
      " transfers)"));
}

async function poll() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    const state = await response.json();

    buildControls(state);
    renderControls(state);
    renderRecovery(state);
    renderTopology(state);
    renderCells(state);
    renderShards(state);
    renderCharts(state);
    renderEvents(state);
  } catch (error) {
    $("phase").textContent = "demo not reachable";
    $("phase").className = "pill cut";
  }
}

poll();
setInterval(poll, POLL_MS);
