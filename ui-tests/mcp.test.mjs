// The tool registry as an MCP server: the official MCP TypeScript SDK
// connects to `/mcp` over Streamable HTTP, lists and calls tools, and
// lists, reads and completes documents as resources. Run by
// nexus-bin/tests/tools_e2e.rs against a real `nexus dev` (NEXUS_URL,
// NEXUS_PASSWORD; NEXUS_PANEL_TOOL names a panel's `word_count` tool, as
// `<panel-id>.word_count`, when a panel and its sidecar are running, and
// NEXUS_PANEL_URL where that panel (python_minimal) listens;
// NEXUS_LLM=1 when the node has a model, for `llm_ask`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ResourceUpdatedNotificationSchema } from "@modelcontextprotocol/sdk/types.js";

const base = process.env.NEXUS_URL;
const password = process.env.NEXUS_PASSWORD;
const panelTool = process.env.NEXUS_PANEL_TOOL;
const panelUrl = process.env.NEXUS_PANEL_URL;
// Set when the node has a (scripted) model: it answers "The answer is 42."
const withModel = process.env.NEXUS_LLM === "1";

async function api(path, { token, body } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(base + path, { method: "POST", headers, body: JSON.stringify(body) });
  const json = await response.json();
  assert.ok(response.ok, `POST ${path}: HTTP ${response.status} ${JSON.stringify(json)}`);
  return json;
}

async function connect(token) {
  const requestInit = token ? { headers: { Authorization: `Bearer ${token}` } } : {};
  const transport = new StreamableHTTPClientTransport(new URL(base + "/mcp"), { requestInit });
  const client = new Client({ name: "nexus-mcp-test", version: "1.0.0" });
  await client.connect(transport);
  return client;
}

async function panelStats() {
  const response = await fetch(panelUrl + "/stats");
  assert.ok(response.ok, `GET /stats: HTTP ${response.status}`);
  return (await response.json()).slow_count;
}

