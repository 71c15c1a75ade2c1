// The Studio's Contexts view in Debian's Chromium: create a context, talk
// to it and watch the answer stream in, then read its timeline, replay it
// at a record and fork it there. Run by nexus-bin/tests/contexts_ui.rs
// against a node with a model (a scripted one, or the real local one), with:
//   NEXUS_URL, NEXUS_USER, NEXUS_PASSWORD  the node and a user of it;
//   NEXUS_EXPECT_TOOL    a tool to offer the context, which the model calls;
//   NEXUS_EXPECT_TEXT    the exact answer (else: any non-empty answer);
//   NEXUS_STREAM_RENDERS the fewest partial answers to see rendered (default 1);
//   NEXUS_TURN_TIMEOUT_MS how long a turn may take (default 60000);
//   NEXUS_SCREENSHOT_DIR where to save screenshots, if anywhere;
//   NEXUS_EXPECT_NO_MODEL set: the node has no model, and the view must say so instead.
import { test } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { chromium } from "playwright-core";

const base = process.env.NEXUS_URL;
const user = process.env.NEXUS_USER;
const password = process.env.NEXUS_PASSWORD;
const expectTool = process.env.NEXUS_EXPECT_TOOL || "";
const expectText = process.env.NEXUS_EXPECT_TEXT || "";
const streamRenders = Number(process.env.NEXUS_STREAM_RENDERS || 1);
const turnTimeout = Number(process.env.NEXUS_TURN_TIMEOUT_MS || 60000);
const screenshots = process.env.NEXUS_SCREENSHOT_DIR;
const noModel = Boolean(process.env.NEXUS_EXPECT_NO_MODEL);

const launchArgs = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

async function screenshot(page, name) {
  if (screenshots) await page.screenshot({ path: path.join(screenshots, name), fullPage: true });
}

// Records, in the page, what a person would have seen: each partial answer
// rendered while the turn ran, and whether the view said a turn was running.
function watchChat() {
  const chat = document.querySelector("#ctx-chat");
  const open = document.querySelector("#ctx-open");
  const seen = { partial: [], running: false };
  window.__contextsSeen = seen;
  new MutationObserver((records) => {
    for (const r of records) if (r.attributeName === "data-running" && (r.oldValue === "true" || open.dataset.running === "true")) seen.running = true;
    if (chat.querySelector("[data-testid=turn-complete]")) return;
    for (const m of chat.querySelectorAll('[data-testid=assistant-message][data-streaming="true"]')) {
      const text = m.querySelector("[data-testid=assistant-text]").textContent;
      if (text && !seen.partial.includes(text)) seen.partial.push(text);
    }
  }).observe(open, { subtree: true, childList: true, characterData: true, attributes: true, attributeOldValue: true, attributeFilter: ["data-running", "data-streaming"] });
}

const visibleText = (page, selector) => page.locator(selector).allTextContents();

// A page logged in as the user; `prepare` sees it first (the WebSocket opens at login).
async function logIn(browser, errors, prepare = () => {}) {
  const page = await (await browser.newContext({ viewport: { width: 1400, height: 1000 } })).newPage();
  page.on("pageerror", (error) => errors.push(error.message));
  prepare(page);
  await page.goto(base);
  await page.fill("#login-username", user);
  await page.fill("#login-password", password);
  await page.click("#login-submit");
  await page.waitForSelector("#panels:not([hidden])");
  return page;
}

test("without a model, the view says why no context can be made", { skip: !noModel }, async () => {
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: launchArgs });
  const errors = [];
  try {
    const page = await logIn(browser, errors);
    await page.click("#nav-contexts");
    await page.waitForSelector("#contexts:not([hidden])");
    await page.click("[data-testid=new-context-submit]");
    await page.waitForSelector("[data-testid=contexts-notice]:has-text('no model endpoint is configured')");
    assert.equal(await page.isHidden("[data-testid=context]"), true, "no context opened");
    assert.equal(await page.locator("[data-testid=context-item]").count(), 0);
    assert.deepEqual(errors, [], "no script errors");
  } finally {
    await browser.close();
  }
});

