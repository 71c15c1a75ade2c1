// A panel's life in the Studio UI, live: create it from the python_minimal
// template, start a Studio instance, open it through the traffic gateway
// (the UI first gets the panel's cookie), see another user refused it in a
// browser of their own, stop it, deploy it as an App, watch the App scale to
// zero and come back on the next request, make it public (anyone gets it,
// sandboxed) and private again. Run by nexus-bin/tests/panels_ui.rs against
// a real `nexus dev` whose Apps scale to zero after a few seconds
// (NEXUS_URL, NEXUS_PASSWORD, NEXUS_GATEWAY), in Debian's Chromium.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const base = process.env.NEXUS_URL;
const password = process.env.NEXUS_PASSWORD;
const gateway = process.env.NEXUS_GATEWAY;

// Starting an instance runs real processes (and gVisor when present); a cold
// start waits for the panel to answer.
const START = 90_000;

const launchArgs = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

// Records every state the panel list shows for each mode, in order, as it
// happens: every "instance" frame is its own task, so no state is skipped.
function recordStates() {
  window.seenStates = { studio: [], app: [] };
  window.loadedOnce = true;
  new MutationObserver((records) => {
    for (const r of records) {
      const mode = r.attributeName === "data-studio-state" ? "studio" : "app";
      const state = r.target.getAttribute(r.attributeName);
      const seen = window.seenStates[mode];
      if (state && seen[seen.length - 1] !== state) seen.push(state);
    }
  }).observe(document.querySelector("#panel-list"), {
    subtree: true,
    attributes: true,
    attributeFilter: ["data-studio-state", "data-app-state"],
  });
}

const isPanelPage = (id) => (r) => r.url() === `${gateway}/p/${id}/` && r.request().method() === "GET";

