// Mirador's live web view. It speaks the daemon's public HTTP API like any other client:
// POST /api/chat (model "mirador", NDJSON; every chunk carries the Mirador event in "mirador"),
// POST /mirador/rate, GET/DELETE /mirador/memories, GET /mirador/status.
// Model output is untrusted text: it only ever reaches the page through textContent.
"use strict";

const $ = (id) => document.getElementById(id);

// The terminal's bands (`mirador ask`): dim below 0.7, plain below 0.9, bold above.
const BANDS = [[0.9, "high"], [0.7, "mid"], [0, "low"]];
const band = (c) => BANDS.find(([min]) => c >= min)[1];

const view = {
  controller: null,     // AbortController of the running answer; aborting disconnects = cancel
  queryId: null,
  stages: new Map(),    // stage name -> {el, text, tokens}
  lastStage: null,      // the plan's last stage: it writes the answer
  incognito: false,     // the running answer's: nothing recalled, stored or learned
};

// ---- small helpers ---------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child);  // strings become text nodes
  return node;
}

const fmt = {
  s: (x) => (x == null ? "–" : x < 1 ? `${Math.round(x * 1000)} ms` : `${x.toFixed(2)} s`),
  rate: (x) => (x == null ? "–" : `${x.toFixed(1)} tok/s`),
  sim: (x) => (x == null ? "" : `${Math.round(x * 100)}%`),
  when: (ts) => (ts ? new Date(ts * 1000).toLocaleString() : ""),
};

function showError(message, where = $("errors")) {
  where.append(el("p", { class: "error", text: message }));
}

function clearErrors() {
  $("errors").replaceChildren();
}

// The API's errors come as {"error": "..."} (Ollama's shape) or {"error": {"message": ...}}
// (OpenAI's); anything else is shown with its HTTP status.
async function apiError(response) {
  let body = "";
  try {
    body = await response.text();
    const parsed = JSON.parse(body);
    const err = parsed.error;
    if (typeof err === "string") return err;
    if (err && err.message) return err.message;
  } catch (_) { /* not JSON: show the text */ }
  return `${response.status} ${response.statusText}${body ? `: ${body.slice(0, 300)}` : ""}`;
}

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error(`cannot reach the daemon (${e.message}); is miradord running?`);
  }
  if (!response.ok) throw new Error(await apiError(response));
  return response.json();
}

// ---- the daemon line -------------------------------------------------------------------------

async function loadStatus() {
  try {
    const s = await api("GET", "/mirador/status");
    const parts = ["daemon running"];
    if (s.pid) parts.push(`pid ${s.pid}`);
    if (s.uptime_s != null) parts.push(`up ${Math.round(s.uptime_s)} s`);
    if (s.http) parts.push(s.http);
    $("daemon").textContent = parts.join(" · ");
  } catch (e) {
    $("daemon").textContent = `daemon: ${e.message}`;
  }
}

// ---- asking ----------------------------------------------------------------------------------

function resetAnswer(question) {
  view.stages.clear();
  view.queryId = null;
  view.lastStage = null;
  $("answer").hidden = false;
  $("answer").dataset.state = "asking";
  $("answer").dataset.question = question;
  $("route").textContent = "routing…";
  $("route").removeAttribute("data-route");
  $("reason").textContent = "";
  $("plan").textContent = "";
  $("recalled-count").textContent = "0";
  $("recalled-list").replaceChildren();
  $("recalled").hidden = true;
  $("recalled").open = false;
  $("stages").replaceChildren();
  $("stages").removeAttribute("data-stages");
  $("done-line").textContent = "";
  $("rating").disabled = true;
  $("rating-result").textContent = "";
  for (const b of $("rating").querySelectorAll("button")) b.removeAttribute("aria-pressed");
}

function stagePanel(name) {
  let stage = view.stages.get(name);
  if (stage) return stage;
  const node = $("stage-template").content.firstElementChild.cloneNode(true);
  node.dataset.stage = name;
  node.querySelector(".stage-name").textContent = name;
  stage = { el: node, text: node.querySelector(".stage-text"), tokens: 0 };
  view.stages.set(name, stage);
  $("stages").append(node);
  return stage;
}

