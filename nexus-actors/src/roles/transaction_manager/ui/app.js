// Nexus Studio: login, panels with their live instances (opened through the
// traffic gateway) and their code (workspace.js), the built-in Document
// Editor, LLM contexts (contexts.js)
// and, for admins, the live mailbox graph (graph.js). Plain ES module; talks to /api
// and /ws of the node, and to the gateway for panels and Studio heartbeats.

import { contextsView } from "./contexts.js";
import { graphView } from "./graph.js";
import { workspaceView } from "./workspace.js";

const $ = (selector) => document.querySelector(selector);
const views = ["login", "panels", "code", "editor", "contexts", "graph"];
let token = sessionStorage.getItem("nexus-token");
let me = null; // { username, role } of the token's user
let socket = null;
const editor = { id: null, version: 0, state: {}, pending: null, cursors: new Map(), present: [] };

function show(view) {
  // The graph is for admins (the node refuses it to anyone else).
  if (view === "graph" && me?.role !== "admin") view = "panels";
  if (view !== "code") workspace.close();
  for (const v of views) $("#" + v).hidden = v !== view;
  $("#nav").hidden = view === "login";
  if (view === "graph") graph.open();
  else graph.close();
}

function status(message) {
  $("#status").textContent = message || "";
}

// The headers that carry the session's token, for requests that are not JSON.
function authorization() {
  return token ? { authorization: "Bearer " + token } : {};
}

async function api(method, path, body) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = "Bearer " + token;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (response.status === 401 && path !== "/api/login") forget();
  if (!response.ok) throw Object.assign(new Error((data && data.message) || response.statusText), { status: response.status, data });
  return data;
}

// Forgets the session here and shows the login.
function forget() {
  token = null;
  me = null;
  sessionStorage.removeItem("nexus-token");
  followingPanels = false;
  closePanel();
  contexts.close();
  workspace.forget();
  if (socket) socket.close();
  socket = null;
  $("#whoami").textContent = "";
  $("#nav-graph").hidden = true;
  show("login");
}

// Logs out everywhere: the node revokes every token of the user (other
// tabs, panel cookies and WebSocket sessions included), then this page
// forgets its own.
async function logOut() {
  try {
    await api("POST", "/api/logout");
  } catch (error) {
    status("log out: " + error.message);
  }
  forget();
}

// Who the token belongs to; only admins see the mailbox graph.
async function loadMe() {
  me = await api("GET", "/api/me");
  $("#whoami").textContent = me.role === "admin" ? `${me.username} (admin)` : me.username;
  $("#nav-graph").hidden = me.role !== "admin";
}

// ---- panels and their instances ---------------------------------------
//
// The list keeps what the server said: panel records, and per panel its
// instances (as GET /api/panels/{id}/instances returned them, then updated
// live by "instance" frames). Each panel's instance list is redrawn on its
// own; the rest of the page stays as it is.

const config = { gateway: null, heartbeat_secs: 300 };
const panels = new Map(); // panel id -> record
const instances = new Map(); // panel id -> Map(instance id -> status)
const logs = new Map(); // panel id -> { instance, lines } shown under it
const viewer = { panel: null, timer: null };
let followingPanels = false;
const FINAL = new Set(["stopped", "failed"]);
const SERVING = new Set(["ready", "idle"]);

// Where this page reaches the gateway. Cookies are scoped by host, not
// port: when the node names its gateway on loopback under another name than
// this page uses (127.0.0.1 vs localhost), the page's name is used, so the
// panel cookie the node sets for this host reaches the gateway.
function gatewayBase() {
  if (!config.gateway) return null;
  const url = new URL(config.gateway);
  const loopback = (host) => host === "localhost" || host.startsWith("127.") || host === "[::1]";
  if (loopback(url.hostname) && loopback(location.hostname) && url.hostname !== location.hostname) {
    url.hostname = location.hostname;
  }
  return url.href.replace(/\/$/, "");
}

