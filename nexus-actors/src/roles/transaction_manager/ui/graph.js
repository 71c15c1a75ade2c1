// The live mailbox graph, for admins: the node's actors laid out in layers
// from left to right (who sends from outside the kernel, bridges, roles,
// their per-panel and per-context actors, sessions), each message flow an
// arrow with its live rate, each actor with its rate, mailbox depth and
// restarts. Many actors of one kind in a layer (a thousand sessions) are
// drawn as one group node, their numbers summed. It polls /api/graph every
// second; a rate is the change between two polls.
//
// It owns the #graph section and nothing else.

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;
// Beyond this many actors in a layer, each kind there is one group node.
const MAX_PER_LAYER = 10;
const LAYERS = [
  { name: "senders", kinds: [] },
  { name: "bridges", kinds: ["redis_bridge", "kafka_bridge"] },
  { name: "roles", kinds: [] }, // every kind not named elsewhere
  { name: "workers", kinds: ["pod_lifecycle", "llm_context"] },
  { name: "sessions", kinds: ["session"] },
];
const [COL, GAP, BOX_W, BOX_H, SENDER_H, TOP, LEFT] = [230, 16, 170, 44, 26, 34, 16];

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const rate = (r) => (r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2).replace(/\.?0+$/, "") || "0");
const short = (id) => (id.length > 24 ? id.slice(0, 14) + "…" + id.slice(-6) : id);
const heightOf = (n) => (n.kind === "sender" ? SENDER_H : BOX_H);

function layerOf(kind) {
  const at = LAYERS.findIndex((l) => l.kinds.includes(kind));
  return at < 0 ? 2 : at;
}

// The nodes to draw: actors (or groups of them) and outside senders, with
// their rates since the previous snapshot; and the edges between nodes.
export function layout(graph, previous, seconds) {
  const byLayer = LAYERS.map(() => []);
  for (const a of graph.actors) byLayer[layerOf(a.kind)].push(a);
  const nodeOf = new Map(); // actor id or sender name -> node
  const nodes = [];
  const rateOf = (before, now) => (before === undefined || seconds <= 0 ? 0 : Math.max(0, now - before) / seconds);
  byLayer.forEach((actors, layer) => {
    const grouped = actors.length > MAX_PER_LAYER;
    for (const a of actors) {
      const id = grouped ? `group:${a.kind}` : a.id;
      let node = nodes.find((n) => n.id === id);
      if (!node) {
        node = { id, kind: a.kind, layer, members: 0, label: grouped ? a.kind : short(a.id), handled: 0, depth: 0, restarts: 0, rate: 0 };
        nodes.push(node);
      }
      node.members += 1;
      node.handled += a.handled;
      node.depth += a.mailbox_depth;
      node.restarts += a.restarts;
      node.rate += rateOf(previous.handled.get(a.id), a.handled);
      nodeOf.set(a.id, node);
    }
  });
  for (const e of graph.edges) {
    if (nodeOf.has(e.from)) continue;
    const node = { id: e.from, kind: "sender", layer: 0, members: 1, label: short(e.from), handled: 0, depth: 0, restarts: 0, rate: 0 };
    nodes.push(node);
    nodeOf.set(e.from, node);
  }
  const edges = new Map(); // "from→to" of nodes -> edge
  for (const e of graph.edges) {
    const [from, to] = [nodeOf.get(e.from), nodeOf.get(e.to)];
    if (!from || !to || from === to) continue;
    const key = `${from.id}→${to.id}`;
    const edge = edges.get(key) || { key, from, to, count: 0, rate: 0 };
    edge.count += e.count;
    edge.rate += rateOf(previous.edges.get(`${e.from}→${e.to}`), e.count);
    edges.set(key, edge);
  }
  return { nodes, edges: [...edges.values()] };
}