function markAnswerStage() {
  for (const [name, stage] of view.stages) {
    const role = stage.el.querySelector(".stage-role");
    role.textContent = name === view.lastStage ? "answer" : "";
    stage.el.classList.toggle("is-answer", name === view.lastStage);
  }
}

function onStart(ev) {
  $("route").textContent = ev.route || "?";
  $("route").dataset.route = ev.route || "";
  $("reason").textContent = ev.reason || "";
  const plan = [];
  if (ev.mode) plan.push(ev.mode);
  if (ev.type) plan.push(`type ${ev.type}`);
  if (ev.plan) plan.push(`plan ${ev.plan}`);
  if (ev.learned) plan.push(`learned from your ratings: ${ev.learned.plan || JSON.stringify(ev.learned)}`);
  if (ev.power && ev.power.profile && ev.power.profile !== "maximum") plan.push(`power ${ev.power.profile}`);
  $("plan").textContent = plan.join(" · ");
  const stages = ev.stages || [];
  $("stages").dataset.stages = stages.join(",");
  for (const name of stages) stagePanel(name);
  view.lastStage = stages.length ? stages[stages.length - 1] : null;
  markAnswerStage();
}

function onMemory(ev) {
  const recalled = ev.recalled || [];
  $("recalled").hidden = false;
  $("recalled").open = recalled.length > 0;
  $("recalled-count").textContent = String(recalled.length);
  $("recalled-list").replaceChildren(...recalled.map((m) =>
    el("li", { "data-id": m.id }, el("span", { class: "sim", text: fmt.sim(m.similarity) }), " ", m.question || m.id)));
  if (ev.history && ev.history.length) {
    $("recalled-list").append(el("li", { class: "muted", text: `and ${ev.history.length} earlier turns of this conversation` }));
  }
}

function onContext(ev) {
  if (!ev.stage) return;
  const ids = ev.memory_ids || [];
  stagePanel(ev.stage).el.querySelector(".stage-model").title = `given ${ids.length} memories`;
}

function onStageStart(ev) {
  const stage = stagePanel(ev.stage);
  stage.el.dataset.state = "running";
  // Speculation: served from the answer cache, or its prompt prefilled while the question was typed.
  const note = ev.cached ? ` · cached (${(ev.similarity || 0).toFixed(2)} alike)` : ev.warmed ? " · prefilled while typing" : "";
  stage.el.querySelector(".stage-model").textContent = (ev.model || "") + note;
  stage.el.dataset.speculation = ev.cached ? "cached" : ev.warmed ? "warmed" : "";
}

function onToken(ev) {
  const stage = stagePanel(ev.stage);
  const c = typeof ev.confidence === "number" ? Math.min(1, Math.max(0, ev.confidence)) : null;
  const span = el("span", { class: "tok", text: ev.text });
  if (c !== null) {
    span.dataset.confidence = String(c); // exact: the band is decided on it, not on a rounded copy
    span.dataset.band = band(c);
    span.style.setProperty("--c", c.toFixed(3));
    span.title = `confidence ${c.toFixed(2)}${ev.logprob != null ? `, log-prob ${ev.logprob.toFixed(2)}` : ""}${ev.model ? ` (${ev.model})` : ""}`;
  }
  stage.text.append(span);
  stage.tokens += 1;
  if (stage.el.dataset.state === "waiting") stage.el.dataset.state = "running";
}

function onStageEnd(ev) {
  const stage = stagePanel(ev.stage);
  stage.el.dataset.state = ev.cancelled ? "cancelled" : "done";
  if (ev.model) stage.el.querySelector(".stage-model").textContent = ev.model;
  const parts = [
    `first token ${fmt.s(ev.first_token_s)}`,
    fmt.rate(ev.tokens_per_s),
    `${ev.tokens ?? stage.tokens} tokens`,
    `${fmt.s(ev.duration_s)} total`,
  ];
  if (ev.queued_s) parts.push(`queued ${fmt.s(ev.queued_s)}`);
  if (ev.cancelled) parts.push("cancelled");
  const stats = stage.el.querySelector(".stage-stats");
  stats.textContent = parts.join(" · ");
  stats.dataset.firstTokenS = ev.first_token_s ?? "";
  stats.dataset.tokensPerS = ev.tokens_per_s ?? "";
}

