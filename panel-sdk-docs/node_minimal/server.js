// node_minimal: the template Nexus panel, using only the Node.js standard library.
//
// Copy this file and replace the tools. It implements the panel contract
// (../README.md), like python_minimal:
//
// * GET  /             -> the panel's page (what the Studio shows through the gateway)
// * POST /count        -> the page's own word count (no tool call)
// * GET  /manifest     -> the tools this panel offers (name, desc, input_schema)
// * POST /mcp/execute  -> run one tool: {"result": ...} or {"error": "..."}
// * publishing goes through the sidecar: POST $NEXUS_PROXY_URL; the panel
//   itself holds no credentials.
//
// /manifest and /mcp/* answer only the panel's own sidecar, which sends the
// secret in $NEXUS_SIDECAR_TOKEN as the header X-Nexus-Sidecar-Token;
// anything else gets 401. Without the variable (run by hand) they answer anyone.
//
// Run it with `node server.js` (listens on 127.0.0.1:$PORT, default 8080).
"use strict";

const crypto = require("node:crypto");
const http = require("node:http");

const PORT = Number(process.env.PORT || 8080);
const PROXY_URL = process.env.NEXUS_PROXY_URL || "http://127.0.0.1:3500/proxy";
const SIDECAR_TOKEN = Buffer.from(process.env.NEXUS_SIDECAR_TOKEN || "");
const MAX_REQUEST = 2 * 1024 * 1024; // the platform sends at most 1 MiB of arguments

const MANIFEST = {
  name: "node_minimal",
  tools: [
    {
      name: "word_count",
      desc: "Count the words, characters and lines of a text.",
      input_schema: {
        type: "object",
        properties: { text: { type: "string", maxLength: 100000 } },
        required: ["text"],
      },
    },
    {
      name: "publish_note",
      desc: "Publish a short note on this panel's 'notes' channel.",
      input_schema: {
        type: "object",
        properties: { text: { type: "string", maxLength: 1000 } },
        required: ["text"],
      },
    },
  ],
};

/** A failure to report to the caller as {"error": message}. */
class ToolError extends Error {}

function textArgument(args) {
  // The platform checks arguments against input_schema first; check again so
  // that a direct or malformed call gets an error, not a crash.
  if (typeof args.text !== "string") throw new ToolError("argument 'text' must be a string");
  return args.text;
}

function wordCount(args) {
  const text = textArgument(args);
  const words = text.split(/\s+/).filter(Boolean).length;
  const lines = text === "" ? 0 : text.split(/\r\n|\r|\n/).length - (/(\r\n|\r|\n)$/.test(text) ? 1 : 0);
  return { words, characters: [...text].length, lines };
}

async function publishNote(args, deadlineMs) {
  const body = { channel: "notes", type: "node_minimal.note", data: { text: textArgument(args) } };
  let response;
  try {
    response = await fetch(PROXY_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(Math.min(2000, deadlineMs)),
    });
  } catch (e) {
    throw new ToolError(`could not publish: ${e.cause?.code || e.message}`);
  }
  const text = await response.text();
  if (!response.ok) throw new ToolError(`could not publish: ${response.status} ${text.slice(0, 512)}`);
  return { published: true, id: JSON.parse(text).id };
}

const TOOLS = { word_count: wordCount, publish_note: publishNote };