async function until(condition, ms, what) {
  const deadline = Date.now() + ms;
  while (!(await condition())) {
    assert.ok(Date.now() < deadline, `${what} within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const textOf = (result) => result.content.filter((c) => c.type === "text").map((c) => c.text).join("\n");

test("the tool registry is an MCP server at /mcp", async (t) => {
  assert.ok(base && password, "NEXUS_URL and NEXUS_PASSWORD must be set");
  const { token } = await api("/api/login", { body: { username: "admin", password } });

  await t.test("an unauthenticated client is refused with 401", async () => {
    await assert.rejects(connect(null), (err) => {
      assert.equal(err.code, 401, `expected a 401, got ${err}`);
      return true;
    });
    await assert.rejects(connect("not.a.token"), (err) => err.code === 401);
  });

  const client = await connect(token);
  try {
    assert.equal(client.getServerVersion()?.name, "nexus");
    assert.ok(client.getServerCapabilities()?.tools, "the server offers tools");

    await t.test("listTools offers the system tools (and the panel's)", async () => {
      const { tools } = await client.listTools();
      const names = tools.map((tool) => tool.name);
      for (const name of ["list_documents", "read_document"]) {
        assert.ok(names.includes(name), `${name} in ${names}`);
      }
      for (const tool of tools) {
        assert.equal(tool.inputSchema.type, "object", `${tool.name} has an object schema`);
      }
      if (panelTool) assert.ok(names.includes(panelTool), `${panelTool} in ${names}`);
    });

    await t.test("list_documents sees a new document", async () => {
      const doc = await api("/api/documents", { token, body: { state: { title: "mcp" } } });
      const result = await client.callTool({ name: "list_documents", arguments: {} });
      assert.notEqual(result.isError, true, textOf(result));
      const ids = result.structuredContent.documents.map((d) => d.id);
      assert.ok(ids.includes(doc.id), `${doc.id} in ${ids}`);
      assert.ok(textOf(result).includes(doc.id), "the text content carries the result too");
    });

    await t.test("the panel's tool runs through its sidecar", { skip: !panelTool && "NEXUS_PANEL_TOOL not set" }, async () => {
      const result = await client.callTool({ name: panelTool, arguments: { text: "one two three" } });
      assert.notEqual(result.isError, true, textOf(result));
      assert.deepEqual(result.structuredContent, { words: 3, characters: 13, lines: 1 });
    });

    await t.test("a long panel tool reports progress, and cancelling it stops the panel's work", { skip: !(panelTool && panelUrl) && "NEXUS_PANEL_TOOL or NEXUS_PANEL_URL not set" }, async () => {
      const slow = panelTool.replace(/\.word_count$/, ".slow_count");
      const reports = [];
      const done = await client.callTool({ name: slow, arguments: { text: "a b", steps: 3, step_ms: 50 } }, undefined, {
        onprogress: (report) => reports.push(report),
      });
      assert.notEqual(done.isError, true, textOf(done));
      assert.deepEqual(done.structuredContent, { words: 2, characters: 3, lines: 1 });
      assert.deepEqual(reports.map((r) => [r.progress, r.total, r.message]), [
        [1, 3, "step 1 of 3"],
        [2, 3, "step 2 of 3"],
        [3, 3, "step 3 of 3"],
      ]);

      const before = await panelStats();
      const controller = new AbortController();
      let firstReport;
      const reported = new Promise((resolve) => (firstReport = resolve));
      const running = client.callTool({ name: slow, arguments: { text: "a b", steps: 50, step_ms: 200 } }, undefined, {
        signal: controller.signal,
        onprogress: () => firstReport(),
      });
      await reported;
      controller.abort("changed my mind");
      await assert.rejects(running);
      // The panel notices within a step or two, long before its 10 s of work.
      await until(async () => (await panelStats()).stopped === before.stopped + 1, 5000, "the panel stops the cancelled call");
      assert.equal((await panelStats()).finished, before.finished, "the cancelled call did not run to its end");
    });

    await t.test("the panel's declared resource is listed and read through its sidecar", { skip: !panelTool && "NEXUS_PANEL_TOOL not set" }, async () => {
      const uri = `nexus://panels/${panelTool.replace(/\.word_count$/, "")}/stats`;
      const { resources } = await client.listResources();
      const listed = resources.find((r) => r.uri === uri);
      assert.ok(listed, `${uri} in ${resources.map((r) => r.uri)}`);
      assert.equal(listed.mimeType, "application/json");
      const { contents } = await client.readResource({ uri });
      assert.equal(contents[0].mimeType, "application/json");
      const stats = JSON.parse(contents[0].text);
      assert.equal(typeof stats.slow_count.finished, "number", contents[0].text);
      await assert.rejects(client.readResource({ uri: uri.replace(/stats$/, "secrets") }), (err) => err.code === -32002);
    });

    await t.test("llm_ask asks the LLM manager, in a new context and then in the same one", { skip: !withModel && "NEXUS_LLM not set" }, async () => {
      // The new context starts from one of the platform's system prompts, which MCP lists too.
      const { prompts } = await client.listPrompts();
      assert.deepEqual(prompts.slice(0, 3).map((p) => p.name), ["assistant", "document_reader", "panel_operator"]);
      const assistant = (await client.getPrompt({ name: "assistant" })).messages[0].content.text;
      const first = await client.callTool({ name: "llm_ask", arguments: { message: "What is the answer?", system_prompt: "assistant" } });
      assert.notEqual(first.isError, true, textOf(first));
      assert.equal(first.structuredContent.outcome, "completed", textOf(first));
      assert.match(first.structuredContent.answer, /42/);
      const context = first.structuredContent.context;
      assert.match(context, /^[0-9a-f-]{36}$/);
      const transcript = await (await fetch(`${base}/api/contexts/${context}/transcript`, { headers: { Authorization: `Bearer ${token}` } })).json();
      assert.equal(transcript.system, assistant, "the context's system prompt is the one named");
      const renamed = await client.callTool({ name: "llm_ask", arguments: { context, message: "Sure?", system_prompt: "assistant" } });
      assert.equal(renamed.isError, true, "a context keeps the system prompt it was made with");
      const again = await client.callTool({ name: "llm_ask", arguments: { context, message: "Sure?" } });
      assert.notEqual(again.isError, true, textOf(again));
      assert.equal(again.structuredContent.context, context, "the same context goes on");
      const foreign = await client.callTool({ name: "llm_ask", arguments: { context: "00000000-0000-7000-8000-000000000000", message: "hi" } });
      assert.equal(foreign.isError, true, "a context that is not the caller's is refused");
    });

    await t.test("documents are resources of their owner only", async () => {
      assert.ok(client.getServerCapabilities()?.resources, "the server offers resources");
      assert.equal(client.getServerCapabilities().resources.subscribe, true);
      const doc = await api("/api/documents", { token, body: { state: { title: "a resource" } } });
      const uri = `nexus://documents/${doc.id}`;
      let listed = [];
      let cursor;
      do {
        const page = await client.listResources(cursor ? { cursor } : {});
        listed = listed.concat(page.resources.map((r) => r.uri));
        cursor = page.nextCursor;
      } while (cursor);
      assert.ok(listed.includes(uri), `${uri} in ${listed}`);
      const { resourceTemplates } = await client.listResourceTemplates();
      assert.equal(resourceTemplates[0].uriTemplate, "nexus://documents/{id}");
      const { contents } = await client.readResource({ uri });
      assert.equal(contents[0].mimeType, "application/json");
      assert.deepEqual(JSON.parse(contents[0].text), { title: "a resource" });
      assert.equal(contents[0]._meta.version, 1);
      const { completion } = await client.complete({
        ref: { type: "ref/resource", uri: "nexus://documents/{id}" },
        argument: { name: "id", value: doc.id.slice(0, 35) },
      });
      assert.deepEqual(completion.values, [doc.id]);

      // Another user's document reads like one that does not exist.
      const name = `mcp-other-${Date.now()}`;
      await api("/api/users", { token, body: { username: name, password: "another-password-1" } });
      const other = await api("/api/login", { body: { username: name, password: "another-password-1" } });
      const theirs = await api("/api/documents", { token: other.token, body: { state: { secret: true } } });
      for (const probe of [`nexus://documents/${theirs.id}`, "nexus://documents/00000000-0000-7000-8000-000000000000"]) {
        await assert.rejects(client.readResource({ uri: probe }), (err) => {
          assert.equal(err.code, -32002, `${probe}: ${err}`);
          const expected = `no resource "${probe}" is available to you`;
          assert.ok(String(err.message).includes(expected), `${err.message} says ${expected}`);
          return true;
        });
      }
      await client.setLoggingLevel("info");
    });

    await t.test("a subscribed document's change arrives as resources/updated, until unsubscribed", async () => {
      const doc = await api("/api/documents", { token, body: { state: { n: 0 } } });
      const uri = `nexus://documents/${doc.id}`;
      const updates = [];
      client.setNotificationHandler(ResourceUpdatedNotificationSchema, (note) => updates.push(note.params));
      await client.subscribeResource({ uri });
      // Changed through the REST API, as another client (or node) would.
      const change = async (version, n) => {
        const response = await fetch(`${base}/api/documents/${doc.id}`, {
          method: "PATCH",
          headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
          body: JSON.stringify({ version, patch: { n } }),
        });
        assert.ok(response.ok, `PATCH: HTTP ${response.status}`);
      };
      // The session's stream may still be opening: change until heard.
      let version = 1;
      await until(async () => {
        if (updates.length === 0) await change(version++, version);
        return updates.length > 0;
      }, 10000, "resources/updated");
      assert.equal(updates[0].uri, uri);
      assert.ok(updates[0]._meta.version >= 2, JSON.stringify(updates[0]));
      // Every change made so far is heard before unsubscribing (the document is at `version`).
      await until(async () => updates.some((u) => u._meta.version === version), 10000, "the latest change");
      await client.unsubscribeResource({ uri });
      const heard = updates.length;
      await change(version++, -1);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      assert.equal(updates.length, heard, "nothing after unsubscribing");
      // Someone else's document cannot be subscribed to.
      await assert.rejects(client.subscribeResource({ uri: "nexus://documents/00000000-0000-7000-8000-000000000000" }),
        (err) => err.code === -32002);
    });

    await t.test("failures are tool errors, with a message", async () => {
      const missing = await client.callTool({ name: "read_document", arguments: { id: "no-such-doc" } });
      assert.equal(missing.isError, true);
      assert.match(textOf(missing), /no-such-doc/);

      const unknown = await client.callTool({ name: "no_such_tool", arguments: {} });
      assert.equal(unknown.isError, true);
      assert.match(textOf(unknown), /^not_found: /);

      const invalid = await client.callTool({ name: "read_document", arguments: {} });
      assert.equal(invalid.isError, true);
      assert.match(textOf(invalid), /invalid_arguments/);
    });
  } finally {
    await client.close();
  }
});