function onEventError(ev) {
  const text = `${ev.code ? `${ev.code}: ` : ""}${ev.message || "error"}`;
  if (ev.stage) {
    const stage = stagePanel(ev.stage);
    stage.el.dataset.state = "error";
    stage.text.after(el("p", { class: "error", text: ev.model ? `${text} (${ev.model})` : text }));
  } else {
    showError(text);
  }
}

function onDone(ev, chunk) {
  view.queryId = ev.query_id || (chunk && chunk.query_id) || null;
  $("answer").dataset.state = ev.cancelled ? "cancelled" : "done";
  if (view.queryId) $("answer").dataset.queryId = view.queryId;
  const parts = [ev.cancelled ? "cancelled" : "done"];
  const m = ev.metrics || {};
  if (m.duration_s != null) parts.push(`in ${fmt.s(m.duration_s)}`);
  if (m.errors && m.errors.length) parts.push(`${m.errors.length} stage error(s)`);
  $("done-line").textContent = parts.join(" · ");
  $("rating").disabled = !view.queryId || ev.cancelled || view.incognito;
  if (view.incognito) $("rating-result").textContent = "incognito: this answer is not kept, so it cannot be rated";
}

const HANDLERS = {
  start: onStart, memory: onMemory, context: onContext, stage_start: onStageStart, token: onToken,
  stage_end: onStageEnd, error: onEventError, done: onDone,
};

function handleChunk(chunk) {
  if (chunk.error && !chunk.mirador) {  // an Ollama-style error line mid-stream
    showError(typeof chunk.error === "string" ? chunk.error : JSON.stringify(chunk.error));
    return;
  }
  const ev = chunk.mirador;
  if (!ev || !ev.event) return;
  const handler = HANDLERS[ev.event];
  if (handler) handler(ev, chunk);
  if (chunk.done && !view.queryId && chunk.query_id) onDone({ query_id: chunk.query_id }, chunk);
}

async function ask(question) {
  clearErrors();
  resetAnswer(question);
  const controller = new AbortController();
  view.controller = controller;
  $("ask-button").disabled = true;
  $("stop-button").disabled = false;
  const body = { model: "mirador", messages: [{ role: "user", content: question }], stream: true };
  const headers = { "Content-Type": "application/json", Accept: "application/x-ndjson" };
  view.incognito = $("incognito").checked;
  if (view.incognito) headers["X-Mirador-Incognito"] = "1";
  try {
    const response = await fetch("/api/chat", { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await apiError(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, nl).trim();
        buffered = buffered.slice(nl + 1);
        if (line) handleChunk(JSON.parse(line));
      }
    }
    if (buffered.trim()) handleChunk(JSON.parse(buffered));
    if ($("answer").dataset.state === "asking") {
      showError("the answer stream ended before it was done");
      $("answer").dataset.state = "error";
    } else if (!view.incognito) {
      showStoredExchange(question);
    }
  } catch (e) {
    if (e.name === "AbortError") {
      $("answer").dataset.state = "cancelled";
      $("done-line").textContent = "stopped";
      for (const stage of view.stages.values()) {
        if (stage.el.dataset.state === "running" || stage.el.dataset.state === "waiting") {
          stage.el.dataset.state = "cancelled";
          stage.el.querySelector(".stage-stats").textContent = "stopped";
        }
      }
    } else {
      $("answer").dataset.state = "error";
      showError(e.message.startsWith("Failed to fetch") ? `cannot reach the daemon (${e.message}); is miradord running?` : e.message);
    }
  } finally {
    view.controller = null;
    $("ask-button").disabled = false;
    $("stop-button").disabled = true;
  }
}

function stop() {
  if (view.controller) view.controller.abort();  // the daemon cancels when the client disconnects
}

// ---- rating ----------------------------------------------------------------------------------

