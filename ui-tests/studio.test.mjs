// Two browsers edit one document and see each other live; the mailbox
// graph renders. Run by nexus-bin/tests/studio_ui.rs against a real
// `nexus dev` (NEXUS_URL, NEXUS_PASSWORD), in Debian's Chromium.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const base = process.env.NEXUS_URL;
const password = process.env.NEXUS_PASSWORD;

const launchArgs = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

async function loggedIn(browser) {
  const page = await (await browser.newContext()).newPage();
  await page.goto(base);
  await page.fill("#login-username", "admin");
  await page.fill("#login-password", password);
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

    // The mailbox graph draws actors as a picture.
    await a.click("#nav-graph");
    await a.waitForFunction(() => document.querySelectorAll("#graph-svg circle").length >= 3, null, { timeout: 15000 });
    const labels = await a.$$eval("#graph-svg text", (ts) => ts.map((t) => t.textContent).join(" "));
    assert.match(labels, /redis-bridge/);
    assert.match(labels, /kafka-bridge/);
    assert.match(labels, /session\//);
    if (process.env.NEXUS_SCREENSHOT) await a.screenshot({ path: process.env.NEXUS_SCREENSHOT });
  } finally {
    await browser.close();
  }
});