test("a context answers in streamed text, its timeline replays, and a fork keeps its history", { skip: noModel }, async () => {
  assert.ok(base && user && password, "NEXUS_URL, NEXUS_USER and NEXUS_PASSWORD must be set");
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: launchArgs });
  const errors = [];
  let liveDeltas = 0;
  try {
    // Deltas that reach the page as WebSocket frames, as they are journaled.
    const countDeltas = (page) =>
      page.on("websocket", (ws) =>
        ws.on("framereceived", ({ payload }) => {
          try {
            const frame = JSON.parse(payload);
            if (frame.type === "context_record" && frame.record?.type === "nexus.thought.delta") liveDeltas += 1;
          } catch {
            // not JSON: not a context frame
          }
        }),
      );
    const page = await logIn(browser, errors, countDeltas);

    // A new context, with the tool the model is to call.
    await page.click("#nav-contexts");
    await page.waitForSelector("#contexts:not([hidden])");
    if (expectTool) {
      const option = page.locator(`[data-testid=tool-option][value="${expectTool}"]`);
      await option.waitFor();
      await option.check();
    }
    await page.fill("[data-testid=new-context-system]", "Answer in one short sentence.");
    await page.click("[data-testid=new-context-submit]");
    await page.waitForSelector("[data-testid=context]:not([hidden])");
    const parent = await page.getAttribute("[data-testid=context]", "data-context");
    assert.match(parent, /^[0-9a-f-]{36}$/);
    await page.waitForSelector(`[data-testid=context-item][data-context="${parent}"]`);
    assert.equal((await page.textContent("[data-testid=contexts-notice]")).trim(), "", "no error shown");

    // Say something; the answer streams in before the turn ends.
    await page.evaluate(watchChat);
    await page.fill("[data-testid=message-input]", "Say hello.");
    await page.click("[data-testid=send]");
    await page.waitForSelector("#ctx-chat [data-testid=user-message]:has-text('Say hello.')", { timeout: turnTimeout });
    const done = await page.waitForSelector("#ctx-chat [data-testid=turn-complete]", { timeout: turnTimeout });
    assert.equal(await done.getAttribute("data-outcome"), "completed", await done.textContent());
    await page.waitForSelector("[data-testid=cancel]", { state: "hidden" });
    const seen = await page.evaluate(() => window.__contextsSeen);
    assert.ok(seen.running, "the view showed the turn running (Cancel offered)");
    assert.ok(liveDeltas >= 1, "streamed text reached the page live, over the WebSocket");
    assert.ok(
      seen.partial.length >= streamRenders,
      `at least ${streamRenders} partial answer(s) rendered before the turn ended; saw ${JSON.stringify(seen.partial)}`,
    );
    const answers = page.locator('#ctx-chat [data-testid=assistant-message][data-streaming="false"] [data-testid=assistant-text]');
    const answer = (await answers.last().textContent()).trim();
    assert.ok(answer.length > 0, "the answer is not empty");
    if (expectText) {
      for (const partial of seen.partial) assert.ok(expectText.startsWith(partial), `${partial} begins the answer`);
      assert.equal(answer, expectText);
      assert.equal(await page.locator("#ctx-chat b").count(), 0, "model text is shown as text, never as markup");
    }

    // The tool call, collapsed, opens on its arguments and result.
    if (expectTool) {
      const call = page.locator(`#ctx-chat details[data-testid=tool-call][data-tool="${expectTool}"]`);
      assert.equal(await call.count(), 1);
      assert.equal(await call.getAttribute("data-state"), "ok");
      assert.equal(await call.locator("[data-testid=tool-result]").isVisible(), false, "collapsed at first");
      await call.locator("summary").click();
      assert.equal(await call.locator("[data-testid=tool-arguments]").isVisible(), true);
      const result = (await call.locator("[data-testid=tool-result]").textContent()).trim();
      assert.ok(result.length > 1 && result !== "…", `the tool's result is shown: ${result}`);
    }

    // The timeline lists the journal in offset order.
    await page.waitForSelector("[data-testid=timeline-record][data-type='nexus.context.turn_completed']");
    const timeline = await page.$$eval("[data-testid=timeline-record]", (items) =>
      items.map((li) => ({ offset: Number(li.dataset.offset), type: li.dataset.type })),
    );
    const types = timeline.map((r) => r.type);
    for (const type of ["nexus.context.created", "nexus.context.user_message", "nexus.thought.delta", "nexus.llm.response", "nexus.context.turn_completed"]) {
      assert.ok(types.includes(type), `the timeline lists ${type}: ${types.join(", ")}`);
    }
    console.log(JSON.stringify({ answer, partialRenders: seen.partial.length, liveDeltas, records: timeline.length }));
    const offsets = timeline.map((r) => r.offset);
    assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b), "in offset order");
    assert.equal(new Set(offsets).size, offsets.length, "each record once");

    // Replay at the user's message: the question, no answer yet.
    const asked = timeline.find((r) => r.type === "nexus.context.user_message").offset;
    await page.click(`[data-testid=timeline-record][data-offset="${asked}"] button`);
    await page.waitForSelector(`[data-testid=replay][data-at="${asked}"][data-loaded=true]`);
    assert.deepEqual(await visibleText(page, "[data-testid=replay-messages] [data-testid=user-message]"), ["Say hello."]);
    assert.equal(await page.locator("[data-testid=replay-messages] [data-testid=assistant-message]").count(), 0);
    assert.equal(await page.isVisible("[data-testid=replay-open]"), true, "a turn is under way at that point");

    // Replay at the answer (a record in the middle: the turn has not ended there).
    const answered = timeline.filter((r) => r.type === "nexus.llm.response").pop().offset;
    assert.ok(answered > asked && answered < offsets[offsets.length - 1]);
    await page.click(`[data-testid=timeline-record][data-offset="${answered}"] button`);
    await page.waitForSelector(`[data-testid=replay][data-at="${answered}"][data-loaded=true]`);
    const replayed = await visibleText(page, "[data-testid=replay-messages] [data-testid=assistant-message] > .text");
    assert.equal(replayed[replayed.length - 1].trim(), answer, "the replay holds the answer");
    assert.equal(await page.isVisible("[data-testid=replay-open]"), true, "the turn has not ended at that record");
    assert.ok((await page.locator("[data-testid=replay-steps] tr").count()) >= 1, "step timings are shown");
    await screenshot(page, "contexts-parent.png");

    // Fork there: the child opens, says where it comes from and holds the history.
    await page.click("[data-testid=fork-here]");
    await page.waitForFunction((p) => {
      const open = document.querySelector("[data-testid=context]");
      return open.dataset.context && open.dataset.context !== p;
    }, parent);
    const child = await page.getAttribute("[data-testid=context]", "data-context");
    const lineage = page.locator("[data-testid=lineage]");
    await lineage.waitFor();
    assert.equal(await lineage.getAttribute("data-parent"), parent);
    assert.equal(await lineage.getAttribute("data-offset"), String(answered));
    assert.match(await lineage.textContent(), new RegExp(`forked from ${parent} @ ${answered}`));
    await page.waitForSelector("[data-testid=inherited] [data-testid=user-message]:has-text('Say hello.')");
    const inherited = await visibleText(page, "[data-testid=inherited] [data-testid=assistant-message] > .text");
    assert.equal(inherited[inherited.length - 1].trim(), answer, "the child holds the parent's answer");
    await page.waitForSelector(`[data-testid=context-item][data-context="${child}"]`);
    await page.waitForSelector(`[data-testid=context-item][data-context="${parent}"]`);
    // The child's own journal starts with its creation, which names the parent.
    await page.waitForSelector("[data-testid=timeline-record][data-type='nexus.context.created']", { timeout: turnTimeout });
    await screenshot(page, "contexts-fork.png");

    // Back to the parent through the lineage.
    await lineage.locator("button").click();
    await page.waitForFunction((p) => document.querySelector("[data-testid=context]").dataset.context === p, parent);
    await page.waitForSelector("#ctx-chat [data-testid=turn-complete]");
    assert.deepEqual(errors, [], "no script errors");
  } finally {
    await browser.close();
  }
});