export function graphView({ api, status }) {
  const $ = (selector) => document.querySelector(selector);
  let timer = null;
  let previous = { at: 0, handled: new Map(), edges: new Map() };

  async function draw() {
    let graph;
    try {
      graph = await api("GET", "/api/graph");
    } catch (error) {
      return status(error.message);
    }
    const now = performance.now();
    const { nodes, edges } = layout(graph, previous, previous.at ? (now - previous.at) / 1000 : 0);
    previous = {
      at: now,
      handled: new Map(graph.actors.map((a) => [a.id, a.handled])),
      edges: new Map(graph.edges.map((e) => [`${e.from}→${e.to}`, e.count])),
    };
    render(nodes, edges);
  }

  // Stacks each layer's nodes, ordered to keep arrows short and few of
  // them crossing: each node near the mean height of its neighbours in
  // the layers before it (senders: of what they send to).
  function place(nodes, edges, column) {
    const stack = (layer) => {
      let y = TOP;
      for (const n of layer) {
        n.y = y;
        y += heightOf(n) + GAP;
      }
      return y;
    };
    const layers = new Map();
    for (const n of nodes) {
      n.x = LEFT + column.get(n.layer) * COL;
      if (!layers.has(n.layer)) layers.set(n.layer, []);
      layers.get(n.layer).push(n);
    }
    const order = [...layers.keys()].sort((a, b) => a - b);
    for (const layer of order) stack(layers.get(layer).sort((a, b) => a.label.localeCompare(b.label)));
    const mean = (ys, fallback) => (ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : fallback);
    const centre = (n) => n.y + heightOf(n) / 2;
    const resort = (layer, neighbours) => {
      const key = new Map(layer.map((n) => [n, mean(neighbours(n).map(centre), centre(n))]));
      stack(layer.sort((a, b) => key.get(a) - key.get(b)));
    };
    if (layers.has(0)) resort(layers.get(0), (n) => edges.filter((e) => e.from === n).map((e) => e.to));
    for (const layer of order.filter((l) => l > 0)) {
      resort(layers.get(layer), (n) => edges.flatMap((e) =>
        e.to === n && e.from.layer < n.layer ? [e.from] : e.from === n && e.to.layer < n.layer ? [e.to] : []));
    }
    return Math.max(TOP, ...[...layers.values()].map((l) => l.at(-1).y + heightOf(l.at(-1))));
  }

  function render(nodes, edges) {
    // Columns only for layers with something in them.
    const used = [...new Set(nodes.map((n) => n.layer))].sort((a, b) => a - b);
    const column = new Map(used.map((layer, i) => [layer, i]));
    const bottom = place(nodes, edges, column);
    const width = LEFT * 2 + Math.max(used.length, 1) * COL - (COL - BOX_W);
    const height = bottom + 40;
    const root = $("#graph-svg");
    root.setAttribute("viewBox", `0 0 ${width} ${height}`);
    root.style.height = `${height}px`;
    root.style.maxWidth = `${width}px`;

    const children = [defs()];
    for (const layer of used) {
      const x = LEFT + column.get(layer) * COL;
      children.push(svg("text", { x, y: 20, class: "layer" }, LAYERS[layer].name));
    }
    for (const e of edges) children.push(...edge(e));
    for (const n of nodes) children.push(node(n));
    root.replaceChildren(...children);
    root.dataset.nodes = String(nodes.length);
  }

  function defs() {
    const d = svg("defs");
    for (const [id, cls] of [["arrow", "arrow"], ["arrow-idle", "arrow idle"]]) {
      const marker = svg("marker", { id, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
      marker.append(svg("path", { d: "M0,0 L10,5 L0,10 z", class: cls }));
      d.append(marker);
    }
    return d;
  }

  // A flow: forward (left to right) from the sender's right side to the
  // receiver's left; backward, or within a layer, bowed below.
  function edge(e) {
    const { from, to } = e;
    const active = e.rate > 0;
    let d;
    let mid;
    if (to.x > from.x) {
      const [x1, y1, x2, y2] = [from.x + BOX_W, from.y + heightOf(from) / 2, to.x, to.y + heightOf(to) / 2];
      const bend = (x2 - x1) / 2;
      d = `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`;
      mid = [(x1 + x2) / 2, (y1 + y2) / 2];
    } else {
      const [x1, y1, x2, y2] = [from.x + BOX_W / 2, from.y + heightOf(from), to.x + BOX_W / 2, to.y + heightOf(to)];
      const drop = 26 + Math.abs(x1 - x2) / 8;
      d = `M${x1},${y1} C${x1},${Math.max(y1, y2) + drop} ${x2},${Math.max(y1, y2) + drop} ${x2},${y2}`;
      mid = [(x1 + x2) / 2, Math.max(y1, y2) + drop * 0.75];
    }
    const path = svg("path", {
      d,
      class: "edge" + (active ? " active" : "") + (to.x > from.x ? "" : " back"),
      "stroke-width": (1 + Math.log10(1 + e.rate) * 1.5).toFixed(2),
      "marker-end": `url(#${active ? "arrow" : "arrow-idle"})`,
      "data-from": from.id,
      "data-to": to.id,
      "data-rate": e.rate.toFixed(3),
    });
    path.append(svg("title", {}, `${from.id} → ${to.id}: ${e.count} messages, ${rate(e.rate)}/s`));
    if (!active) return [path];
    return [path, svg("text", { x: mid[0], y: mid[1] - 4, class: "rate", "text-anchor": "middle" }, `${rate(e.rate)}/s`)];
  }

  function node(n) {
    const g = svg("g", {
      class: "node" + (n.restarts ? " restarted" : "") + (n.depth ? " backlog" : "") + (n.kind === "sender" ? " sender" : ""),
      transform: `translate(${n.x},${n.y})`,
      "data-id": n.id,
      "data-kind": n.kind,
      "data-layer": LAYERS[n.layer].name,
      "data-rate": n.rate.toFixed(3),
      "data-depth": n.depth,
      "data-restarts": n.restarts,
    });
    g.append(svg("rect", { width: BOX_W, height: heightOf(n), rx: 6 }));
    const name = n.members > 1 ? `${n.label} ×${n.members}` : n.label;
    g.append(svg("text", { x: 8, y: 17, class: "name" }, name));
    if (n.kind === "sender") {
      g.append(svg("title", {}, `${n.id}: sends from outside the kernel (a link made under this name)`));
      return g;
    }
    const facts = `${rate(n.rate)}/s · depth ${n.depth}` + (n.restarts ? ` · ↻ ${n.restarts}` : "");
    g.append(svg("text", { x: 8, y: 34, class: "facts" }, facts));
    g.append(svg("title", {}, `${n.kind} ${n.id}: handled ${n.handled}, mailbox ${n.depth}, restarts ${n.restarts}`));
    return g;
  }

  return {
    open() {
      clearInterval(timer);
      previous = { at: 0, handled: new Map(), edges: new Map() };
      draw();
      timer = setInterval(draw, POLL_MS);
    },
    close() {
      clearInterval(timer);
      timer = null;
    },
  };
}