// The panel's page, opened through the traffic gateway at /p/<panel-id>/.
// Links stay relative so they keep that prefix; it asks the server only when
// the user clicks, so an App can scale to zero.
const PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>node_minimal</title>
<style>body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:40rem}
textarea{width:100%;height:6rem}</style></head>
<body><h1 id="title">node_minimal</h1>
<p>A Nexus panel in plain Node.js. Its tools: <code>word_count</code>, <code>publish_note</code>.</p>
<textarea id="text">Count these words, please.</textarea>
<p><button id="count">Count words</button> <output id="result"></output></p>
<script>
document.getElementById("count").onclick = async () => {
  const text = document.getElementById("text").value;
  const response = await fetch("count", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({text})});
  const answer = await response.json();
  document.getElementById("result").textContent =
    answer.error ? answer.error : answer.words + " words, " + answer.characters + " characters";
};
</script></body></html>
`;

function fromSidecar(req) {
  if (SIDECAR_TOKEN.length === 0) return true;
  const presented = Buffer.from(req.headers["x-nexus-sidecar-token"] || "");
  // Constant time: a guesser learns nothing from how long a refusal takes.
  return presented.length === SIDECAR_TOKEN.length && crypto.timingSafeEqual(presented, SIDECAR_TOKEN);
}

function isToolPath(path) {
  return path === "/manifest" || path === "/mcp" || path.startsWith("/mcp/");
}

function reply(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data) });
  res.end(data);
}

function readJson(req) {
  return new Promise((resolve, reject) => {
    const length = Number(req.headers["content-length"] || 0);
    if (!(length > 0 && length <= MAX_REQUEST)) return reject(new Error("missing, empty or too large body"));
    const chunks = [];
    let size = 0;
    req.on("data", (chunk) => {
      size += chunk.length;
      if (size > MAX_REQUEST) req.destroy();
      else chunks.push(chunk);
    });
    req.on("end", () => {
      try {
        const body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
        if (body === null || typeof body !== "object" || Array.isArray(body)) throw new Error("body must be a JSON object");
        resolve(body);
      } catch (e) {
        reject(e);
      }
    });
    req.on("error", reject);
  });
}

async function execute(req, res) {
  let tool, args, deadlineMs;
  try {
    const call = await readJson(req);
    tool = call.tool;
    args = call.arguments === undefined ? {} : call.arguments;
    if (typeof tool !== "string" || args === null || typeof args !== "object" || Array.isArray(args)) {
      throw new Error("'tool' must be a string and 'arguments' an object");
    }
    deadlineMs = Math.max(Number(call.deadline_ms ?? req.headers["x-nexus-deadline-ms"] ?? 5000) || 5000, 1);
  } catch (e) {
    return reply(res, 400, { error: `bad request: ${e.message}` });
  }
  if (!Object.hasOwn(TOOLS, tool)) return reply(res, 200, { error: `unknown tool '${tool}'` });
  try {
    reply(res, 200, { result: await TOOLS[tool](args, deadlineMs) });
  } catch (e) {
    if (e instanceof ToolError) return reply(res, 200, { error: e.message });
    // A bug in a tool: log it, answer 500 (the caller sees panel_status).
    console.error(e);
    reply(res, 500, { error: "internal error" });
  }
}

async function count(req, res) {
  try {
    reply(res, 200, wordCount(await readJson(req)));
  } catch (e) {
    reply(res, 400, { error: e instanceof ToolError ? e.message : `bad request: ${e.message}` });
  }
}

const server = http.createServer((req, res) => {
  const path = req.url.split("?")[0];
  if (isToolPath(path) && !fromSidecar(req)) {
    return reply(res, 401, { error: "only this panel's sidecar may call /manifest and /mcp/*" });
  }
  if (req.method === "GET" && path === "/manifest") return reply(res, 200, MANIFEST);
  if (req.method === "GET" && path === "/") {
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8", "Content-Length": Buffer.byteLength(PAGE) });
    return res.end(PAGE);
  }
  if (req.method === "POST" && path === "/count") return count(req, res);
  if (req.method === "POST" && path === "/mcp/execute") return execute(req, res);
  reply(res, 404, { error: "not found" });
});

const stop = () => server.close(() => process.exit(0));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
server.listen(PORT, "127.0.0.1", () => {
  console.error(`node_minimal panel on http://127.0.0.1:${PORT}`);
  if (SIDECAR_TOKEN.length === 0) {
    console.error("NEXUS_SIDECAR_TOKEN is not set: /manifest and /mcp/* answer anyone " +
      "(fine for a panel run by hand; the platform always sets it)");
  }
});