async function rate(score) {
  if (!view.queryId) return;
  $("rating-result").textContent = "…";
  try {
    const { rated: r } = await api("POST", "/mirador/rate", { score, query_id: view.queryId });
    for (const b of $("rating").querySelectorAll("button")) {
      b.setAttribute("aria-pressed", String(Number(b.dataset.score) === score));
    }
    const plan = r.plan ? ` (plan ${r.plan}${r.type ? `, ${r.type}` : ""})` : "";
    $("rating-result").textContent = `rated ${r.rating}/5${plan}`;
    $("rating").dataset.rated = String(r.rating);
  } catch (e) {
    $("rating-result").textContent = "";
    showError(`rating failed: ${e.message}`);
  }
}

// ---- memories --------------------------------------------------------------------------------

function memoryItem(m) {
  const forget = el("button", { type: "button", class: "secondary forget", text: "Forget" });
  forget.setAttribute("aria-label", `Forget: ${m.question || m.id}`);
  forget.addEventListener("click", () => forgetMemory(m.id, item));
  const meta = [fmt.when(m.ts)];
  if (m.similarity != null) meta.unshift(`similarity ${fmt.sim(m.similarity)}`);
  if (m.route) meta.push(m.route);
  const item = el("li", { class: "memory", "data-id": m.id },
    el("div", { class: "memory-head" },
      el("strong", { class: "memory-question", text: m.question || "" }),
      forget),
    el("p", { class: "memory-answer", text: m.answer || "" }),
    el("p", { class: "memory-meta muted", text: `${meta.filter(Boolean).join(" · ")} · ${m.id}` }));
  return item;
}

async function loadMemories(query) {
  const params = new URLSearchParams({ limit: "20" });
  if (query) params.set("q", query);
  $("memory-note").textContent = "…";
  try {
    const { memories = [] } = await api("GET", `/mirador/memories?${params}`);
    $("memory-items").replaceChildren(...memories.map(memoryItem));
    $("memory-items").dataset.query = query || "";
    $("memory-note").textContent = memories.length
      ? (query ? `${memories.length} closest to “${query}”` : `${memories.length} ${memories.length === 1 ? "memory" : "memories"}, newest first`)
      : (query ? `nothing close to “${query}”` : "no memories yet");
  } catch (e) {
    $("memory-note").textContent = "";
    showError(`memories: ${e.message}`);
  }
}

// The exchange is stored just after `done` (a durable write, ~0.3 s; the HTTP stream ends at
// `done`, before the daemon's `remembered`), so the newest list is fetched until it shows it.
async function showStoredExchange(question) {
  for (const delay of [300, 700, 1500, 3000, 5000, 10000]) {
    await new Promise((resolve) => setTimeout(resolve, delay));
    if ($("memory-query").value || view.controller) return;  // the person is searching, or asking again
    await loadMemories("");
    const listed = [...$("memory-items").querySelectorAll(".memory-question")].map((q) => q.textContent);
    if (listed.includes(question)) return;
  }
}

function listMemories() {
  $("memory-query").value = "";
  return loadMemories("");
}

async function forgetMemory(id, item) {
  try {
    await api("DELETE", `/mirador/memories/${encodeURIComponent(id)}`);
    item.remove();
    $("memory-note").textContent = `forgot ${id}`;
  } catch (e) {
    showError(`forget failed: ${e.message}`);
  }
}

// ---- wiring ----------------------------------------------------------------------------------

function init() {
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const question = $("question").value.trim();
    if (!question) {
      showError("type a question first");
      return;
    }
    if (!view.controller) ask(question);
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") stop();
  });
  $("stop-button").addEventListener("click", stop);
  for (const b of $("rating").querySelectorAll("button")) {
    b.addEventListener("click", () => rate(Number(b.dataset.score)));
  }
  $("memory-form").addEventListener("submit", (e) => {
    e.preventDefault();
    loadMemories($("memory-query").value.trim());
  });
  $("memory-list").addEventListener("click", listMemories);
  loadStatus();
  listMemories();
  $("question").focus();
}

init();
