// Nexus Studio's Contexts view: the user's LLM contexts, a chat with one
// (the answer streaming in, tool calls expandable), the timeline of its
// journal, and the conversation replayed at any record, with "Fork here".
//
// It owns the #contexts section and nothing else: app.js gives it the
// page's helpers (the API call, the element builder, the WebSocket) and
// hands it the context frames. Everything shown comes from the journal, the
// same records a replay folds: `GET …/events` for what happened so far,
// `context_record` frames for what happens now. Model and user text only
// ever reaches the page as text (textContent), never as markup.

const PAGE = 500; // records per GET …/events
const SNIPPET = 80; // characters of a record shown in the timeline

export function contextsView({ api, el, connect, show }) {
  const $ = (selector) => document.querySelector(selector);
  const path = (id, rest = "") => `/api/contexts/${encodeURIComponent(id)}${rest}`;

  let list = []; // the user's contexts, as GET /api/contexts lists them
  let current = null; // the open context's info
  let live = null; // the open context's journal as shown; replaced on every open
  let replaySeq = 0; // the replay panel shows the latest request only

  function notice(message) {
    $("#ctx-notice").textContent = message || "";
  }

  // Runs an action of the view; a refusal (503 llm_unavailable included) is shown, not thrown.
  async function attempt(label, run) {
    notice("");
    try {
      return await run();
    } catch (error) {
      notice(`${label}: ${error.message}`);
      return undefined;
    }
  }

  // ---- the list and the new-context form ------------------------------------

  async function open(id) {
    show("contexts");
    await Promise.all([loadList(), loadTools()]);
    const wanted = id || current?.id;
    if (wanted) await openContext(wanted);
  }

  async function loadList() {
    await attempt("contexts", async () => {
      list = await api("GET", "/api/contexts");
      renderList();
    });
  }

  function renderList() {
    $("#ctx-list").replaceChildren(
      ...list.map((c) => {
        const label = `${c.id.slice(-8)} · ${c.model || "default model"} · ${new Date(c.created_at).toLocaleString()}`;
        return el(
          "li",
          { className: c.id === current?.id ? "current" : "", dataset: { testid: "context-item", context: c.id } },
          el("button", { type: "button", title: c.id, textContent: label, onclick: () => openContext(c.id) }),
          c.parent ? el("small", { textContent: ` fork of ${c.parent.context.slice(-8)} @ ${c.parent.offset}` }) : null,
        );
      }),
    );
  }

  async function loadTools() {
    await attempt("tools", async () => {
      const tools = await api("GET", "/api/tools");
      const chosen = new Set([...document.querySelectorAll("#ctx-tools input:checked")].map((i) => i.value));
      $("#ctx-tools").replaceChildren(
        el("legend", { textContent: tools.length ? "Tools it may call" : "No tools available" }),
        ...tools.map((t) =>
          el(
            "label",
            { className: "tool-option", title: t.description },
            el("input", { type: "checkbox", value: t.name, checked: chosen.has(t.name), dataset: { testid: "tool-option" } }),
            " " + t.name,
          ),
        ),
      );
    });
  }

  async function create(event) {
    event.preventDefault();
    const spec = { tools: [...document.querySelectorAll("#ctx-tools input:checked")].map((i) => i.value) };
    const system = $("#ctx-system").value.trim();
    const model = $("#ctx-model").value.trim();
    if (system) spec.system = system;
    if (model) spec.model = model;
    const info = await attempt("new context", () => api("POST", "/api/contexts", spec));
    if (!info) return;
    $("#ctx-system").value = "";
    for (const box of document.querySelectorAll("#ctx-tools input:checked")) box.checked = false;
    list.unshift(info);
    await openContext(info.id, info);
  }

  // ---- one context ------------------------------------------------------------

  async function openContext(id, known) {
    const info = known || (await attempt("context", () => api("GET", path(id))));
    if (!info) return;
    if (current && current.id !== info.id) unfollow(current.id);
    current = info;
    live = {
      last: -1, // highest offset shown: records come in offset order
      syncing: 0, // catch-ups running: live frames wait meanwhile
      waiting: [], // live frames that came during a catch-up
      chain: Promise.resolve(),
      followed: false,
      bubbles: new Map(), // "command:step" -> { node, text }
      calls: new Map(), // call id -> the call's <details>
      running: new Set(), // command offsets whose turn has not ended
      ended: new Set(), // command offsets whose turn has ended
    };
    renderList();
    renderHeader(info);
    $("#ctx-chat").replaceChildren();
    $("#ctx-timeline").replaceChildren();
    $("#ctx-inherited").replaceChildren();
    $("#ctx-inherited").hidden = !info.parent;
    closeReplay();
    renderRunning();
    $("#ctx-open").hidden = false;
    if (info.parent) loadInherited(info);
    follow(info.id);
    await catchUp();
  }

  function renderHeader(info) {
    $("#ctx-open").dataset.context = info.id;
    $("#ctx-id").textContent = info.id;
    const tools = info.tools.length ? info.tools.join(", ") : "none";
    $("#ctx-meta").textContent = `model ${info.model || "(the default)"} · tools: ${tools} · created ${new Date(info.created_at).toLocaleString()}`;
    const lineage = $("#ctx-lineage");
    lineage.hidden = !info.parent;
    if (!info.parent) return lineage.replaceChildren();
    lineage.dataset.parent = info.parent.context;
    lineage.dataset.offset = info.parent.offset;
    lineage.replaceChildren(
      "forked from ",
      el("button", { type: "button", className: "link", textContent: info.parent.context, onclick: () => openContext(info.parent.context) }),
      ` @ ${info.parent.offset}`,
    );
  }

  // A fork's history is its parent's up to the fork point: shown as the parent's transcript there.
  async function loadInherited(info) {
    const box = $("#ctx-inherited");
    box.replaceChildren(el("p", { className: "muted", textContent: "loading the parent's history…" }));
    try {
      const t = await api("GET", path(info.parent.context, `/transcript?at=${info.parent.offset}`));
      if (current !== info) return;
      const note = el("p", { className: "muted", textContent: `history of ${info.parent.context} up to @ ${info.parent.offset}` });
      box.replaceChildren(note, ...transcriptMessages(t.messages));
    } catch (error) {
      if (current === info) box.replaceChildren(el("p", { className: "muted", textContent: `parent's history: ${error.message}` }));
    }
  }

  // ---- following the journal ---------------------------------------------------

  async function follow(id) {
    try {
      const ws = await connect();
      ws.send(JSON.stringify({ type: "follow_context", context: id }));
    } catch (error) {
      notice("live updates are unavailable (" + error.message + "); reopen the context to see new records");
    }
  }

  function unfollow(id) {
    connect()
      .then((ws) => ws.send(JSON.stringify({ type: "unfollow_context", context: id })))
      .catch(() => {});
  }

  // Reads what the page lacks from the journal; live frames wait meanwhile, so records are shown in offset order.
  function catchUp() {
    const [state, id] = [live, current.id];
    state.syncing += 1;
    state.chain = state.chain.then(async () => {
      try {
        for (;;) {
          const page = await api("GET", path(id, `/events?from=${state.last + 1}&limit=${PAGE}`));
          if (live !== state) return;
          for (const record of page.records) apply(record);
          if (page.records.length < PAGE) break;
        }
      } catch (error) {
        if (live === state) notice("journal: " + error.message);
      } finally {
        state.syncing -= 1;
        if (!state.syncing && live === state) {
          const waiting = state.waiting.sort((a, b) => a.offset - b.offset);
          state.waiting = [];
          for (const record of waiting) apply(record);
        }
      }
    });
    return state.chain;
  }

  // A context frame from the WebSocket (app.js routes them here).
  function onFrame(frame) {
    if (!current || frame.context !== current.id) return;
    if (frame.type === "context_followed") {
      // The first confirmation: read what came before it. A later one (the
      // bus or the socket was down): records may be missing anywhere, so
      // everything is read again.
      if (!live.followed) {
        live.followed = true;
        catchUp();
      } else {
        openContext(current.id, current);
      }
      return;
    }
    if (frame.type !== "context_record") return;
    const r = frame.record || {};
    const record = { offset: frame.offset, type: r.type, time: r.time, data: r.data || {}, id: r.id };
    if (live.syncing) live.waiting.push(record);
    else apply(record);
  }

  // After the WebSocket reconnected: follow the open context again.
  function resume(ws) {
    if (current) ws.send(JSON.stringify({ type: "follow_context", context: current.id }));
  }

  // Logged out: forget the open context.
  function close() {
    current = null;
    live = null;
    list = [];
    $("#ctx-open").hidden = true;
    $("#ctx-list").replaceChildren();
  }

  // ---- the chat and the timeline, one record at a time -------------------------

  function apply(record) {
    if (record.offset <= live.last) return;
    live.last = record.offset;
    timelineItem(record);
    const d = record.data;
    const chat = $("#ctx-chat");
    switch (record.type) {
      case "nexus.context.user_message":
      case "nexus.context.agent_message":
        chat.append(message("user", d.content, d.panel ? `panel ${d.panel}` : null, record.offset));
        live.running.add(d.command_offset ?? record.offset);
        break;
      case "nexus.thought.delta":
        bubble(d.command_offset, d.step).text.append(d.text);
        break;
      case "nexus.llm.response": {
        const b = bubble(d.command_offset, d.step);
        if (d.content != null) b.text.textContent = d.content;
        b.text.hidden = !b.text.textContent;
        b.node.dataset.streaming = "false";
        b.node.dataset.offset = record.offset;
        for (const call of d.tool_calls || []) {
          const details = toolCall(call.name, call.arguments);
          live.calls.set(call.call_id, details);
          b.node.append(details);
        }
        break;
      }
      case "nexus.tool.finished": {
        const details = live.calls.get(d.call_id);
        if (details) toolOutcome(details, "error" in d ? d.error : d.result, "error" in d);
        break;
      }
      case "nexus.context.failed": {
        const b = live.bubbles.get(`${d.command_offset}:${d.step}`);
        if (b && b.node.dataset.streaming === "true") b.node.dataset.streaming = "aborted";
        chat.append(el("div", { className: "msg failed", dataset: { testid: "step-failed", code: d.code }, textContent: `${d.code}: ${d.reason}` }));
        break;
      }
      case "nexus.context.turn_completed": {
        live.running.delete(d.command_offset);
        live.ended.add(d.command_offset);
        const usage = d.usage ? ` · ${d.usage.input_tokens} in / ${d.usage.output_tokens} out tokens` : "";
        chat.append(
          el("div", {
            className: "turn-end outcome-" + d.outcome,
            dataset: { testid: "turn-complete", commandOffset: d.command_offset, outcome: d.outcome },
            textContent: `turn ${d.outcome} · ${d.steps} model call(s)${usage}`,
          }),
        );
        break;
      }
    }
    renderRunning();
  }

  // The assistant message of one model call: streamed deltas, then its response.
  function bubble(commandOffset, step) {
    const key = `${commandOffset}:${step}`;
    let b = live.bubbles.get(key);
    if (!b) {
      const text = el("div", { className: "text", dataset: { testid: "assistant-text" } });
      const node = el("div", { className: "msg assistant", dataset: { role: "assistant", testid: "assistant-message", streaming: "true", step } }, text);
      b = { node, text };
      live.bubbles.set(key, b);
      $("#ctx-chat").append(node);
    }
    return b;
  }

  function timelineItem(record) {
    const d = record.data;
    let snippet = "";
    if (record.type === "nexus.thought.delta") snippet = d.text;
    else if (d.content) snippet = d.content;
    else if (record.type === "nexus.llm.response") snippet = (d.tool_calls || []).map((c) => c.name + "()").join(" ");
    else if (record.type === "nexus.tool.called") snippet = d.call?.tool;
    else if (record.type === "nexus.tool.finished") snippet = d.tool + ("error" in d ? " ✗" : " ✓");
    else if (record.type === "nexus.context.failed") snippet = d.code;
    else if (record.type === "nexus.context.turn_completed") snippet = d.outcome;
    snippet = String(snippet || "").replace(/\s+/g, " ").slice(0, SNIPPET);
    const time = record.time ? new Date(record.time).toLocaleTimeString() : "";
    const short = record.type.replace(/^nexus\./, "");
    $("#ctx-timeline").append(
      el(
        "li",
        { dataset: { testid: "timeline-record", offset: record.offset, type: record.type } },
        el(
          "button",
          { type: "button", title: `replay the conversation at offset ${record.offset}`, onclick: () => replay(record.offset) },
          el("code", { className: "offset", textContent: String(record.offset) }),
          el("span", { className: "type", textContent: short }),
          el("span", { className: "time", textContent: time }),
          snippet ? el("span", { className: "snippet", textContent: snippet }) : null,
        ),
      ),
    );
  }

  function renderRunning() {
    const running = Boolean(live && live.running.size);
    $("#ctx-cancel").hidden = !running;
    $("#ctx-open").dataset.running = String(running);
  }

  async function say(event) {
    event.preventDefault();
    const input = $("#ctx-message");
    const content = input.value;
    if (!current || !content.trim()) return;
    const state = live;
    const accepted = await attempt("send", () => api("POST", path(current.id, "/messages"), { content }));
    if (!accepted) return;
    input.value = "";
    // Its turn runs from now (the offset is the command's); the journal's records end it.
    // Without an offset (the broker did not say it) the journal copy of the message starts it.
    if (live === state && accepted.offset != null && !state.ended.has(accepted.offset)) {
      state.running.add(accepted.offset);
      renderRunning();
    }
  }

  async function cancel() {
    if (current) await attempt("cancel", () => api("POST", path(current.id, "/cancel")));
  }

  // ---- messages, tool calls and the replay panel ------------------------------

  function message(role, content, from, offset) {
    const node = el("div", { className: "msg " + role, dataset: { role: from ? `${role} (${from})` : role, testid: role + "-message" } });
    if (offset !== undefined) node.dataset.offset = offset;
    node.append(el("div", { className: "text", textContent: content ?? "" }));
    return node;
  }

  function pretty(text) {
    try {
      return JSON.stringify(typeof text === "string" ? JSON.parse(text) : text, null, 2);
    } catch {
      return String(text);
    }
  }

  function toolCall(name, args) {
    return el(
      "details",
      { className: "tool-call", dataset: { testid: "tool-call", tool: name, state: "running" } },
      el("summary", {}, "tool ", el("code", { textContent: name }), el("span", { className: "tool-state", textContent: " running…" })),
      el("div", { className: "label", textContent: "arguments" }),
      el("pre", { dataset: { testid: "tool-arguments" }, textContent: pretty(args) }),
      el("div", { className: "label", textContent: "result" }),
      el("pre", { dataset: { testid: "tool-result" }, textContent: "…" }),
    );
  }

  function toolOutcome(details, value, failed) {
    details.dataset.state = failed ? "error" : "ok";
    details.querySelector(".tool-state").textContent = failed ? " failed" : " done";
    details.querySelector("[data-testid=tool-result]").textContent = pretty(value);
  }

  // Transcript messages (GET …/transcript) as chat elements; tool results go into their call's <details>.
  function transcriptMessages(messages) {
    const calls = new Map();
    const out = [];
    for (const m of messages) {
      if (m.role === "tool") {
        const details = calls.get(m.tool_call_id);
        if (details) toolOutcome(details, m.content, /^\{"error"/.test(m.content || ""));
        else out.push(message("tool", m.content, m.tool, m.offset));
        continue;
      }
      const node = message(m.role, m.content, m.panel ? `panel ${m.panel}` : null, m.offset);
      if (!m.content) node.querySelector(".text").hidden = true;
      for (const call of m.tool_calls || []) {
        const details = toolCall(call.name, call.arguments);
        calls.set(call.id, details);
        node.append(details);
      }
      out.push(node);
    }
    return out;
  }

  async function replay(offset) {
    if (!current) return;
    const seq = ++replaySeq;
    const info = current;
    for (const li of document.querySelectorAll("#ctx-timeline li")) li.classList.toggle("selected", li.dataset.offset === String(offset));
    const panel = $("#ctx-replay");
    panel.hidden = false;
    panel.dataset.at = offset;
    panel.dataset.loaded = "false";
    $("#ctx-replay-at").textContent = String(offset);
    $("#ctx-replay-messages").replaceChildren(el("p", { className: "muted", textContent: "replaying…" }));
    $("#ctx-replay-open").hidden = true;
    $("#ctx-replay-steps").replaceChildren();
    let t;
    try {
      t = await api("GET", path(info.id, `/transcript?at=${offset}`));
    } catch (error) {
      if (seq === replaySeq) $("#ctx-replay-messages").replaceChildren(el("p", { className: "muted", textContent: error.message }));
      return;
    }
    if (seq !== replaySeq || current !== info) return;
    const messages = transcriptMessages(t.messages);
    $("#ctx-replay-messages").replaceChildren(...(messages.length ? messages : [el("p", { className: "muted", textContent: "no messages yet" })]));
    const openTurn = $("#ctx-replay-open");
    openTurn.hidden = !t.open;
    if (t.open) {
      const streamed = t.open.streaming ? `; streamed so far: ${t.open.streaming}` : "";
      openTurn.textContent = `a turn is under way here (command ${t.open.command_offset}, next model call ${t.open.next_step})${streamed}`;
    }
    $("#ctx-replay-steps").replaceChildren(
      ...t.steps.map((s) =>
        el("tr", {}, ...[s.offset, s.kind, s.name, s.ttft_ms ?? "", s.duration_ms, s.outcome].map((v) => el("td", { textContent: String(v) }))),
      ),
    );
    panel.dataset.loaded = "true";
  }

  function closeReplay() {
    replaySeq += 1;
    $("#ctx-replay").hidden = true;
    delete $("#ctx-replay").dataset.at;
  }

  async function forkHere() {
    const at = Number($("#ctx-replay").dataset.at);
    if (!current || Number.isNaN(at)) return;
    const child = await attempt("fork", () => api("POST", path(current.id, "/fork"), { at }));
    if (!child) return;
    list.unshift(child);
    await openContext(child.id, child);
  }

  $("#ctx-new").onsubmit = create;
  $("#ctx-say").onsubmit = say;
  $("#ctx-cancel").onclick = cancel;
  $("#ctx-fork").onclick = forkHere;
  $("#ctx-replay-close").onclick = closeReplay;
  $("#ctx-refresh").onclick = () => open();
  // Enter sends, Shift+Enter starts a new line.
  $("#ctx-message").addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.shiftKey) return;
    event.preventDefault();
    $("#ctx-say").requestSubmit();
  });

  return { open, onFrame, resume, close };
}
