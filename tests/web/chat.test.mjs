// The chat page in headless Chromium against a running `afinar serve` (started by tests/serve.rs
// with a base model and an adapter named "rand"):
//   node tests/web/chat.test.mjs http://127.0.0.1:PORT
// Loads the page, sends a message, watches the answer grow as it streams, switches to the
// adapter and sends again, and checks that model text is never parsed as HTML.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";

const base = process.argv[2];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  // The page forbids eval in its CSP; Playwright's waitForFunction needs it in the test only.
  const page = await browser.newPage({ bypassCSP: true });
  const requests = [];
  page.on("request", (r) => {
    if (r.url().endsWith("/v1/chat/completions")) requests.push(JSON.parse(r.postData()));
  });
  const external = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(base)) external.push(r.url());
  });
  await page.goto(base + "/");
  await page.waitForFunction(() => document.querySelectorAll("#model option").length >= 2);
  const options = await page.$$eval("#model option", (os) => os.map((o) => o.value));
  assert.deepEqual(options, ["smollm2", "rand"]);

  // Send a message; record the answer's length while it streams.
  await page.fill("#temperature", "0");
  await page.fill("#input", "Write two sentences about the sea.");
  const lengths = [];
  await page.click("#send");
  for (let i = 0; i < 600; i++) {
    const state = await page.evaluate(() => {
      const a = [...document.querySelectorAll(".msg.assistant, .msg.error")].pop();
      return a ? { len: a.textContent.length, done: a.dataset.done, cls: a.className } : null;
    });
    if (state) {
      lengths.push(state.len);
      assert.notEqual(state.cls, "msg error", "the page shows an error");
      if (state.done === "true") break;
    }
    await page.waitForTimeout(20);
  }
  const final = lengths[lengths.length - 1];
  assert.ok(final > 0, "an answer appeared");
  const partial = new Set(lengths.filter((l) => l > 0 && l < final));
  assert.ok(partial.size >= 2, `the answer grew token by token (lengths seen: ${[...new Set(lengths)]})`);
  assert.equal(requests[0].model, "smollm2");
  assert.equal(requests[0].stream, true);

  // Switch to the adapter: the next request names it, and the history is sent along.
  await page.selectOption("#model", "rand");
  await page.fill("#input", "And one about the sky.");
  await page.click("#send");
  await page.waitForFunction(() => {
    const all = document.querySelectorAll(".msg.assistant");
    return all.length === 2 && all[1].dataset.done === "true" && all[1].textContent.length > 0;
  }, null, { timeout: 60000 });
  assert.equal(requests[1].model, "rand");
  assert.equal(requests[1].messages.length, 3);

  // Model text is inserted as text: markup stays visible characters, no element is created.
  const injected = await page.evaluate(() => {
    const d = document.createElement("div");
    render(d, "<img src=x onerror=\"window.pwned=1\"> **bold**\n```js\n<b>code</b>\n```");
    document.body.appendChild(d);
    return { imgs: d.querySelectorAll("img").length, bolds: d.querySelectorAll("b").length,
             pres: d.querySelectorAll("pre").length, text: d.textContent };
  });
  assert.equal(injected.imgs, 0);
  assert.equal(injected.bolds, 0);
  assert.equal(injected.pres, 1);
  assert.ok(injected.text.includes("<img src=x"));

  // New chat clears the conversation.
  await page.click("#new");
  assert.equal(await page.$$eval(".msg", (m) => m.length), 0);
  assert.deepEqual(external, [], "the page loads nothing from elsewhere");
  console.log("web page: ok");
} finally {
  await browser.close();
}
