// Writing a panel in the Studio's workspace, live: create an empty panel,
// add server.py and write a small server in the code editor (CodeMirror),
// save it, start the Studio instance and see it answer in the frame beside
// the editor, edit it and restart (Ctrl+Enter), see the change and the log,
// open a second panel from the sidebar in a tab of its own, switch between
// the tabs by keyboard with each keeping its unsaved text, close one,
// deploy, call the App through the gateway and its tool through MCP with
// the official SDK client. Run by nexus-bin/tests/panels_ui.rs against a
// real `nexus dev` (NEXUS_URL, NEXUS_PASSWORD, NEXUS_GATEWAY), in Debian's
// Chromium; the workspace is photographed to NEXUS_SCREENSHOT.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const base = process.env.NEXUS_URL;
const password = process.env.NEXUS_PASSWORD;
const gateway = process.env.NEXUS_GATEWAY;
const START = 90_000;

const launchArgs = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const server = (version) => `import http.server, json, os

VERSION = "${version}"
MANIFEST = {"name": "written", "tools": [{"name": "shout", "desc": "Upper-case a text.",
    "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}]}

class Handler(http.server.BaseHTTPRequestHandler):
    def send(self, body, kind="application/json"):
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/manifest":
            return self.send(json.dumps(MANIFEST))
        self.send(f"<h1 id='hello'>hello {VERSION}</h1>", "text/html")

    def do_POST(self):
        call = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send(json.dumps({"result": call["arguments"]["text"].upper() + " " + VERSION}))

print("serving", VERSION, flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
`;

// Pastes `text` into the code editor as a user's paste does: CodeMirror
// takes it from the clipboard event as is (typing it key by key would
// auto-indent and close brackets; inserted text arrives with the DOM's
// non-breaking spaces).
async function paste(page, text) {
  await page.locator("#code-editor .cm-content").evaluate((content, text) => {
    const data = new DataTransfer();
    data.setData("text/plain", text);
    content.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
  }, text);
}

