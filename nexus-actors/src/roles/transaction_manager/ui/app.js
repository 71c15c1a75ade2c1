// Nexus Studio: login, panels, the built-in Document Editor and the live
// mailbox graph. Plain ES module; talks to /api and /ws of the node.

const $ = (selector) => document.querySelector(selector);
const views = ["login", "panels", "editor", "graph"];
let token = sessionStorage.getItem("nexus-token");
let socket = null;
let graphTimer = null;
const editor = { id: null, version: 0, state: {}, pending: null, cursors: new Map(), present: [] };

function show(view) {
  for (const v of views) $("#" + v).hidden = v !== view;
  $("#nav").hidden = view === "login";
  clearInterval(graphTimer);
  if (view === "graph") {
    drawGraph();
    graphTimer = setInterval(drawGraph, 1000);
  }
}

function status(message) {
  $("#status").textContent = message || "";
}

async function api(method, path, body) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = "Bearer " + token;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (response.status === 401 && path !== "/api/login") logout();
  if (!response.ok) throw Object.assign(new Error((data && data.message) || response.statusText), { status: response.status, data });
  return data;
}

function logout() {
  token = null;
  sessionStorage.removeItem("nexus-token");
  if (socket) socket.close();
  socket = null;
  show("login");
}

// ---- panels -------------------------------------------------------------

async function showPanels() {
  show("panels");
  const panels = await api("GET", "/api/panels");
  const list = $("#panel-list");
  list.replaceChildren(
    ...panels.map((p) => {
      const li = document.createElement("li");
      li.textContent = `${p.name} (${p.mode}, ${p.source}) `;
      const del = document.createElement("button");
      del.textContent = "Delete";
      del.onclick = async () => {
        await api("DELETE", "/api/panels/" + p.id);
        showPanels();
      };
      li.append(del);
      return li;
    }),
  );
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
    socket.onclose = () => {
      // Reconnect and catch up from the last version we have.
      if (token && editor.id) setTimeout(() => openDocument(editor.id, true), 500);
    };
  });
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
    case "panel":
      if (!$("#panels").hidden) showPanels();
      return;
  }
  render();
}

async function openDocument(id, resume) {
  if (!resume) Object.assign(editor, { id, version: 0, state: {}, pending: null, cursors: new Map(), present: [] });
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

// ---- the mailbox graph -------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

async function drawGraph() {
  let graph;
  try {
    graph = await api("GET", "/api/graph");
  } catch (error) {
    return status(error.message);
  }
  const { actors, edges } = graph;
  const pos = new Map();
  const [cx, cy, r] = [400, 260, 200];
  const outside = new Set(edges.map((e) => e.from).filter((f) => !actors.some((a) => a.id === f)));
  const points = [...actors.map((a) => a.id), ...outside];
  points.forEach((id, i) => {
    const angle = (2 * Math.PI * i) / Math.max(points.length, 1) - Math.PI / 2;
    pos.set(id, [cx + r * Math.cos(angle), cy + r * Math.sin(angle)]);
  });
  const children = [];
  for (const e of edges) {
    const [a, b] = [pos.get(e.from), pos.get(e.to)];
    if (!a || !b) continue;
    const line = svg("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], "stroke-width": 1 + Math.log10(1 + e.count) });
    line.append(svg("title", {}, `${e.from} → ${e.to}: ${e.count}`));
    children.push(line);
  }
  for (const a of actors) {
    const [x, y] = pos.get(a.id);
    const circle = svg("circle", { cx: x, cy: y, r: 8 + 2 * Math.log10(1 + a.handled), class: a.restarts ? "restarted" : "" });
    circle.append(svg("title", {}, `${a.kind} ${a.id}: handled ${a.handled}, mailbox ${a.mailbox_depth}, restarts ${a.restarts}`));
    const label = a.id.length > 24 ? a.id.slice(0, 8) + "…" + a.id.slice(-6) : a.id;
    children.push(circle, svg("text", { x: x + 12, y: y + 4 }, `${label} (${a.handled})`));
  }
  for (const id of outside) {
    const [x, y] = pos.get(id);
    children.push(svg("rect", { x: x - 6, y: y - 6, width: 12, height: 12, fill: "#8a93a6" }), svg("text", { x: x + 10, y: y + 4 }, id));
  }
  $("#graph-svg").replaceChildren(...children);
}

// ---- wiring ----------------------------------------------------------------------

$("#login-form").onsubmit = async (event) => {
  event.preventDefault();
  try {
    const result = await api("POST", "/api/login", { username: $("#login-username").value, password: $("#login-password").value });
    token = result.token;
    sessionStorage.setItem("nexus-token", token);
    status("");
    await showPanels();
    followPanels();
  } catch (error) {
    status(error.message);
  }
};
$("#panel-form").onsubmit = async (event) => {
  event.preventDefault();
  try {
    await api("POST", "/api/panels", { name: $("#panel-name").value, mode: $("#panel-mode").value, source: $("#panel-source").value });
    $("#panel-name").value = "";
    showPanels();
  } catch (error) {
    status(error.message);
  }
};
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
$("#nav-graph").onclick = () => show("graph");
$("#nav-logout").onclick = logout;

async function followPanels() {
  const ws = await connect();
  ws.send(JSON.stringify({ type: "subscribe_panels" }));
}

if (token) showPanels().then(followPanels).catch(() => logout());
else show("login");
