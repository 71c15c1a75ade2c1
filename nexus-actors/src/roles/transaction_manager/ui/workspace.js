// Nexus Studio's workspace: one panel's code, to write and run. Its files
// (the files API) in a tree, the open one in the code editor (CodeMirror,
// the /static/editor.js bundle, loaded on first use), and beside them the
// running Studio instance in its frame (through the gateway) over its live
// log. Save (Ctrl+S), Start or Restart (Ctrl+Enter: save, stop, start) and
// Deploy act on the panel.
//
// It owns the #code section and nothing else; app.js gives it the page's
// helpers. File content reaches the page only as the editor's text, never
// as markup.

const POLL_MS = 1000; // instance state and log, while the workspace is open
const LOG_LINES = 200;
const STOP_WAIT_MS = 30_000;
const SERVING = new Set(["starting", "ready", "idle"]);
const LIVE = new Set(["pending", "starting", "ready", "idle", "stopping"]);

export function workspaceView({ api, el, show, authorization, panelAccess, gatewayBase, config, back }) {
  const $ = (selector) => document.querySelector(selector);
  let editor = null; // made on first open
  let panel = null; // the open panel's record
  let files = []; // its entries as listed
  let open = null; // the open file's path
  let timer = null;
  let heartbeatTimer = null;
  let studio = null; // the latest Studio instance's status
  let frameFor = null; // the instance the frame shows
  let busy = false;

  const base = () => `/api/panels/${encodeURIComponent(panel.id)}`;
  const fileUrl = (path) => `${base()}/files/${path.split("/").map(encodeURIComponent).join("/")}`;

  function notice(message) {
    $("#code-notice").textContent = message || "";
  }

  // Runs one action; a refusal is shown, not thrown. One at a time.
  async function attempt(label, run) {
    if (busy) return;
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
      onChange: (dirty) => {
        $("#code-dirty").hidden = !dirty;
        $("#code").dataset.dirty = String(dirty);
      },
    });
  }

  async function openPanel(record) {
    close();
    panel = record;
    show("code");
    $("#code").dataset.panel = panel.id;
    $("#code-name").textContent = panel.name;
    $("#code-log").textContent = "";
    $("#code-frame").src = "about:blank";
    await attempt("Open", async () => {
      await ensureEditor();
      await loadTree();
      const first = ["server.py", "server.js", "nexus-panel.json"].find((p) => files.some((f) => f.path === p))
        || files.find((f) => f.kind === "file")?.path;
      if (first) await openFile(first);
      else {
        open = null;
        editor.load("", "");
        $("#code-path").textContent = "no file open: add one on the left";
      }
    });
    await poll();
    timer = setInterval(poll, POLL_MS);
    heartbeatTimer = setInterval(heartbeat, config.heartbeat_secs * 1000);
  }

  function close() {
    clearInterval(timer);
    clearInterval(heartbeatTimer);
    timer = heartbeatTimer = null;
    panel = null;
    studio = null;
    frameFor = null;
    const frame = $("#code-frame");
    if (frame) frame.src = "about:blank";
    delete $("#code")?.dataset.panel;
  }

  async function loadTree() {
    const list = await api("GET", `${base()}/files`);
    files = list.entries;
    $("#code-usage").textContent =
      `${files.length} ${files.length === 1 ? "entry" : "entries"} · ${(list.bytes / 1024).toFixed(1)} KiB of ${(list.limits.max_bytes / 1048576).toFixed(0)} MiB`
      + (list.truncated ? " · more than listed" : "");
    renderTree();
  }

  function renderTree() {
    $("#code-tree").replaceChildren(
      ...files.map((f) => {
        const depth = f.path.split("/").length - 1;
        const name = f.path.split("/").pop();
        const li = el("li", { dataset: { path: f.path, kind: f.kind } });
        li.style.paddingLeft = `${depth * 0.8}rem`;
        if (f.kind === "file") {
          li.append(el("button", { type: "button", textContent: name, title: f.path, onclick: () => switchTo(f.path) }));
          if (f.path === open) li.className = "current";
        } else {
          li.append(f.kind === "dir" ? `▸ ${name}/` : `↪ ${name} → ${f.target || ""}`);
        }
        return li;
      }),
    );
  }

  async function switchTo(path) {
    if (path === open) return;
    if ($("#code").dataset.dirty === "true" && !confirm(`Discard the unsaved changes to ${open}?`)) return;
    await attempt("Open", () => openFile(path));
  }

  async function openFile(path) {
    const text = await (await raw("GET", fileUrl(path))).text();
    open = path;
    editor.load(text, path);
    $("#code-path").textContent = path;
    $("#code").dataset.file = path;
    renderTree();
    editor.focus();
  }

  async function save() {
    if (!panel || open === null) return;
    const text = editor.text();
    await raw("PUT", fileUrl(open), text);
    editor.markSaved(text);
    $("#code").dataset.saved = String(Date.now());
    await loadTree();
  }

  async function newFile(path) {
    path = path.trim().replace(/^\/+/, "");
    if (!path) return;
    if (!files.some((f) => f.path === path)) await raw("PUT", fileUrl(path), "");
    await loadTree();
    await openFile(path);
    $("#code-new-path").value = "";
  }

  async function deleteFile() {
    if (open === null || !confirm(`Delete ${open}?`)) return;
    await raw("DELETE", fileUrl(open));
    open = null;
    editor.load("", "");
    $("#code-path").textContent = "";
    await loadTree();
  }

  async function upload(file) {
    if (!confirm(`Replace every file of ${panel.name} with the content of ${file.name}?`)) return;
    const list = await (await raw("PUT", `${base()}/files`, file)).json();
    files = list.entries;
    open = null;
    await loadTree();
    const first = files.find((f) => f.kind === "file");
    if (first) await openFile(first.path);
  }

  // ---- the running instance ---------------------------------------------------

  async function restart() {
    await save();
    if (studio && LIVE.has(studio.state)) {
      await api("DELETE", `${base()}/studio`);
      const deadline = Date.now() + STOP_WAIT_MS;
      while (Date.now() < deadline) {
        const statuses = await api("GET", `${base()}/instances`);
        if (!statuses.some((s) => s.mode === "studio" && LIVE.has(s.state))) break;
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    }
    studio = await api("POST", `${base()}/studio`);
    render();
  }

  async function stop() {
    await api("DELETE", `${base()}/studio`);
  }

  async function deploy() {
    await save();
    const deployed = await api("POST", `${base()}/deploy`);
    notice(`deployed version ${deployed.version}: the App serves at ${gatewayBase() || "the gateway"}/p/${panel.id}/`);
    $("#code").dataset.deployed = String(deployed.version);
  }

  async function poll() {
    if (!panel) return;
    const id = panel.id;
    try {
      const statuses = await api("GET", `${base()}/instances`);
      if (!panel || panel.id !== id) return;
      studio = statuses.filter((s) => s.mode === "studio").sort((a, b) => a.since_ms - b.since_ms).pop() || null;
      render();
      // A pending instance has no log yet.
      if (studio && studio.state !== "pending") {
        const logs = await api("GET", `${base()}/logs?lines=${LOG_LINES}&instance=${encodeURIComponent(studio.instance)}`);
        if (panel?.id === id) showLog(logs.lines);
      }
    } catch (error) {
      if (error.status !== 404) notice(`instance: ${error.message}`);
    }
  }

  function showLog(lines) {
    const pre = $("#code-log");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = lines.join("\n");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  function render() {
    const state = studio ? studio.state : "stopped";
    const badge = $("#code-state");
    badge.textContent = studio?.reason && state === "failed" ? `failed: ${studio.reason}` : state;
    badge.className = `badge state-${state}`;
    $("#code").dataset.studioState = state;
    $("#code-restart").textContent = studio && LIVE.has(state) ? "Restart" : "Start";
    $("#code-stop").disabled = !(studio && LIVE.has(state));
    const ready = studio && (state === "ready" || state === "idle");
    if (ready && frameFor !== studio.instance) showFrame(studio.instance);
    if (!studio || !LIVE.has(state)) frameFor = null;
  }

  // The gateway serves the Studio instance to its owner only, with the
  // panel's cookie: the node sets it first.
  async function showFrame(instance) {
    const gateway = gatewayBase();
    if (!gateway) return;
    frameFor = instance;
    try {
      await panelAccess(panel.id);
      $("#code-frame").src = `${gateway}/p/${encodeURIComponent(panel.id)}/?instance=${encodeURIComponent(instance)}`;
      $("#code").dataset.frame = instance;
    } catch (error) {
      frameFor = null;
      notice(`open the panel: ${error.message}`);
    }
  }

  // Keeps the open Studio instance from its watchdog's idle timeout.
  async function heartbeat() {
    const gateway = gatewayBase();
    if (!panel || !gateway || !studio || !SERVING.has(studio.state)) return;
    await fetch(`${gateway}/heartbeat/${encodeURIComponent(panel.id)}`, { method: "POST", headers: authorization() })
      .catch(() => {});
  }

  $("#code-back").onclick = () => {
    if ($("#code").dataset.dirty === "true" && !confirm(`Leave ${open} unsaved?`)) return;
    back();
  };
  $("#code-save").onclick = () => attempt("Save", save);
  $("#code-restart").onclick = () => attempt("Restart", restart);
  $("#code-stop").onclick = () => attempt("Stop", stop);
  $("#code-deploy").onclick = () => attempt("Deploy", deploy);
  $("#code-delete").onclick = () => attempt("Delete", deleteFile);
  $("#code-new").onsubmit = (event) => {
    event.preventDefault();
    attempt("New file", () => newFile($("#code-new-path").value));
  };
  $("#code-upload").onchange = (event) => {
    const [file] = event.target.files;
    event.target.value = "";
    if (file) attempt("Upload", () => upload(file));
  };
  document.addEventListener("keydown", (event) => {
    // The editor handles its own keys (and prevents their defaults).
    if (!panel || $("#code").hidden || event.defaultPrevented) return;
    const mod = event.ctrlKey || event.metaKey;
    if (mod && event.key === "Enter") {
      event.preventDefault();
      attempt("Restart", restart);
    } else if (mod && event.key.toLowerCase() === "s") {
      event.preventDefault();
      attempt("Save", save);
    }
  });

  return { open: openPanel, close };
}
