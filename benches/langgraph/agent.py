"""LangGraph side of the Nexus LLM-manager benchmark (issue 11, "A peer, side by side").

Runs the standard LangGraph tool-calling agent (a `StateGraph` over `MessagesState`
with an `agent` node calling `ChatOpenAI` and a `tools` node that is a `ToolNode`,
joined by `tools_condition`) with the PostgreSQL checkpointer
(`langgraph-checkpoint-postgres`) against the scripted model server and the HTTP
tool the Rust harness starts, and prints one JSON object (also written to --out).

It owns a private database (`--db`, dropped and created at the start, dropped at
the end unless --keep-db) on the server named by --pg; it never touches any other
database there. It sends traffic only to the URLs it is given.

One turn is: user message "go" -> model step (answers a tool call `http_get`) ->
tool step (HTTP GET to the tool URL) -> model step (answers "done"). So a turn has
two model steps and one tool call, and a thread of S steps has S/2 turns.
"""

from __future__ import annotations

import os

# Tracing would send every run to a remote service; this bench talks to loopback only.
for _var in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
    os.environ[_var] = "false"

import argparse
import importlib.metadata
import json
import math
import sys
import time
import urllib.parse
from typing import Any

import httpx
import openai
import psycopg
from langchain_core.messages import AIMessage, convert_to_openai_messages
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

USER_INPUT = "go"
MODEL_NAME = "scripted"
PACKAGES = (
    "langgraph",
    "langgraph-checkpoint",
    "langgraph-checkpoint-postgres",
    "langgraph-prebuilt",
    "langchain-core",
    "langchain-openai",
    "openai",
    "psycopg",
)
# Each checkpoint table and the SQL for its payload before PostgreSQL's compression.
CHECKPOINT_TABLES = {
    "checkpoints": "octet_length(checkpoint::text) + octet_length(metadata::text)",
    "checkpoint_blobs": "coalesce(octet_length(blob), 0)",
    "checkpoint_writes": "octet_length(blob)",
}

# Environment proxies must not reroute loopback traffic, so every client ignores them.
_http = httpx.Client(trust_env=False, timeout=30.0)


class Marks:
    """Entry times of the nodes of the turn in progress, read by `Bench.lg_turn`."""

    def __init__(self) -> None:
        self.agent: list[float] = []
        self.tool: list[float] = []
        self.model_ms: list[float] = []
        self.tool_calls = 0

    def reset(self) -> None:
        self.agent.clear()
        self.tool.clear()
        self.model_ms.clear()


MARKS = Marks()


@tool
def http_get(url: str) -> str:
    """Fetch a URL with HTTP GET and return the response body."""
    MARKS.tool.append(time.perf_counter())
    MARKS.tool_calls += 1
    resp = _http.get(url)
    resp.raise_for_status()
    return resp.text


