// Nexus Studio's workspace, where panels are written and run. The user's
// panels in a sidebar; the open ones in tabs (at most MAX_TABS), each with
// its files (the files API) in a tree, the open file in the code editor
// (CodeMirror, the /static/editor.js bundle, loaded on first use), and
// beside it the running Studio instance in its frame (through the gateway)
// over its live log, the two columns resizable. A tab keeps its editing
// state (text, selection, undo history, unsaved changes) while another is
// shown. Save, Start or Restart (save, stop, start) and Deploy act on the
// shown tab's panel; the keyboard shortcuts are in SHORTCUTS.
//
// It owns the #code section and nothing else; app.js gives it the page's
// helpers. File content reaches the page only as the editor's text, never
// as markup.

const POLL_MS = 1000; // instance states and the shown log, while open
const LOG_LINES = 200;
const STOP_WAIT_MS = 30_000;
const MAX_TABS = 8;
const SERVING = new Set(["starting", "ready", "idle"]);
const LIVE = new Set(["pending", "starting", "ready", "idle", "stopping"]);

export const SHORTCUTS = [
  ["Ctrl+S", "save the open file"],
  ["Ctrl+Enter", "save, then start or restart the Studio instance"],
  ["Ctrl+Shift+Enter", "save, then deploy as the App"],
  ["Alt+1 … Alt+9", "show tab 1 … 9"],
  ["Alt+W", "close the shown tab"],
  ["Alt+N", "new file"],
  ["Alt+/", "these shortcuts"],
];

