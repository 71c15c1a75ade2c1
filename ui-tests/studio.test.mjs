// Two browsers edit one document and see each other live; the mailbox
// graph lays the actors out in layers, with arrows and live rates, for the
// admin and is not offered to anyone else; nobody can
// frame the Studio; logging out revokes the token. Run by
// nexus-bin/tests/studio_ui.rs against a real `nexus dev` (NEXUS_URL,
// NEXUS_PASSWORD), in Debian's Chromium.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const base = process.env.NEXUS_URL;
const password = process.env.NEXUS_PASSWORD;

const launchArgs = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

async function loggedIn(browser, user = "admin", secret = password) {
  const page = await (await browser.newContext()).newPage();
  await page.goto(base);
  await page.fill("#login-username", user);
  await page.fill("#login-password", secret);
  await page.click("#login-submit");
  await page.waitForSelector("#panels:not([hidden])");
  return page;
}

const textIs = (page, value) =>
  page.waitForFunction((v) => document.querySelector("#doc-text").value === v, value, { timeout: 15000 });

test("two browsers edit one document live, see each other, and the graph renders", async () => {
  assert.ok(base && password, "NEXUS_URL and NEXUS_PASSWORD must be set");
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: launchArgs });
  try {
    const a = await loggedIn(browser);
    const b = await loggedIn(browser);

    // Panels: create one in A, see it listed in A and, live, in B.
    await a.fill("#panel-name", "My panel");
    await a.click("#panel-create");
    await a.waitForSelector("#panel-list li:has-text('My panel')");
    await b.waitForSelector("#panel-list li:has-text('My panel')", { timeout: 15000 });

    // A creates a document; B opens the same one.
    await a.click("#open-editor");
    await a.click("#doc-new");
    await a.waitForSelector("#editor:not([hidden])");
    const id = (await a.textContent("#doc-id")).trim();
    assert.match(id, /^[0-9a-f-]{36}$/);
    await b.click("#open-editor");
    await b.click(`[data-open-doc="${id}"]`);
    await b.waitForSelector("#editor:not([hidden])");

    await a.click("#doc-text");
    await a.keyboard.type("hello");
    await textIs(b, "hello");

    await b.click("#doc-text");
    await b.keyboard.press("End");
    await b.keyboard.type(" world");
    await textIs(a, "hello world");

    // Both are present, and A sees B's cursor.
    await a.waitForFunction(() => document.querySelectorAll("#presence li").length === 2, null, { timeout: 15000 });
    await a.waitForFunction(() => [...document.querySelectorAll("#presence li")].some((li) => li.textContent.includes(" at ")), null, { timeout: 15000 });

    // The mailbox graph: actors in layers, bridges left of the sessions
    // they deliver to, every flow an arrow.
    await a.click("#nav-graph");
    await a.waitForFunction(() => document.querySelectorAll("#graph-svg g.node").length >= 3, null, { timeout: 15000 });
    const placed = await a.$$eval("#graph-svg g.node", (gs) =>
      gs.map((g) => ({ id: g.dataset.id, layer: g.dataset.layer, x: g.transform.baseVal[0].matrix.e })));
    const ids = placed.map((p) => p.id).join(" ");
    assert.match(ids, /redis-bridge/);
    assert.match(ids, /kafka-bridge/);
    assert.match(ids, /session\//);
    const xs = (layer) => placed.filter((p) => p.layer === layer).map((p) => p.x);
    assert.ok(xs("bridges").length >= 2 && xs("sessions").length >= 2, JSON.stringify(placed));
    assert.ok(Math.max(...xs("bridges")) < Math.min(...xs("sessions")), `bridges left of sessions: ${JSON.stringify(placed)}`);
    const arrows = await a.$$eval("#graph-svg path.edge", (ps) => ps.map((p) => p.getAttribute("marker-end")));
    assert.ok(arrows.length > 0 && arrows.every((m) => /^url\(#arrow/.test(m)), `every flow has a direction: ${arrows}`);
    // Live rates: while B types, the bridge's flow into a session shows one.
    let typing = true;
    const typed = (async () => {
      for (let i = 0; typing && i < 60; i++) {
        await b.keyboard.type("!");
        await b.waitForTimeout(150);
      }
    })();
    try {
      await a.waitForFunction(() => [...document.querySelectorAll("#graph-svg path.edge")].some((p) =>
        p.dataset.to.startsWith("session/") && Number(p.dataset.rate) > 0), null, { timeout: 15000 });
      await a.waitForFunction(() => [...document.querySelectorAll("#graph-svg text.rate")].some((t) => /\/s$/.test(t.textContent)),
        null, { timeout: 5000 });
      if (process.env.NEXUS_SCREENSHOT) await a.screenshot({ path: process.env.NEXUS_SCREENSHOT, fullPage: true });
    } finally {
      typing = false;
      await typed;
    }

    // A user who is not an admin is not offered the graph, and the node
    // refuses it to them.
    const adminToken = await a.evaluate(() => sessionStorage.getItem("nexus-token"));
    const created = await a.request.post(`${base}/api/users`, {
      headers: { authorization: `Bearer ${adminToken}` },
      data: { username: "viewer", password: "viewer-password" },
    });
    assert.equal(created.status(), 201);
    const viewer = await loggedIn(browser, "viewer", "viewer-password");
    assert.equal(await viewer.isHidden("#nav-graph"), true, "the graph is for admins only");
    assert.equal(await a.isVisible("#nav-graph"), true);
    assert.match(await viewer.textContent("#whoami"), /viewer/);
    const graph = await viewer.evaluate(async () => {
      const r = await fetch("/api/graph", { headers: { authorization: "Bearer " + sessionStorage.getItem("nexus-token") } });
      return r.status;
    });
    assert.equal(graph, 403);

    // Nobody can frame the Studio: the page says so, and Chromium obeys.
    const studio = await a.request.get(base);
    assert.match(studio.headers()["content-security-policy"], /frame-ancestors 'none'/);
    assert.equal(studio.headers()["x-frame-options"], "DENY");
    const framer = await (await browser.newContext()).newPage();
    await framer.setContent(`<iframe id="victim" src="${base}/"></iframe>`);
    const framed = framer.frames().find((f) => f !== framer.mainFrame());
    assert.ok(framed, "the frame exists");
    assert.equal(await framed.$("#login-form"), null, "the Studio did not render inside another page");

    // Log out: back to the login, and the token is revoked at the node.
    const viewerToken = await viewer.evaluate(() => sessionStorage.getItem("nexus-token"));
    const whoami = () => viewer.request.get(`${base}/api/me`, { headers: { authorization: `Bearer ${viewerToken}` } });
    assert.equal((await whoami()).status(), 200);
    await viewer.click("#nav-logout");
    await viewer.waitForSelector("#login:not([hidden])");
    assert.equal(await viewer.evaluate(() => sessionStorage.getItem("nexus-token")), null, "the page forgot its token");
    assert.equal((await whoami()).status(), 401, "the node revoked it");
  } finally {
    await browser.close();
  }
});