def build_graph(model_url: str, saver: PostgresSaver) -> Any:
    """The agent of LangGraph's docs: agent <-> tools with a conditional edge."""
    llm = ChatOpenAI(
        model=MODEL_NAME,
        base_url=model_url,
        api_key="bench",
        streaming=True,
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=30.0),
    ).bind_tools([http_get])

    def agent(state: MessagesState) -> dict[str, list[Any]]:
        MARKS.agent.append(time.perf_counter())
        t0 = time.perf_counter()
        reply = llm.invoke(state["messages"])
        MARKS.model_ms.append((time.perf_counter() - t0) * 1e3)
        return {"messages": [reply]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([http_get]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=saver)


def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(samples)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return round(s[k], 3)


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50": pct(samples, 50), "p99": pct(samples, 99), "mean": round(sum(samples) / len(samples), 3), "n": len(samples)}


def added(side: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    return {k: round(side[k] - base[k], 3) for k in ("p50", "p99", "mean")}


class Bench:
    """The measurements; one instance per run, single client, sequential."""

    def __init__(self, args: argparse.Namespace, graph: Any, conn: psycopg.Connection) -> None:
        self.args = args
        self.graph = graph
        self.conn = conn
        self.direct = openai.OpenAI(
            base_url=args.model_url,
            api_key="bench",
            max_retries=0,
            http_client=httpx.Client(trust_env=False, timeout=30.0),
        )
        self.tools = [convert_to_openai_tool(http_get)]
        parsed = urllib.parse.urlsplit(args.model_url.rstrip("/"))
        root = parsed.path.removesuffix("/v1")
        self.requests_url = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, root + "/_requests", "", ""))

    def model_requests(self) -> int:
        """Chat requests the scripted server has answered so far."""
        return int(_http.get(self.requests_url).json()["requests"])

    # --- direct baseline -------------------------------------------------

    def direct_call(self, messages: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """One streaming chat call with the openai SDK, read to the end."""
        t0 = time.perf_counter()
        stream = self.direct.chat.completions.create(model=MODEL_NAME, messages=messages, tools=self.tools, stream=True)
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if delta.content:
                content.append(delta.content)
            for tc in delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += tc.id or ""
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
        ms = (time.perf_counter() - t0) * 1e3
        return ms, {"content": "".join(content), "tool_calls": [calls[i] for i in sorted(calls)]}

    def direct_turn(self) -> dict[str, Any]:
        """The same turn without LangGraph: model call, HTTP GET, model call."""
        t0 = time.perf_counter()
        msgs: list[dict[str, Any]] = [{"role": "user", "content": USER_INPUT}]
        ms1, reply = self.direct_call(msgs)
        if len(reply["tool_calls"]) != 1:
            raise RuntimeError(f"direct step 1 expected one tool call, got {reply}")
        call = reply["tool_calls"][0]
        t1 = time.perf_counter()
        body = _http.get(json.loads(call["arguments"])["url"])
        body.raise_for_status()
        tool_ms = (time.perf_counter() - t1) * 1e3
        msgs.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}],
            }
        )
        msgs.append({"role": "tool", "tool_call_id": call["id"], "content": body.text})
        ms2, reply = self.direct_call(msgs)
        if reply["tool_calls"]:
            raise RuntimeError(f"direct step 2 expected text, got {reply}")
        return {"steps": [ms1, ms2], "tool": tool_ms, "turn": (time.perf_counter() - t0) * 1e3}

    # --- LangGraph -------------------------------------------------------

    def lg_turn(self, thread_id: str, durability: str) -> dict[str, Any]:
        """One turn through the graph; step boundaries are node entries.

        model step 1 = invoke() called -> tool starts (input checkpoint, agent node,
        its checkpoint, scheduling); tool step = tool starts -> agent re-entered;
        model step 2 = agent re-entered -> invoke() returned (incl. final checkpoint).
        """
        MARKS.reset()
        cfg = {"configurable": {"thread_id": thread_id}}
        t0 = time.perf_counter()
        out = self.graph.invoke({"messages": [("user", USER_INPUT)]}, cfg, durability=durability)
        t3 = time.perf_counter()
        if len(MARKS.agent) != 2 or len(MARKS.tool) != 1 or out["messages"][-1].content != "done":
            raise RuntimeError(f"unexpected turn shape: agent={len(MARKS.agent)} tool={len(MARKS.tool)} last={out['messages'][-1]!r}")
        t1, t2 = MARKS.tool[0], MARKS.agent[1]
        return {
            "steps": [(t1 - t0) * 1e3, (t3 - t2) * 1e3],
            "tool": (t2 - t1) * 1e3,
            "turn": (t3 - t0) * 1e3,
            "model_ms": list(MARKS.model_ms),
        }

    def latency(self) -> dict[str, Any]:
        """Direct and LangGraph turns interleaved, each turn on a fresh thread."""
        modes = self.args.durability_modes
        for i in range(self.args.warmup):
            self.direct_turn()
            for m in modes:
                self.lg_turn(f"warm-{m}-{i}", m)
        direct = {"steps": [], "tool": [], "turn": []}
        lg = {m: {"steps": [], "tool": [], "turn": [], "model_ms": []} for m in modes}
        requests = {m: 0 for m in modes}
        for i in range(self.args.turns):
            d = self.direct_turn()
            direct["steps"] += d["steps"]
            direct["tool"].append(d["tool"])
            direct["turn"].append(d["turn"])
            for m in modes:
                before = self.model_requests()
                r = self.lg_turn(f"lat-{m}-{i}", m)
                requests[m] += self.model_requests() - before
                lg[m]["steps"] += r["steps"]
                lg[m]["tool"].append(r["tool"])
                lg[m]["turn"].append(r["turn"])
                lg[m]["model_ms"] += r["model_ms"]
        base_step, base_turn = summary(direct["steps"]), summary(direct["turn"])
        out: dict[str, Any] = {
            "direct_step_ms": base_step,
            "direct_tool_ms": summary(direct["tool"]),
            "direct_turn_ms": base_turn,
            "direct_turns_per_second": round(len(direct["turn"]) / (sum(direct["turn"]) / 1e3), 2),
            "by_durability": {},
        }
        for m in modes:
            step, turn = summary(lg[m]["steps"]), summary(lg[m]["turn"])
            out["by_durability"][m] = {
                "step_ms": step,
                "added_step_ms": added(step, base_step),
                "tool_step_ms": summary(lg[m]["tool"]),
                "turn_ms": turn,
                "added_turn_ms": added(turn, base_turn),
                "turns_per_second": round(len(lg[m]["turn"]) / (sum(lg[m]["turn"]) / 1e3), 2),
                "chat_model_ms": summary(lg[m]["model_ms"]),
                "model_requests_per_turn": round(requests[m] / self.args.turns, 3),
            }
        primary = out["by_durability"][modes[0]]
        for key in ("step_ms", "added_step_ms", "turns_per_second", "turn_ms", "added_turn_ms"):
            out[key] = primary[key]
        return out

    # --- storage ---------------------------------------------------------

    def stored_bytes(self, thread_id: str) -> dict[str, Any]:
        """Rows and bytes (pg_column_size of each row, as stored) of one thread."""
        tables: dict[str, dict[str, int]] = {}
        with self.conn.cursor() as cur:
            for t, payload in CHECKPOINT_TABLES.items():
                cur.execute(
                    f"SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0), coalesce(sum({payload}), 0) FROM {t} t WHERE thread_id = %s",
                    (thread_id,),
                )
                rows, size, raw = cur.fetchone()
                tables[t] = {"rows": int(rows), "bytes": int(size), "payload_bytes": int(raw)}
        return {
            "bytes_total": sum(v["bytes"] for v in tables.values()),
            "payload_bytes_total": sum(v["payload_bytes"] for v in tables.values()),
            "tables": tables,
        }

    def grow(self, thread_id: str, targets: list[int], measure: bool) -> list[dict[str, Any]]:
        """Grow one thread turn by turn; at each target step count record its storage."""
        points: list[dict[str, Any]] = []
        steps, turns, grown = 0, 0, 0.0
        recent: list[dict[str, Any]] = []
        for target in sorted(targets):
            t0 = time.perf_counter()
            while steps < target:
                r = self.lg_turn(thread_id, self.args.durability_modes[0])
                steps, turns = steps + 2, turns + 1
                recent = (recent + [r])[-10:]
            grown += time.perf_counter() - t0
            if not measure:
                continue
            point = {"steps": steps, "turns": turns, **self.stored_bytes(thread_id)}
            point["bytes_per_step"] = round(point["bytes_total"] / steps, 1)
            point["payload_bytes_per_step"] = round(point["payload_bytes_total"] / steps, 1)
            point["seconds_to_grow"] = round(grown, 2)
            point["last10_turns"] = self.long_thread_latency(thread_id, recent)
            points.append(point)
        return points

    def long_thread_latency(self, thread_id: str, recent: list[dict[str, Any]]) -> dict[str, Any]:
        """Step time of the last turns against direct calls sending the same history.

        Every model step sends the whole transcript, so at 1,000 steps the direct
        baseline is a call with that transcript, not the 1-message one.
        """
        history = convert_to_openai_messages(self.graph.get_state({"configurable": {"thread_id": thread_id}}).values["messages"])
        history.append({"role": "user", "content": USER_INPUT})
        direct = [self.direct_call(history)[0] for _ in range(2 * len(recent))]
        step = summary([ms for r in recent for ms in r["steps"]])
        base = summary(direct)
        return {
            "turn_ms": summary([r["turn"] for r in recent]),
            "step_ms": step,
            "chat_model_ms": summary([ms for r in recent for ms in r["model_ms"]]),
            "direct_step_ms_same_history": base,
            "added_step_ms": added(step, base),
        }

    def replay(self) -> dict[str, Any]:
        """LangGraph's time travel from the checkpoint just before model step `--replay-from`."""
        total, step = self.args.replay_thread_steps, self.args.replay_from
        tid = "replay"
        self.grow(tid, [total], measure=False)
        cfg = {"configurable": {"thread_id": tid}}
        target = None
        for snap in self.graph.get_state_history(cfg):
            done = sum(isinstance(m, AIMessage) for m in snap.values.get("messages", []))
            if done == step - 1 and snap.next == ("agent",):
                target = snap
                break
        if target is None:
            raise RuntimeError(f"no checkpoint before model step {step}")
        calls0, tools0 = self.model_requests(), MARKS.tool_calls
        self.graph.invoke(None, target.config, durability=self.args.durability_modes[0])
        calls1, tools1 = self.model_requests(), MARKS.tool_calls
        remaining_turns = total // 2 - (step + 1) // 2
        for _ in range(remaining_turns):
            self.lg_turn(tid, self.args.durability_modes[0])
        calls2, tools2 = self.model_requests(), MARKS.tool_calls
        return {
            "thread_steps": total,
            "from_step": step,
            "checkpoint_id": target.config["configurable"]["checkpoint_id"],
            "checkpoint_metadata_step": target.metadata.get("step") if target.metadata else None,
            "model_calls": calls1 - calls0,
            "tool_calls": tools1 - tools0,
            "to_end_model_calls": calls2 - calls0,
            "to_end_tool_calls": tools2 - tools0,
            "to_end_turns_refed": remaining_turns,
        }