export function workspaceView({ api, el, show, authorization, panelAccess, gatewayBase, config, back }) {
  const $ = (selector) => document.querySelector(selector);
  let editor = null; // made on first open
  const tabs = []; // the open tabs, in their order
  let tab = null; // the shown one
  let panels = []; // the sidebar's records
  let timer = null;
  let heartbeatTimer = null;
  let frameShows = null; // the instance the frame shows
  let busy = false;

  // A tab: one open panel and what the workspace knows of it.
  const newTab = (panel) => ({ panel, files: [], usage: "", open: null, snapshot: null, dirty: false, studio: null });
  const base = (t = tab) => `/api/panels/${encodeURIComponent(t.panel.id)}`;
  const fileUrl = (path) => `${base()}/files/${path.split("/").map(encodeURIComponent).join("/")}`;

  function notice(message) {
    $("#code-notice").textContent = message || "";
  }

  // Runs one action on the shown tab; a refusal is shown, not thrown. One
  // at a time.
  async function attempt(label, run) {
    if (busy || !tab) return;
    busy = true;
    notice("");
    try {
      await run();
    } catch (error) {
      notice(`${label}: ${error.message}`);
    } finally {
      busy = false;
    }
  }

  // The files API takes and gives raw bytes, not JSON.
  async function raw(method, path, body) {
    const response = await fetch(path, { method, headers: authorization(), body });
    if (!response.ok) {
      const text = await response.text();
      let message = response.statusText;
      try {
        message = JSON.parse(text).message || message;
      } catch {}
      throw Object.assign(new Error(message), { status: response.status });
    }
    return response;
  }

  async function ensureEditor() {
    if (editor) return;
    const { createEditor } = await import("./editor.js");
    editor = createEditor($("#code-editor"), {
      onSave: () => attempt("Save", save),
      onRun: () => attempt("Restart", restart),
      onDeploy: () => attempt("Deploy", deploy),
      onChange: (dirty) => {
        if (tab) tab.dirty = dirty;
        $("#code-dirty").hidden = !dirty;
        $("#code").dataset.dirty = String(dirty);
        renderTabs();
      },
    });
  }

  // ---- tabs ---------------------------------------------------------------

  // Opens `record` in a tab of its own (or shows the one it has).
  async function openPanel(record) {
    show("code");
    resume();
    let opened = tabs.find((t) => t.panel.id === record.id);
    if (!opened) {
      if (tabs.length >= MAX_TABS) {
        notice(`at most ${MAX_TABS} panels open at once: close a tab first`);
        if (tab) return;
      }
      opened = newTab(record);
      if (tabs.length < MAX_TABS) tabs.push(opened);
    }
    await showTab(opened);
    loadPanels();
  }

  async function showTab(next) {
    if (tab && editor && tab !== next) tab.snapshot = editor.snapshot();
    // Shown already (and not paused since): nothing to put back.
    const same = tab === next && !next.snapshot;
    tab = next;
    $("#code").dataset.panel = tab.panel.id;
    $("#code-name").textContent = tab.panel.name;
    if (!same) {
      $("#code-log").textContent = "";
      showFrame(null);
    }
    renderTabs();
    notice("");
    await ensureEditor();
    if (tab.snapshot) {
      editor.restore(tab.snapshot);
      tab.snapshot = null;
      showFile(tab.open);
      renderTree();
      loadTree().catch((error) => notice(`files: ${error.message}`));
    } else if (!same) {
      await attemptOpen(tab);
    }
    render();
    poll();
  }

  // A tab's first showing: its tree, and its main file in the editor.
  async function attemptOpen(t) {
    try {
      await loadTree();
      if (tab !== t) return;
      const first = ["server.py", "server.js", "nexus-panel.json"].find((p) => t.files.some((f) => f.path === p))
        || t.files.find((f) => f.kind === "file")?.path;
      if (first) await openFile(first);
      else {
        t.open = null;
        editor.load("", "");
        showFile(null);
      }
    } catch (error) {
      notice(`Open: ${error.message}`);
    }
  }

  function closeTab(t) {
    if (t.dirty && !confirm(`Close ${t.panel.name} with unsaved changes to ${t.open}?`)) return;
    const at = tabs.indexOf(t);
    if (at < 0) return;
    tabs.splice(at, 1);
    if (tab !== t) return renderTabs();
    tab = null;
    const next = tabs[Math.min(at, tabs.length - 1)];
    if (next) showTab(next);
    else {
      pause();
      back();
    }
  }

  function renderTabs() {
    $("#ws-tabs").replaceChildren(
      ...tabs.map((t, i) => {
        const state = t.studio ? t.studio.state : "stopped";
        const shown = t === tab;
        const item = el(
          "div",
          { className: "ws-tab" + (shown ? " current" : ""), dataset: { panel: t.panel.id, state, dirty: String(t.dirty) } },
          el("button", {
            type: "button",
            className: "ws-tab-name",
            role: "tab",
            ariaSelected: String(shown),
            title: `${t.panel.name} (Alt+${i + 1})`,
            onclick: () => t !== tab && showTab(t),
          }, el("span", { className: `dot state-${state}` }), t.panel.name, t.dirty ? " ●" : ""),
          el("button", { type: "button", className: "ws-tab-close", title: "close (Alt+W)", ariaLabel: `close ${t.panel.name}`, textContent: "×", onclick: () => closeTab(t) }),
        );
        return item;
      }),
    );
    renderPanels();
  }

  // ---- the sidebar ------------------------------------------------------------

  async function loadPanels() {
    try {
      panels = await api("GET", "/api/panels");
    } catch (error) {
      return notice(`panels: ${error.message}`);
    }
    // A panel deleted elsewhere loses its tab.
    for (const t of [...tabs]) {
      const record = panels.find((p) => p.id === t.panel.id);
      if (record) t.panel = record;
      else forgetPanel(t.panel.id);
    }
    renderPanels();
  }

  function renderPanels() {
    $("#ws-panel-list").replaceChildren(
      ...panels.map((p) => {
        const open = tabs.find((t) => t.panel.id === p.id);
        const state = open?.studio ? open.studio.state : open ? "stopped" : "closed";
        return el(
          "li",
          { className: (open === tab && open ? "current" : "") + (open ? " open" : ""), dataset: { panel: p.id } },
          el("button", { type: "button", title: `${p.name} (${p.mode})`, onclick: () => openPanel(p) },
            el("span", { className: `dot state-${state}` }), p.name),
        );
      }),
    );
  }

  // ---- files --------------------------------------------------------------------

  async function loadTree() {
    const t = tab;
    const list = await api("GET", `${base(t)}/files`);
    t.files = list.entries;
    t.usage = `${t.files.length} ${t.files.length === 1 ? "entry" : "entries"} · ${(list.bytes / 1024).toFixed(1)} KiB of ${(list.limits.max_bytes / 1048576).toFixed(0)} MiB`
      + (list.truncated ? " · more than listed" : "");
    if (t === tab) renderTree();
  }

  function renderTree() {
    $("#code-usage").textContent = tab.usage;
    $("#code-tree").replaceChildren(
      ...tab.files.map((f) => {
        const depth = f.path.split("/").length - 1;
        const name = f.path.split("/").pop();
        const li = el("li", { dataset: { path: f.path, kind: f.kind } });
        li.style.paddingLeft = `${depth * 0.8}rem`;
        if (f.kind === "file") {
          li.append(el("button", { type: "button", textContent: name, title: f.path, onclick: () => switchTo(f.path) }));
          if (f.path === tab.open) li.className = "current";
        } else {
          li.append(f.kind === "dir" ? `▸ ${name}/` : `↪ ${name} → ${f.target || ""}`);
        }
        return li;
      }),
    );
  }

  function showFile(path) {
    $("#code-path").textContent = path ?? "no file open: add one on the left";
    if (path) $("#code").dataset.file = path;
    else delete $("#code").dataset.file;
  }

  async function switchTo(path) {
    if (path === tab.open) return;
    if (tab.dirty && !confirm(`Discard the unsaved changes to ${tab.open}?`)) return;
    await attempt("Open", () => openFile(path));
  }

  async function openFile(path) {
    const t = tab;
    const text = await (await raw("GET", fileUrl(path))).text();
    if (t !== tab) return;
    t.open = path;
    editor.load(text, path);
    showFile(path);
    renderTree();
    editor.focus();
  }

  async function save() {
    if (tab.open === null) return;
    const text = editor.text();
    await raw("PUT", fileUrl(tab.open), text);
    editor.markSaved(text);
    $("#code").dataset.saved = String(Date.now());
    await loadTree();
  }

  async function newFile(path) {
    path = path.trim().replace(/^\/+/, "");
    if (!path) return;
    if (!tab.files.some((f) => f.path === path)) await raw("PUT", fileUrl(path), "");
    await loadTree();
    await openFile(path);
    $("#code-new-path").value = "";
  }

  async function deleteFile() {
    if (tab.open === null || !confirm(`Delete ${tab.open}?`)) return;
    await raw("DELETE", fileUrl(tab.open));
    tab.open = null;
    editor.load("", "");
    showFile(null);
    await loadTree();
  }

  async function upload(file) {
    if (!confirm(`Replace every file of ${tab.panel.name} with the content of ${file.name}?`)) return;
    await raw("PUT", `${base()}/files`, file);
    tab.open = null;
    await loadTree();
    const first = tab.files.find((f) => f.kind === "file");
    if (first) await openFile(first.path);
  }

  // ---- the running instances ------------------------------------------------

  async function restart() {
    await save();
    if (tab.studio && LIVE.has(tab.studio.state)) {
      await api("DELETE", `${base()}/studio`);
      const deadline = Date.now() + STOP_WAIT_MS;
      while (Date.now() < deadline) {
        const statuses = await api("GET", `${base()}/instances`);
        if (!statuses.some((s) => s.mode === "studio" && LIVE.has(s.state))) break;
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    }
    tab.studio = await api("POST", `${base()}/studio`);
    render();
  }

  async function stop() {
    await api("DELETE", `${base()}/studio`);
  }

  async function deploy() {
    await save();
    const deployed = await api("POST", `${base()}/deploy`);
    notice(`deployed version ${deployed.version}: the App serves at ${gatewayBase() || "the gateway"}/p/${tab.panel.id}/`);
    $("#code").dataset.deployed = String(deployed.version);
  }

  // Every tab's Studio state; the shown tab's log.
  async function poll() {
    await Promise.all(tabs.map(async (t) => {
      try {
        const statuses = await api("GET", `${base(t)}/instances`);
        t.studio = statuses.filter((s) => s.mode === "studio").sort((a, b) => a.since_ms - b.since_ms).pop() || null;
      } catch (error) {
        if (t === tab && error.status !== 404) notice(`instance: ${error.message}`);
      }
    }));
    if (!tab) return;
    render();
    renderTabs();
    const t = tab;
    // A pending instance has no log yet.
    if (t.studio && t.studio.state !== "pending") {
      try {
        const logs = await api("GET", `${base(t)}/logs?lines=${LOG_LINES}&instance=${encodeURIComponent(t.studio.instance)}`);
        if (t === tab) showLog(logs.lines);
      } catch (error) {
        if (error.status !== 404) notice(`log: ${error.message}`);
      }
    }
  }

  function showLog(lines) {
    const pre = $("#code-log");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = lines.join("\n");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  function render() {
    if (!tab) return;
    const studio = tab.studio;
    const state = studio ? studio.state : "stopped";
    const badge = $("#code-state");
    badge.textContent = studio?.reason && state === "failed" ? `failed: ${studio.reason}` : state;
    badge.className = `badge state-${state}`;
    $("#code").dataset.studioState = state;
    $("#code-restart").textContent = studio && LIVE.has(state) ? "Restart" : "Start";
    $("#code-stop").disabled = !(studio && LIVE.has(state));
    const ready = studio && (state === "ready" || state === "idle");
    if (ready && frameShows !== studio.instance) showFrame(studio.instance);
    if (!studio || !LIVE.has(state)) showFrame(null);
  }

  // The gateway serves the Studio instance to its owner only, with the
  // panel's cookie: the node sets it first.
  async function showFrame(instance) {
    const frame = $("#code-frame");
    if (instance === frameShows) return;
    frameShows = instance;
    const gateway = gatewayBase();
    if (!instance || !gateway) {
      frame.src = "about:blank";
      delete $("#code").dataset.frame;
      return;
    }
    const id = tab.panel.id;
    try {
      await panelAccess(id);
      if (frameShows !== instance) return;
      frame.src = `${gateway}/p/${encodeURIComponent(id)}/?instance=${encodeURIComponent(instance)}`;
      $("#code").dataset.frame = instance;
    } catch (error) {
      frameShows = null;
      notice(`open the panel: ${error.message}`);
    }
  }

  // Keeps the open tabs' Studio instances from their watchdogs' idle timeout.
  async function heartbeat() {
    const gateway = gatewayBase();
    if (!gateway) return;
    for (const t of tabs.filter((t) => t.studio && SERVING.has(t.studio.state))) {
      await fetch(`${gateway}/heartbeat/${encodeURIComponent(t.panel.id)}`, { method: "POST", headers: authorization() })
        .catch(() => {});
    }
  }

  // ---- leaving and coming back ------------------------------------------------

  function resume() {
    if (timer) return;
    timer = setInterval(poll, POLL_MS);
    heartbeatTimer = setInterval(heartbeat, config.heartbeat_secs * 1000);
  }

  // The workspace is hidden: its tabs stay, for when it comes back.
  function pause() {
    clearInterval(timer);
    clearInterval(heartbeatTimer);
    timer = heartbeatTimer = null;
    if (tab && editor) tab.snapshot = editor.snapshot();
    const frame = $("#code-frame");
    if (frame) frame.src = "about:blank";
    frameShows = null;
  }

  // A panel deleted: its tab goes, unsaved changes and all.
  function forgetPanel(id) {
    const t = tabs.find((t) => t.panel.id === id);
    if (!t) return;
    t.dirty = false;
    closeTab(t);
  }

  // Logged out: nothing of the user stays.
  function forget() {
    pause();
    tabs.length = 0;
    tab = null;
    panels = [];
    if (editor) editor.load("", "");
    delete $("#code")?.dataset.panel;
  }

  // ---- the columns and the keys -------------------------------------------------

  // Dragging the bar between the editor and the running panel resizes both.
  function splitter() {
    const bar = $("#code-split");
    const layout = $("#code-layout");
    bar.onpointerdown = (event) => {
      bar.setPointerCapture(event.pointerId);
      const box = layout.getBoundingClientRect();
      const files = $(".code-files").getBoundingClientRect().width;
      bar.onpointermove = (move) => {
        const side = Math.min(Math.max(box.right - move.clientX, 220), box.width - files - 260);
        layout.style.gridTemplateColumns = `${files}px minmax(0, 1fr) 6px ${side}px`;
      };
      bar.onpointerup = () => {
        bar.onpointermove = bar.onpointerup = null;
      };
    };
  }

  function shortcuts() {
    const dialog = $("#code-shortcuts");
    if (dialog.open) return dialog.close();
    $("#code-shortcut-list").replaceChildren(
      ...SHORTCUTS.flatMap(([keys, what]) => [el("dt", {}, el("kbd", { textContent: keys })), el("dd", { textContent: what })]),
    );
    dialog.showModal();
  }

  $("#code-back").onclick = () => {
    pause();
    back();
  };
  $("#code-save").onclick = () => attempt("Save", save);
  $("#code-restart").onclick = () => attempt("Restart", restart);
  $("#code-stop").onclick = () => attempt("Stop", stop);
  $("#code-deploy").onclick = () => attempt("Deploy", deploy);
  $("#code-delete").onclick = () => attempt("Delete", deleteFile);
  $("#code-keys").onclick = shortcuts;
  $("#code-shortcuts-close").onclick = () => $("#code-shortcuts").close();
  $("#code-new").onsubmit = (event) => {
    event.preventDefault();
    attempt("New file", () => newFile($("#code-new-path").value));
  };
  $("#code-upload").onchange = (event) => {
    const [file] = event.target.files;
    event.target.value = "";
    if (file) attempt("Upload", () => upload(file));
  };
  splitter();
  document.addEventListener("keydown", (event) => {
    // The editor handles its own keys (and prevents their defaults).
    if (!tab || $("#code").hidden || event.defaultPrevented) return;
    const mod = event.ctrlKey || event.metaKey;
    const key = event.key.toLowerCase();
    const handled = () => event.preventDefault();
    if (mod && event.shiftKey && key === "enter") {
      handled();
      attempt("Deploy", deploy);
    } else if (mod && key === "enter") {
      handled();
      attempt("Restart", restart);
    } else if (mod && key === "s") {
      handled();
      attempt("Save", save);
    } else if (event.altKey && !mod && event.code === "Slash") {
      handled();
      shortcuts();
    } else if (event.altKey && !mod && /^Digit[1-9]$/.test(event.code)) {
      handled();
      const t = tabs[Number(event.code.slice(5)) - 1];
      if (t && t !== tab) showTab(t);
    } else if (event.altKey && !mod && event.code === "KeyW") {
      handled();
      closeTab(tab);
    } else if (event.altKey && !mod && event.code === "KeyN") {
      handled();
      $("#code-new-path").focus();
    }
  });

  return { open: openPanel, close: pause, forget, forgetPanel, refresh: loadPanels };
}
