"""python_minimal: the template Nexus panel, using only the Python standard library.

Copy this file and replace the tools. It implements the panel contract
(../README.md):

* GET  /             -> the panel's page (what the Studio shows through the gateway)
* POST /count        -> the page's own word count (no tool call)
* GET  /stats        -> how many slow counts finished and how many stopped
* GET  /manifest     -> the tools this panel offers (name, desc, input_schema),
                        and a read-only resource, `stats`
* GET  /mcp/resources/stats -> that resource: the same as /stats
* POST /mcp/execute  -> run one tool: {"result": ...} or {"error": "..."}
* publishing goes through the sidecar: POST $NEXUS_PROXY_URL (default
  http://127.0.0.1:3500/proxy); the panel itself holds no credentials.
* a long tool reports progress to the sidecar (POST .../progress) and stops
  when its call is cancelled: the sidecar closes the connection, and
  /progress answers 404 for a call that no longer runs.

/manifest and /mcp/* answer only the panel's own sidecar: the platform puts
a secret in $NEXUS_SIDECAR_TOKEN and the sidecar sends it in the header
X-Nexus-Sidecar-Token; anything else gets 401. Without the variable (the
panel run by hand) they answer anyone, and the server says so at start.

Run it with `python3 server.py` (listens on 127.0.0.1:$PORT, default 8080).
"""

import hmac
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "8080"))
PROXY_URL = os.environ.get("NEXUS_PROXY_URL", "http://127.0.0.1:3500/proxy")
PROGRESS_URL = PROXY_URL.rsplit("/", 1)[0] + "/progress"
# The secret the sidecar proves itself with; unset when run by hand.
SIDECAR_TOKEN = os.environ.get("NEXUS_SIDECAR_TOKEN", "").encode()
SIDECAR_TOKEN_HEADER = "X-Nexus-Sidecar-Token"
MAX_REQUEST = 2 * 1024 * 1024  # the platform sends at most 1 MiB of arguments

MANIFEST = {
    "name": "python_minimal",
    "resources": [
        {
            "uri": "stats",
            "name": "slow_count runs",
            "mimeType": "application/json",
            "description": "How many slow counts finished, and how many stopped because their call ended.",
        }
    ],
    "tools": [
        {
            "name": "word_count",
            "desc": "Count the words, characters and lines of a text.",
            "input_schema": {
                "type": "object",
                "properties": {"text": {"type": "string", "maxLength": 100000}},
                "required": ["text"],
            },
        },
        {
            "name": "slow_count",
            "desc": "Count the words of a text slowly, in steps, reporting progress after each step.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "maxLength": 100000},
                    "steps": {"type": "integer", "minimum": 1, "maximum": 100},
                    "step_ms": {"type": "integer", "minimum": 10, "maximum": 5000},
                },
                "required": ["text"],
            },
        },
        {
            "name": "publish_note",
            "desc": "Publish a short note on this panel's 'notes' channel.",
            "input_schema": {
                "type": "object",
                "properties": {"text": {"type": "string", "maxLength": 1000}},
                "required": ["text"],
            },
        },
    ],
}

# Talk to the sidecar directly, even if HTTP_PROXY is set in the environment.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ToolError(Exception):
    """A failure to report to the caller as {"error": message}."""


class CallEnded(Exception):
    """The call was cancelled or ran out of time: nobody waits for an answer."""