def fresh_database(admin_dsn: str, db: str) -> str:
    """Drop and create the bench's own database; return its DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{db}"')
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname=db)


def drop_database(admin_dsn: str, db: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-url", required=True, help="scripted server base URL, ending in /v1")
    p.add_argument("--tool-url", required=True, help="URL the scripted agent asks the tool to GET (checked before the run)")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test", help="DSN of a database on the server, used only to drop/create --db")
    p.add_argument("--db", default="nexus_bench_langgraph", help="the bench's own database (dropped and recreated)")
    p.add_argument("--turns", type=int, default=200, help="measured turns per side (each on a fresh thread)")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured turns per side first")
    p.add_argument("--steps-thread", default="100,1000", help="thread lengths (model steps) at which to measure storage")
    p.add_argument("--replay-thread-steps", type=int, default=100)
    p.add_argument("--replay-from", type=int, default=50, help="model step (1-based) to replay from")
    p.add_argument(
        "--durability", default="sync,async", help="LangGraph durability modes to time; the first is the headline and is used for storage and replay"
    )
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--keep-db", action="store_true", help="leave the database for inspection")
    args = p.parse_args(argv)
    args.steps_thread = [int(s) for s in args.steps_thread.split(",") if s.strip()]
    args.durability_modes = [m.strip() for m in args.durability.split(",") if m.strip()]
    if any(m not in ("sync", "async", "exit") for m in args.durability_modes):
        p.error("--durability takes sync, async, exit")
    if args.replay_from < 1 or args.replay_from > args.replay_thread_steps:
        p.error("--replay-from must be within the replay thread")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _http.get(args.tool_url).raise_for_status()
    dsn = fresh_database(args.pg, args.db)
    started = time.perf_counter()
    try:
        with PostgresSaver.from_conn_string(dsn) as saver, psycopg.connect(dsn, autocommit=True) as conn:
            saver.setup()
            bench = Bench(args, build_graph(args.model_url, saver), conn)
            result: dict[str, Any] = {
                "side": "langgraph",
                "versions": versions(),
                "config": {
                    "turns": args.turns,
                    "warmup": args.warmup,
                    "durability": args.durability_modes,
                    "client": "one client, sequential turns, each latency turn on a fresh thread",
                    "steps_per_turn": 2,
                    "tool_calls_per_turn": 1,
                },
            }
            result.update(bench.latency())
            points = bench.grow("grow", args.steps_thread, measure=True)
            result["threads"] = points
            result["bytes_per_step"] = {str(p["steps"]): p["bytes_per_step"] for p in points}
            result["bytes_total"] = {str(p["steps"]): p["bytes_total"] for p in points}
            result["replay"] = bench.replay()
            result["replay_model_calls"] = result["replay"]["model_calls"]
            result["replay_to_end_model_calls"] = result["replay"]["to_end_model_calls"]
            result["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        if not args.keep_db:
            drop_database(args.pg, args.db)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