// Asks until `url` answers `want` (the gateway trusts a panel record for a
// couple of seconds, so a change reaches it shortly after it is made).
async function eventuallyStatus(request, url, want) {
  let last;
  for (let attempt = 0; attempt < 60; attempt++) {
    last = await request.get(url, { maxRedirects: 0 });
    if (last.status() === want) return last;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  assert.fail(`${url} answered ${last.status()}, not ${want}`);
}

test("a panel starts in Studio, opens through the gateway, deploys as an App, scales to zero and comes back", async () => {
  assert.ok(base && password && gateway, "NEXUS_URL, NEXUS_PASSWORD and NEXUS_GATEWAY must be set");
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: launchArgs });
  try {
    const page = await (await browser.newContext()).newPage();
    const config = await (await page.request.get(`${base}/api/config`)).json();
    assert.equal(config.gateway, gateway, "the node tells the UI where its gateway is");

    await page.goto(base);
    await page.fill("#login-username", "admin");
    await page.fill("#login-password", password);
    await page.click("#login-submit");
    await page.waitForSelector("#panels:not([hidden])");
    await page.evaluate(recordStates);

    // A new panel from the template (the form's default source).
    assert.equal(await page.inputValue("#panel-template"), "template:python_minimal");
    await page.fill("#panel-name", "Live panel");
    await page.click("#panel-create");
    const item = page.locator("#panel-list li.panel", { hasText: "Live panel" });
    await item.waitFor();
    const id = await item.getAttribute("data-panel");
    const panel = page.locator(`#panel-list li[data-panel="${id}"]`);
    const state = (mode, states) =>
      page.waitForFunction(
        ([id, mode, states]) => {
          const li = document.querySelector(`#panel-list li[data-panel="${id}"]`);
          return li && states.includes(li.dataset[mode + "State"]);
        },
        [id, mode, states],
        { timeout: START },
      );

    // Scaling what was never deployed is refused, and the UI says so.
    await panel.locator('[data-action="scale-zero"]').click();
    await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Scale to 0:"));

    // Start Studio: the state moves on by itself until the instance serves.
    await panel.locator('[data-action="start-studio"]').click();
    await state("studio", ["ready", "idle"]);
    const studio = panel.locator('li.instance[data-mode="studio"]');
    assert.equal(await studio.count(), 1, "one Studio instance per panel");
    const isolation = await studio.getAttribute("data-isolation");
    assert.ok(["gvisor", "process", "none"].includes(isolation), `isolation ${isolation}`);
    assert.equal(await studio.locator(".isolation-warning").isVisible(), isolation === "none", "a warning exactly when unisolated");
    const studioSeen = await page.evaluate(() => window.seenStates.studio);
    assert.ok(studioSeen.includes("ready"), `studio states seen: ${studioSeen}`);
    assert.ok(
      studioSeen.indexOf("ready") > 0 && ["pending", "starting"].includes(studioSeen[0]),
      `the state went to ready live, from ${studioSeen}`,
    );
    assert.ok(await page.evaluate(() => window.loadedOnce), "the page was never reloaded");

    // A second Studio is refused while one runs.
    await panel.locator('[data-action="start-studio"]').click();
    await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Start Studio:"));

    // Logs of the running instance.
    await panel.locator('[data-action="logs"]').click();
    await panel.locator("pre.logs").waitFor({ state: "visible" });
    assert.match(await panel.locator("pre.logs").textContent(), /^\S+:\n/);

    // Open it through the gateway: the page loads in the frame, and the
    // Studio instance's watchdog gets a heartbeat.
    const heartbeat = page.waitForResponse((r) => r.url() === `${gateway}/heartbeat/${id}` && r.request().method() === "POST");
    let loaded = page.waitForResponse(isPanelPage(id), { timeout: START });
    await panel.locator('[data-action="open"]').click();
    await expectPanelPage(await loaded);
    assert.equal((await heartbeat).status(), 200, "the heartbeat reached the watchdog");
    await page.waitForSelector('#viewer[data-heartbeat="ok"]');
    assert.equal(page.frame({ url: `${gateway}/p/${id}/` }) !== null, true, "the frame shows the panel");
    const cookies = await page.context().cookies(`${gateway}/p/${id}/`);
    const cookie = cookies.find((c) => c.name === "nexus_panel");
    assert.ok(cookie && cookie.httpOnly && cookie.path === `/p/${id}/` && cookie.sameSite === "Strict", JSON.stringify(cookies));

    // Another user, in a browser of their own, cannot open it.
    const studioUrl = `${gateway}/p/${id}/`;
    const adminToken = await page.evaluate(() => sessionStorage.getItem("nexus-token"));
    const created = await page.request.post(`${base}/api/users`, {
      headers: { authorization: `Bearer ${adminToken}` },
      data: { username: "bob", password: "bob-password" },
    });
    assert.equal(created.status(), 201);
    const bob = await browser.newContext();
    const bobPage = await bob.newPage();
    assert.equal((await bobPage.goto(studioUrl)).status(), 401, "no credential");
    const login = await bob.request.post(`${base}/api/login`, { data: { username: "bob", password: "bob-password" } });
    const bobAuth = { authorization: `Bearer ${(await login.json()).token}` };
    assert.equal((await bob.request.get(studioUrl, { headers: bobAuth })).status(), 403, "bob's token");
    assert.equal((await bob.request.post(`${base}/api/panels/${id}/access`, { headers: bobAuth })).status(), 403);
    // Bob's cookie for a panel of his own does not open the admin's.
    const own = await bob.request.post(`${base}/api/panels`, {
      headers: bobAuth,
      data: { name: "bob's", mode: "studio", source: "template:python_minimal" },
    });
    const bobPanel = (await own.json()).id;
    assert.equal((await bob.request.post(`${base}/api/panels/${bobPanel}/access`, { headers: bobAuth })).status(), 200);
    const bobCookie = (await bob.cookies(`${gateway}/p/${bobPanel}/`)).find((c) => c.name === "nexus_panel");
    assert.ok(bobCookie, "bob got the cookie of his own panel");
    await bob.addCookies([{ ...bobCookie, path: `/p/${id}/` }]);
    assert.equal((await bobPage.goto(studioUrl)).status(), 403, "a cookie of another panel");
    await bob.close();

    // The Studio opened as localhost while the node names its gateway
    // 127.0.0.1: cookies are per host, so the UI opens the gateway under the
    // page's name, and the panel loads.
    const local = await (await browser.newContext()).newPage();
    await local.goto(base.replace("127.0.0.1", "localhost"));
    await local.fill("#login-username", "admin");
    await local.fill("#login-password", password);
    await local.click("#login-submit");
    const localUrl = `${gateway.replace("127.0.0.1", "localhost")}/p/${id}/`;
    const localLoaded = local.waitForResponse((r) => r.url() === localUrl && r.request().method() === "GET", { timeout: START });
    await local.locator(`#panel-list li[data-panel="${id}"] [data-action="open"]`).click();
    await expectPanelPage(await localLoaded);
    await local.context().close();

    // Stop it.
    await panel.locator('[data-action="stop-studio"]').click();
    await state("studio", ["stopped"]);
    assert.equal(await panel.locator('li.instance[data-mode="studio"] .badge').textContent(), "stopped");

    // Deploy as an App: a new instance serves.
    await panel.locator('[data-action="deploy"]').click();
    await state("app", ["ready", "idle"]);
    const first = await panel.locator('li.instance[data-mode="app"]').getAttribute("data-instance");
    loaded = page.waitForResponse(isPanelPage(id), { timeout: START });
    await panel.locator('[data-action="open"]').click();
    await expectPanelPage(await loaded);

    // No requests: it scales to zero, and nothing serves.
    await state("app", ["stopped"]);
    assert.equal(await panel.locator('li.instance[data-mode="app"][data-state="ready"], li.instance[data-mode="app"][data-state="idle"]').count(), 0);

    // The next request wakes it: a new instance, and the page loads.
    loaded = page.waitForResponse(isPanelPage(id), { timeout: START });
    await page.click("#viewer-reload");
    await expectPanelPage(await loaded);
    await state("app", ["ready", "idle"]);
    const second = await panel.locator('li.instance[data-mode="app"]').getAttribute("data-instance");
    assert.notEqual(second, first, "a new App instance serves");
    const appSeen = await page.evaluate(() => window.seenStates.app);
    assert.ok(appSeen.indexOf("stopped") < appSeen.lastIndexOf("ready"), `app states seen: ${appSeen}`);
    if (process.env.NEXUS_SCREENSHOT) await page.screenshot({ path: process.env.NEXUS_SCREENSHOT, fullPage: true });

    // Public: the App is served to anyone, in a sandbox of its own origin.
    await panel.locator('[data-action="public"]').check();
    await page.waitForSelector(`#panel-list li[data-panel="${id}"][data-public="true"]`);
    const anyone = await browser.newContext();
    const shared = await eventuallyStatus(anyone.request, studioUrl, 200);
    assert.match(shared.headers()["content-security-policy"] || "", /^sandbox allow-scripts /);
    assert.doesNotMatch(shared.headers()["content-security-policy"], /allow-same-origin/);
    const visitor = await anyone.newPage();
    assert.equal((await visitor.goto(studioUrl)).status(), 200);
    const origin = await visitor.evaluate(() => {
      try {
        return `storage of ${localStorage.length} items at ${location.origin}`;
      } catch (error) {
        return `sandboxed: ${error.name}`;
      }
    });
    assert.match(origin, /^sandboxed/, "a stranger's public App does not run in the gateway's origin");
    // Private again: strangers are refused.
    await panel.locator('[data-action="public"]').uncheck();
    await page.waitForSelector(`#panel-list li[data-panel="${id}"][data-public="false"]`);
    await eventuallyStatus(anyone.request, studioUrl, 401);

    // Undeploy, so nothing is left running.
    await panel.locator('[data-action="stop-all"]').click();
    await state("app", ["stopped"]);
  } finally {
    await browser.close();
  }
});

// The python_minimal page, not a gateway error page (those are HTML too,
// with 404/502/503/504).
async function expectPanelPage(response) {
  assert.equal(response.status(), 200, `GET ${response.url()}`);
  assert.match(response.headers()["content-type"] || "", /^text\/html/);
  assert.ok((await response.text()).length > 0, "the page has a body");
}