class Call:
    """One tool call: its id and deadline, and the connection it came on."""

    def __init__(self, call_id, deadline_s, connection):
        self.call_id, self.deadline_s, self.connection = call_id, deadline_s, connection

    def ended(self):
        """Whether the sidecar hung up: it does when the caller cancels."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def progress(self, done, total=None, message=None):
        """Reports progress to the caller; raises CallEnded once the call no longer runs."""
        if self.ended():
            raise CallEnded()
        body = {"call_id": self.call_id, "progress": done, "total": total, "message": message}
        request = urllib.request.Request(
            PROGRESS_URL, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with _no_proxy.open(request, timeout=2.0):
                pass
        except urllib.error.HTTPError as e:
            if e.code == 404:  # the sidecar no longer runs this call
                raise CallEnded() from None
        except OSError:
            pass  # a report that does not arrive is not worth failing the call for


STATS = {"slow_count": {"finished": 0, "stopped": 0}}
STATS_LOCK = threading.Lock()


def text_argument(arguments):
    # The platform checks arguments against input_schema first; check again so
    # that a direct or malformed call gets an error, not a crash.
    text = arguments.get("text")
    if not isinstance(text, str):
        raise ToolError("argument 'text' must be a string")
    return text


def word_count(arguments, call):
    text = text_argument(arguments)
    return {"words": len(text.split()), "characters": len(text), "lines": len(text.splitlines())}


def slow_count(arguments, call):
    steps, step_s = int(arguments.get("steps", 5)), int(arguments.get("step_ms", 1000)) / 1000
    try:
        for step in range(1, steps + 1):
            time.sleep(step_s)
            call.progress(step, steps, f"step {step} of {steps}")
    except CallEnded:
        with STATS_LOCK:
            STATS["slow_count"]["stopped"] += 1
        raise
    with STATS_LOCK:
        STATS["slow_count"]["finished"] += 1
    return word_count(arguments, call)


def from_sidecar(headers):
    """Whether a request to /manifest or /mcp/* comes from this panel's sidecar."""
    if not SIDECAR_TOKEN:
        return True
    presented = headers.get(SIDECAR_TOKEN_HEADER, "").encode()
    # Constant time: a guesser learns nothing from how long a refusal takes.
    return hmac.compare_digest(presented, SIDECAR_TOKEN)


def is_tool_path(path):
    path = path.split("?")[0]
    return path == "/manifest" or path == "/mcp" or path.startswith("/mcp/")


def publish_note(arguments, call):
    body = {"channel": "notes", "type": "python_minimal.note", "data": {"text": text_argument(arguments)}}
    request = urllib.request.Request(
        PROXY_URL, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with _no_proxy.open(request, timeout=min(2.0, call.deadline_s)) as response:
            return {"published": True, "id": json.loads(response.read())["id"]}
    except urllib.error.HTTPError as e:  # the proxy answered, and refused
        raise ToolError(f"could not publish: {e.code} {e.read(512).decode(errors='replace')}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreachable, timed out, odd answer
        raise ToolError(f"could not publish: {getattr(e, 'reason', e)}") from None


TOOLS = {"word_count": word_count, "slow_count": slow_count, "publish_note": publish_note}

# The panel's page, opened through the traffic gateway at /p/<panel-id>/.
# Links stay relative so they keep that prefix. It asks the server only when
# the user clicks: a page that polled would keep an App from scaling to zero.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>python_minimal</title>
<style>body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:40rem}
textarea{width:100%;height:6rem}</style></head>
<body><h1 id="title">python_minimal</h1>
<p>A Nexus panel in plain Python. Its tools: <code>word_count</code>, <code>slow_count</code>,
<code>publish_note</code>.</p>
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
""".encode()


class Handler(BaseHTTPRequestHandler):
    def refused(self):
        """Answers 401 unless the request comes from the sidecar."""
        if not is_tool_path(self.path) or from_sidecar(self.headers):
            return False
        self.reply(401, {"error": "only this panel's sidecar may call /manifest and /mcp/*"})
        return True

    def do_GET(self):
        if self.refused():
            return
        if self.path == "/manifest":
            self.reply(200, MANIFEST)
        elif self.path in ("/stats", "/mcp/resources/stats"):
            with STATS_LOCK:
                self.reply(200, STATS)
        elif self.path.split("?")[0] == "/":
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        if self.refused():
            return
        if self.path == "/count":
            return self.count()
        if self.path != "/mcp/execute":
            return self.reply(404, {"error": "not found"})
        try:
            call = self.read_json()
            tool, arguments = call.get("tool"), call.get("arguments", {})
            if not isinstance(tool, str) or not isinstance(arguments, dict):
                raise ValueError("'tool' must be a string and 'arguments' an object")
            deadline_ms = call.get("deadline_ms", self.headers.get("X-Nexus-Deadline-Ms", 5000))
            call = Call(str(call.get("call_id", "")), max(float(deadline_ms), 1.0) / 1000, self.connection)
        except (ValueError, TypeError) as e:
            return self.reply(400, {"error": f"bad request: {e}"})
        if tool not in TOOLS:
            return self.reply(200, {"error": f"unknown tool {tool!r}"})
        try:
            self.reply(200, {"result": TOOLS[tool](arguments, call)})
        except CallEnded:
            self.close_connection = True  # nobody to answer
        except ToolError as e:
            self.reply(200, {"error": str(e)})
        except Exception:  # a bug in a tool: log it, answer 500 (the caller sees panel_status)
            traceback.print_exc()
            self.reply(500, {"error": "internal error"})

    def read_json(self):
        length = int(self.headers.get("Content-Length", "0"))
        if not 0 < length <= MAX_REQUEST:
            raise ValueError("missing, empty or too large body")
        body = json.loads(self.rfile.read(length))
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        return body

    def count(self):
        """The page's button: the same count as the tool, for the page itself."""
        try:
            self.reply(200, word_count(self.read_json(), 1.0))
        except (ValueError, TypeError) as e:
            self.reply(400, {"error": f"bad request: {e}"})
        except ToolError as e:
            self.reply(400, {"error": str(e)})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code="-", size="-"):  # quiet: log server errors only
        if isinstance(code, int) and code >= 500:
            super().log_request(code, size)


class Server(ThreadingHTTPServer):
    # The default listen backlog (5) drops connections when the sidecar
    # sends several calls at once; the kernel retries them a second later.
    request_queue_size = 128


def main():
    server = Server(("127.0.0.1", PORT), Handler)
    stop = lambda *_: threading.Thread(target=server.shutdown).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"python_minimal panel on http://127.0.0.1:{PORT}", file=sys.stderr)
    if not SIDECAR_TOKEN:
        print("NEXUS_SIDECAR_TOKEN is not set: /manifest and /mcp/* answer anyone "
              "(fine for a panel run by hand; the platform always sets it)", file=sys.stderr)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