async function loadConfig() {
  try {
    Object.assign(config, await api("GET", "/api/config"));
  } catch (error) {
    status("no node config: " + error.message);
  }
}

// Keeps the newer of two reports about one instance.
function applyInstance(s) {
  if (!instances.has(s.panel)) instances.set(s.panel, new Map());
  const known = instances.get(s.panel);
  const old = known.get(s.instance);
  if (old && old.since_ms > s.since_ms) return;
  known.set(s.instance, s);
  renderInstances(s.panel);
}

// Every live instance, and for a mode with none the last final one, so a
// stopped Studio or a failed App (and why) stays visible.
function shownInstances(panelId) {
  const all = [...(instances.get(panelId) || new Map()).values()].sort((a, b) => a.since_ms - b.since_ms);
  const shown = [];
  for (const mode of ["studio", "app"]) {
    const ofMode = all.filter((s) => s.mode === mode);
    const live = ofMode.filter((s) => !FINAL.has(s.state));
    shown.push(...(live.length ? live : ofMode.slice(-1)));
  }
  return shown;
}

function studioServing(panelId) {
  return shownInstances(panelId).some((s) => s.mode === "studio" && SERVING.has(s.state));
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else node[k] = v;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function instanceItem(s) {
  const since = new Date(s.since_ms).toLocaleTimeString();
  // The driver decides the isolation when it starts the instance.
  const isolation = s.state === "pending" ? "…" : s.isolation;
  const item = el(
    "li",
    { className: "instance", dataset: { instance: s.instance, mode: s.mode, state: s.state, isolation: s.isolation } },
    el("span", { className: "badge state-" + s.state, textContent: s.state }),
    ` ${s.mode === "studio" ? "Studio" : "App"} ${s.instance.slice(-8)} · isolation `,
    el("span", { className: "isolation", textContent: isolation }),
    ` · since ${since}` + (s.restarts ? ` · restarted ${s.restarts}×` : ""),
  );
  const unisolated = {
    none: "⚠ not isolated: this panel's code runs as a plain process on the host network",
    process: "⚠ UNISOLATED: this panel's code runs as a plain process sharing the host's files and processes",
  }[isolation];
  if (unisolated) item.append(el("div", { className: "isolation-warning", textContent: unisolated }));
  if (s.reason) item.append(el("div", { className: "reason", textContent: s.reason }));
  if (s.state === "failed" && s.log_tail.length) item.append(el("pre", { className: "log-tail", textContent: s.log_tail.join("\n") }));
  return item;
}

function renderInstances(panelId) {
  const li = document.querySelector(`#panel-list li[data-panel="${CSS.escape(panelId)}"]`);
  if (!li) return;
  const shown = shownInstances(panelId);
  li.querySelector(".instances").replaceChildren(...shown.map(instanceItem));
  // The state of each mode at a glance, for people and for tests.
  for (const mode of ["studio", "app"]) {
    const latest = shown.filter((s) => s.mode === mode).pop();
    if (latest) li.dataset[mode + "State"] = latest.state;
    else delete li.dataset[mode + "State"];
  }
  const shownLogs = logs.get(panelId);
  const pre = li.querySelector(".logs");
  pre.hidden = !shownLogs;
  pre.textContent = shownLogs ? `${shownLogs.instance}:\n${shownLogs.lines.join("\n")}` : "";
}

// Runs one panel action; errors show in the status line.
function action(label, name, run) {
  return el("button", {
    textContent: label,
    dataset: { action: name },
    onclick: async () => {
      status("");
      try {
        await run();
      } catch (error) {
        status(`${label}: ${error.message}`);
      }
    },
  });
}

// The owner decides whether the panel's App is served to anyone. A Studio
// instance stays private either way.
function publicToggle(p, path) {
  const box = el("input", { type: "checkbox", checked: Boolean(p.public), dataset: { action: "public" } });
  box.onchange = async () => {
    status("");
    try {
      panels.set(p.id, await api("PUT", path, { public: box.checked }));
    } catch (error) {
      box.checked = !box.checked;
      status(`Public: ${error.message}`);
    }
  };
  return el("label", { className: "public", title: "serve the deployed App to anyone, not only you" }, box, " public App");
}

function panelItem(p) {
  const path = "/api/panels/" + encodeURIComponent(p.id);
  const open = action("Open", "open", async () => openPanel(p.id));
  if (!config.gateway) {
    open.disabled = true;
    open.title = "this node runs no traffic gateway";
  }
  const li = el(
    "li",
    { className: "panel", dataset: { panel: p.id, public: String(Boolean(p.public)) } },
    el("div", {}, el("strong", { textContent: p.name }), ` (${p.mode}, ${p.source}) `, publicToggle(p, path)),
    el("ul", { className: "instances" }),
    el(
      "div",
      { className: "actions" },
      action("Start Studio", "start-studio", async () => applyInstance(await api("POST", path + "/studio"))),
      action("Stop", "stop-studio", () => api("DELETE", path + "/studio")),
      open,
      action("Code", "code", () => workspace.open(p)),
      action("Deploy as App", "deploy", async () => {
        const deployed = await api("POST", path + "/deploy");
        status(`deployed version ${deployed.version} with ${deployed.replicas} replica(s)`);
      }),
      action("Scale to 0", "scale-zero", () => api("PUT", path + "/scale", { replicas: 0 })),
      action("Stop all", "stop-all", () => api("DELETE", path + "/instances")),
      action("Logs", "logs", async () => {
        if (logs.has(p.id)) logs.delete(p.id);
        else logs.set(p.id, await api("GET", path + "/logs?lines=100"));
        renderInstances(p.id);
      }),
      action("Delete", "delete", async () => {
        await api("DELETE", path);
        if (viewer.panel === p.id) closePanel();
        workspace.forgetPanel(p.id);
        showPanels();
      }),
    ),
    el("pre", { className: "logs", hidden: true }),
  );
  return li;
}

async function loadInstances(panelId) {
  try {
    for (const s of await api("GET", `/api/panels/${encodeURIComponent(panelId)}/instances`)) applyInstance(s);
  } catch (error) {
    status(`instances of ${panels.get(panelId)?.name || panelId}: ${error.message}`);
  }
}

async function showPanels() {
  show("panels");
  const list = await api("GET", "/api/panels");
  panels.clear();
  for (const p of list) panels.set(p.id, p);
  $("#panel-list").replaceChildren(...list.map(panelItem));
  for (const p of list) renderInstances(p.id);
  await Promise.all(list.map((p) => loadInstances(p.id)));
}

// ---- a panel opened through the gateway --------------------------------------

// The gateway serves a panel to its owner only: first the node sets the
// panel's cookie (HttpOnly, for /p/<id>/ only), then the frame opens it.
async function panelAccess(id) {
  await api("POST", `/api/panels/${encodeURIComponent(id)}/access`);
}

async function openPanel(id) {
  await panelAccess(id);
  const url = `${gatewayBase()}/p/${encodeURIComponent(id)}/`;
  viewer.panel = id;
  $("#viewer").hidden = false;
  $("#viewer").dataset.panel = id;
  $("#viewer-name").textContent = panels.get(id)?.name || id;
  $("#viewer-link").href = url;
  $("#panel-frame").src = url;
  clearInterval(viewer.timer);
  viewer.timer = setInterval(heartbeat, config.heartbeat_secs * 1000);
  heartbeat();
}

function closePanel() {
  clearInterval(viewer.timer);
  viewer.panel = null;
  $("#panel-frame").src = "about:blank";
  $("#viewer").hidden = true;
  delete $("#viewer").dataset.panel;
}

// Tells the open Studio instance's watchdog that someone is using it; an
// App or a stopped Studio has no watchdog to tell.
async function heartbeat() {
  const id = viewer.panel;
  if (!id || !token || !config.gateway || !studioServing(id)) return;
  let outcome;
  try {
    const response = await fetch(`${gatewayBase()}/heartbeat/${encodeURIComponent(id)}`, {
      method: "POST",
      headers: { authorization: "Bearer " + token },
    });
    outcome = response.ok ? "ok" : String(response.status);
  } catch (error) {
    outcome = "unreachable";
  }
  if (viewer.panel === id) $("#viewer").dataset.heartbeat = outcome;
  if (outcome !== "ok") status(`heartbeat to the Studio instance: ${outcome}`);
}

async function listDocuments() {
  const docs = await api("GET", "/api/documents");
  $("#doc-list").replaceChildren(
    ...docs.map((d) => {
      const li = document.createElement("li");
      const open = document.createElement("button");
      open.textContent = "Open " + d.id.slice(-8);
      open.dataset.openDoc = d.id;
      open.onclick = () => openDocument(d.id);
      li.append(open, ` version ${d.version}`);
      return li;
    }),
  );
  $("#doc-new").hidden = false;
}

// ---- the Document Editor ---------------------------------------------------

function mergePatch(target, patch) {
  if (patch === null || typeof patch !== "object" || Array.isArray(patch)) return patch;
  const out = target && typeof target === "object" && !Array.isArray(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}

function connect() {
  if (socket && socket.readyState <= 1) return Promise.resolve(socket);
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/ws?token=${encodeURIComponent(token)}`);
    socket.onopen = () => resolve(socket);
    socket.onerror = () => reject(new Error("websocket failed"));
    socket.onmessage = (event) => onFrame(JSON.parse(event.data));
    socket.onclose = (event) => {
      // 4001: the token was revoked or expired; reconnecting would only
      // be refused again.
      if (event.code === 4001) {
        token = null;
        status("signed out: " + (event.reason || "the token ended"));
        show("login");
        return;
      }
      if (token) setTimeout(() => resume().catch(() => {}), 500);
    };
  });
}

// After a reconnection: catch up from the last version we have, and
// follow the panels again (instance states may have changed meanwhile).
async function resume() {
  const ws = await connect();
  if (editor.id) ws.send(JSON.stringify({ type: "subscribe", doc: editor.id, version: editor.version || undefined }));
  if (followingPanels) {
    ws.send(JSON.stringify({ type: "subscribe_panels" }));
    await Promise.all([...panels.keys()].map(loadInstances));
  }
  contexts.resume(ws);
}

function render() {
  const text = $("#doc-text");
  const value = editor.state.text || "";
  if (text.value !== value && editor.pending === null) {
    const focused = document.activeElement === text;
    const caret = text.selectionStart;
    text.value = value;
    if (focused) text.selectionStart = text.selectionEnd = Math.min(caret, value.length);
  }
  $("#doc-version").textContent = editor.version;
  $("#presence").replaceChildren(
    ...editor.present.map((p) => {
      const li = document.createElement("li");
      const cursor = editor.cursors.get(p.session);
      li.textContent = `${p.user} · ${p.session.slice(-6)}` + (cursor !== undefined ? ` · at ${cursor}` : "");
      return li;
    }),
  );
}

function onFrame(frame) {
  if (frame.type === "context_followed" || frame.type === "context_record") return contexts.onFrame(frame);
  if (frame.doc && frame.doc !== editor.id) return;
  switch (frame.type) {
    case "snapshot":
      editor.state = frame.state;
      editor.version = frame.version;
      break;
    case "change":
      if (frame.version <= editor.version) return;
      editor.state = mergePatch(editor.state, frame.patch);
      editor.version = frame.version;
      break;
    case "presence":
      editor.present = frame.present;
      break;
    case "cursor":
      editor.cursors.set(frame.session, frame.position.offset);
      break;
    case "error":
      status(frame.message);
      break;
    case "panels_followed":
      // Followed from now on: read again what changed before.
      if (!$("#panels").hidden) showPanels();
      if (!$("#code").hidden) workspace.refresh();
      return;
    case "panel":
      if (!$("#panels").hidden) showPanels();
      if (!$("#code").hidden) workspace.refresh();
      return;
    case "instance":
      applyInstance(frame.status);
      return;
  }
  render();
}

async function openDocument(id) {
  Object.assign(editor, { id, version: 0, state: {}, pending: null, cursors: new Map(), present: [] });
  show("editor");
  $("#doc-id").textContent = id;
  const ws = await connect();
  ws.send(JSON.stringify({ type: "subscribe", doc: id, version: editor.version || undefined }));
}

async function save() {
  const text = $("#doc-text").value;
  editor.pending = null;
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      const doc = await api("PATCH", "/api/documents/" + editor.id, { version: editor.version, patch: { text } });
      if (doc.version > editor.version) {
        editor.state = doc.state;
        editor.version = doc.version;
      }
      render();
      return;
    } catch (error) {
      if (error.status !== 409) return status(error.message);
      // Someone wrote first: take their version and apply our text on top.
      const doc = await api("GET", "/api/documents/" + editor.id);
      editor.state = doc.state;
      editor.version = doc.version;
    }
  }
}

function sendCursor() {
  if (socket && socket.readyState === 1 && editor.id) {
    socket.send(JSON.stringify({ type: "cursor", doc: editor.id, position: { offset: $("#doc-text").selectionStart } }));
  }
}

// ---- wiring ----------------------------------------------------------------------

$("#login-form").onsubmit = async (event) => {
  event.preventDefault();
  try {
    const result = await api("POST", "/api/login", { username: $("#login-username").value, password: $("#login-password").value });
    token = result.token;
    sessionStorage.setItem("nexus-token", token);
    status("");
    await configured;
    await loadMe();
    await showPanels();
    followPanels();
  } catch (error) {
    status(error.message);
  }
};
$("#panel-form").onsubmit = async (event) => {
  event.preventDefault();
  try {
    const source = $("#panel-template").value || $("#panel-source").value;
    await api("POST", "/api/panels", { name: $("#panel-name").value, mode: $("#panel-mode").value, source });
    $("#panel-name").value = "";
    showPanels();
  } catch (error) {
    status(error.message);
  }
};
$("#panel-template").onchange = () => {
  const custom = $("#panel-template").value === "";
  $("#panel-source").hidden = !custom;
  $("#panel-source").required = custom;
};
$("#viewer-reload").onclick = async () => {
  // Setting the same address navigates again: through the gateway, which
  // wakes an App that scaled to zero. The cookie is renewed first (it
  // expires, and a logout elsewhere revokes it).
  try {
    if (viewer.panel) await panelAccess(viewer.panel);
  } catch (error) {
    return status("Reload: " + error.message);
  }
  $("#panel-frame").src = $("#panel-frame").src;
  heartbeat();
};
$("#viewer-close").onclick = closePanel;
$("#open-editor").onclick = () => listDocuments().catch((e) => status(e.message));
$("#doc-new").onclick = async () => {
  const doc = await api("POST", "/api/documents", { state: { text: "" } });
  openDocument(doc.id);
};
$("#doc-text").addEventListener("input", () => {
  clearTimeout(editor.pending);
  editor.pending = setTimeout(save, 120);
});
for (const kind of ["keyup", "click", "select"]) $("#doc-text").addEventListener(kind, sendCursor);
$("#nav-panels").onclick = () => showPanels();
$("#nav-contexts").onclick = () => contexts.open();
$("#nav-graph").onclick = () => show("graph");
$("#nav-logout").onclick = logOut;

async function followPanels() {
  const ws = await connect();
  ws.send(JSON.stringify({ type: "subscribe_panels" }));
  followingPanels = true;
}

const contexts = contextsView({ api, el, connect, show });
const graph = graphView({ api, status });
const workspace = workspaceView({ api, el, show, authorization, panelAccess, gatewayBase, config, back: showPanels });
const configured = loadConfig();
if (token) configured.then(loadMe).then(showPanels).then(followPanels).catch(() => forget());
else show("login");