async function mcpClient(token) {
  const transport = new StreamableHTTPClientTransport(new URL(base + "/mcp"), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
  const client = new Client({ name: "nexus-workspace-test", version: "1.0.0" });
  await client.connect(transport);
  return client;
}

test("a panel is written in the editor, runs beside it, restarts on an edit, deploys and serves its tool", async () => {
  assert.ok(base && password && gateway, "NEXUS_URL, NEXUS_PASSWORD and NEXUS_GATEWAY must be set");
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: launchArgs });
  try {
    const page = await (await browser.newContext({ viewport: { width: 1500, height: 900 } })).newPage();
    const errors = [];
    page.on("pageerror", (error) => errors.push(error.message));
    page.on("console", (message) => message.type() === "error" && errors.push(`${message.text()} at ${JSON.stringify(message.location())}`));
    page.on("response", (r) => r.status() >= 400 && errors.push(`${r.request().method()} ${r.url()}: ${r.status()}`));
    await page.goto(base);
    await page.fill("#login-username", "admin");
    await page.fill("#login-password", password);
    await page.click("#login-submit");
    await page.waitForSelector("#panels:not([hidden])");

    await page.fill("#panel-name", "Written here");
    await page.selectOption("#panel-template", "template:empty");
    await page.click("#panel-create");
    const item = page.locator("#panel-list li.panel", { hasText: "Written here" });
    await item.waitFor();
    const id = await item.getAttribute("data-panel");
    const token = await page.evaluate(() => sessionStorage.getItem("nexus-token"));
    const fileText = async (path) => {
      const response = await page.request.get(`${base}/api/panels/${id}/files/${path}`, {
        headers: { authorization: `Bearer ${token}` },
      });
      assert.equal(response.status(), 200, `GET ${path}`);
      return response.text();
    };

    // The workspace of an empty panel: no files, the editor ready.
    await item.locator('[data-action="code"]').click();
    await page.waitForSelector(`#code[data-panel="${id}"]:not([hidden])`);
    await page.waitForSelector("#code-editor .cm-editor");
    assert.equal(await page.locator("#code-tree li").count(), 0, "an empty panel has no files");

    // A new file, written in the editor and saved with Ctrl+S.
    await page.fill("#code-new-path", "server.py");
    await page.click('[data-testid="new-file"]');
    await page.waitForSelector('#code[data-file="server.py"]');
    await page.click("#code-editor .cm-content");
    await paste(page, server("v1"));
    await page.waitForSelector('#code[data-dirty="true"]');
    await page.keyboard.press("Control+s");
    await page.waitForSelector('#code[data-dirty="false"]');
    assert.equal(await fileText("server.py"), server("v1"), "the file holds exactly what was typed");
    assert.equal(await page.locator('#code-tree li[data-path="server.py"]').count(), 1);

    // Start: the instance runs what was saved, and the frame shows it.
    await page.click('[data-testid="restart"]');
    await page.waitForSelector('#code[data-studio-state="ready"], #code[data-studio-state="idle"]', { timeout: START });
    const frame = page.frameLocator("#code-frame");
    await frame.locator("#hello").filter({ hasText: "hello v1" }).waitFor({ timeout: START });
    const first = await page.getAttribute("#code", "data-frame");

    // An edit, saved and restarted with Ctrl+Enter from the editor.
    await page.click("#code-editor .cm-content");
    await page.keyboard.press("Control+a");
    await paste(page, server("v2"));
    await page.keyboard.press("Control+Enter");
    await page.waitForFunction((first) => {
      const code = document.querySelector("#code");
      return code.dataset.frame && code.dataset.frame !== first;
    }, first, { timeout: START });
    await frame.locator("#hello").filter({ hasText: "hello v2" }).waitFor({ timeout: START });
    assert.equal(await fileText("server.py"), server("v2"));
    await page.locator("#code-log", { hasText: "serving v2" }).waitFor({ timeout: START });

    // A second panel, made elsewhere, appears in the sidebar and opens in
    // a tab of its own; Alt+1 and Alt+2 switch, each tab keeping its state.
    const made = await page.request.post(`${base}/api/panels`, {
      headers: { authorization: `Bearer ${token}` },
      data: { name: "Second one", mode: "studio", source: "template:node_minimal" },
    });
    assert.equal(made.status(), 201);
    const second = (await made.json()).id;
    await page.locator(`#ws-panel-list li[data-panel="${second}"] button`).click({ timeout: 15000 });
    await page.waitForSelector(`#code[data-panel="${second}"][data-file="server.js"]`);
    assert.equal(await page.locator("#ws-tabs .ws-tab").count(), 2);
    await page.click("#code-editor .cm-content");
    await page.keyboard.press("Control+End");
    await paste(page, "\n// unsaved in the second tab\n");
    await page.waitForSelector(`#ws-tabs .ws-tab[data-panel="${second}"][data-dirty="true"]`);
    await page.keyboard.press("Alt+1");
    await page.waitForSelector(`#code[data-panel="${id}"][data-file="server.py"][data-dirty="false"]`);
    await frame.locator("#hello").filter({ hasText: "hello v2" }).waitFor({ timeout: START });
    const editorText = () => page.locator("#code-editor .cm-content").innerText();
    assert.match(await editorText(), /VERSION = "v2"/);
    await page.screenshot({ path: process.env.NEXUS_SCREENSHOT || "/tmp/nexus-workspace.png" });
    await page.keyboard.press("Alt+2");
    await page.waitForSelector(`#code[data-panel="${second}"][data-dirty="true"]`);
    // The editor draws only the lines in view: go to the end, as a user would.
    await page.click("#code-editor .cm-content");
    await page.keyboard.press("Control+End");
    await page.locator("#code-editor .cm-content", { hasText: "unsaved in the second tab" }).waitFor({ timeout: 5000 });
    // The shortcuts are listed (Alt+/), and Alt+W closes the tab, asking
    // first because of the unsaved change.
    await page.keyboard.press("Alt+/");
    await page.locator("#code-shortcuts", { hasText: "Alt+W" }).waitFor();
    await page.keyboard.press("Escape");
    page.once("dialog", (dialog) => dialog.accept());
    await page.keyboard.press("Alt+w");
    await page.waitForSelector(`#code[data-panel="${id}"]`);
    assert.equal(await page.locator("#ws-tabs .ws-tab").count(), 1);
    assert.equal(await fileText("server.py"), server("v2"));

    // Deploy: the App serves v2 through the gateway (the owner's cookie
    // came with the frame), and its tool is callable through MCP.
    await page.click('[data-testid="deploy"]');
    await page.waitForSelector("#code[data-deployed]", { timeout: START });
    const app = await page.request.get(`${gateway}/p/${id}/`, { timeout: START });
    assert.equal(app.status(), 200);
    assert.match(await app.text(), /hello v2/);
    const client = await mcpClient(token);
    try {
      const tool = `${id}.shout`;
      const deadline = Date.now() + 60_000;
      while (!(await client.listTools()).tools.some((t) => t.name === tool)) {
        assert.ok(Date.now() < deadline, `${tool} was never listed`);
        await new Promise((resolve) => setTimeout(resolve, 500));
      }
      const result = await client.callTool({ name: tool, arguments: { text: "hi there" } });
      assert.ok(!result.isError, JSON.stringify(result));
      const text = result.content.filter((c) => c.type === "text").map((c) => c.text).join("");
      assert.match(text, /HI THERE v2/);
    } finally {
      await client.close();
    }
    assert.deepEqual(errors.filter((e) => !e.includes("favicon")), [], "the page logged no errors");
  } finally {
    await browser.close();
  }
});
