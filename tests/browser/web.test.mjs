// The web page in headless Chromium against the real server on loopback.
// Screenshots go to target/browser-artifacts/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { cpSync, mkdtempSync, mkdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const artifacts = path.join(root, "target/browser-artifacts");
const fixture = (n) => path.join(root, "fixtures/images", n);
const binary = process.env.PICIE_BIN || path.join(root, "target/debug/picie");
const port = 18000 + Math.floor(Math.random() * 2000);
const base = `http://127.0.0.1:${port}`;
let server, browser;

before(async () => {
  mkdirSync(artifacts, { recursive: true });
  const data = mkdtempSync(path.join(tmpdir(), "picie-web-"));
  // A copy of the shipped models: renaming classes writes into the package.
  const models = path.join(data, "shipped-models");
  cpSync(path.join(root, "models"), models, { recursive: true });
  server = spawn(binary, ["serve", "--host", "127.0.0.1", "--port", String(port), "--data-dir", path.join(data, "data"), "--models-dir", models], {
    cwd: root,
    stdio: ["ignore", "ignore", process.env.PICIE_LOG ? "inherit" : "ignore"],
  });
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      if ((await fetch(`${base}/health/ready`)).ok) break;
    } catch (_) {}
    if (Date.now() > deadline) throw new Error("the server did not become ready");
    await new Promise((r) => setTimeout(r, 200));
  }
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  server?.kill("SIGTERM");
});

async function page(viewport = { width: 1200, height: 900 }) {
  const p = await browser.newPage({ viewport });
  p.on("pageerror", (e) => { throw e; });
  await p.goto(base + "/");
  await p.waitForFunction(() => document.getElementById("model-info").textContent.includes("K="));
  return p;
}

test("segments an image and shows the overlay and legend", async () => {
  const p = await page();
  await p.setInputFiles("#file", fixture("chelsea.png"));
  await p.waitForSelector("#legend tbody tr");
  const rows = await p.$$eval("#legend tbody tr", (trs) => trs.map((tr) => ({
    name: tr.querySelector(".name").textContent,
    share: parseFloat(tr.cells[2].textContent),
    swatch: getComputedStyle(tr.querySelector(".swatch")).backgroundColor,
  })));
  assert.equal(rows.length, 11);
  assert.ok(Math.abs(rows.reduce((s, r) => s + r.share, 0) - 100) < 1, "shares add up to 100 %");
  assert.ok(rows.every((r) => r.swatch.startsWith("rgb")));
  const size = await p.$eval("#overlay", (c) => [c.width, c.height]);
  assert.deepEqual(size, [451, 300], "the overlay is at the photo's size");
  // The overlay differs from the photo: colours were blended in.
  const differs = await p.evaluate(() => {
    const a = document.getElementById("photo").getContext("2d").getImageData(0, 0, 451, 300).data;
    const b = document.getElementById("overlay").getContext("2d").getImageData(0, 0, 451, 300).data;
    let n = 0;
    for (let i = 0; i < a.length; i += 4) if (a[i] !== b[i] || a[i + 1] !== b[i + 1]) n++;
    return n / (a.length / 4);
  });
  assert.ok(differs > 0.5, `overlay differs from the photo on ${differs}`);
  // Hovering names a class.
  const box = await p.$eval("#overlay", (c) => { const r = c.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; });
  await p.mouse.move(box[0], box[1]);
  const hover = (await p.textContent("#hover")).match(/\((\d+), (\d+)\): (.+)$/);
  assert.ok(hover && rows.some((r) => r.name === hover[3]), `hover names a legend class: ${hover}`);
  const href = await p.getAttribute("#download", "href");
  assert.ok(href.startsWith("data:image/png;base64,"));
  await p.screenshot({ path: path.join(artifacts, "segment.png"), fullPage: true });

  // Phone width: nothing wider than the screen.
  const phone = await page({ width: 390, height: 844 });
  await phone.setInputFiles("#file", fixture("coffee.jpg"));
  await phone.waitForSelector("#legend tbody tr");
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `page overflows a phone screen by ${overflow}px`);
  await phone.screenshot({ path: path.join(artifacts, "segment-phone.png"), fullPage: true });
});

test("the quality switch re-segments at the chosen quality", async () => {
  const p = await page();
  assert.match(await p.textContent("#quality option[value='']"), /server default \(edges\)/);
  await p.setInputFiles("#file", fixture("chelsea.png"));
  await p.waitForFunction(() => document.getElementById("timing").textContent.startsWith("edges"));
  const masks = {};
  for (const q of ["fast", "best"]) {
    const seen = p.waitForResponse((r) => r.url().includes(`quality=${q}`));
    await p.selectOption("#quality", q);
    assert.equal((await seen).headers()["x-quality"], q);
    // The timing line is written after the mask, so the download link is this quality's mask.
    await p.waitForFunction((want) => document.getElementById("timing").textContent.startsWith(want), q);
    masks[q] = await p.getAttribute("#download", "href");
  }
  assert.notEqual(masks.fast, masks.best, "the CRF and the flip change the mask");
  await p.screenshot({ path: path.join(artifacts, "segment-quality.png"), fullPage: true });
});

test("renames a class and keeps it", async () => {
  const p = await page();
  await p.setInputFiles("#file", fixture("coffee.jpg"));
  await p.waitForSelector("#legend tbody tr");
  const row = p.locator("#legend tbody tr").nth(2);
  await row.locator("input[type=text]").fill("cup");
  await row.locator("input[type=color]").fill("#ff0000");
  await row.locator("button").click();
  await p.waitForFunction(() => document.querySelectorAll("#legend tbody tr")[2].querySelector(".name").textContent === "cup");
  const r = await fetch(`${base}/models/default`).then((r) => r.json());
  assert.equal(r.classes[2].name, "cup");
  assert.deepEqual(r.classes[2].color, [255, 0, 0]);
});

test("runs a recluster job from the page and activates the result", async () => {
  const p = await page();
  await p.click("#tab-train");
  await p.fill("#dataset-name", "photos");
  await p.click("#dataset-create");
  await p.waitForFunction(() => document.getElementById("dataset-select").selectedOptions[0]?.textContent.startsWith("photos"));
  await p.setInputFiles("#dataset-files", [fixture("chelsea.png"), fixture("coffee.jpg"), fixture("rocket.jpg")]);
  await p.click("#dataset-upload");
  await p.waitForFunction(() => document.getElementById("upload-report").textContent.includes("3 added"));
  await p.fill("#job-k", "");
  await p.click("#job-start");
  await p.waitForSelector("#activate-new", { timeout: 240_000 });
  // K was suggested: the curve shows every K of the default range, the picked one marked.
  assert.equal(await p.$$eval("#k-curve .k-point", (c) => c.length), 21);
  const picked = Number((await p.getAttribute("#k-curve", "aria-label")).match(/K=(\d+) picked/)[1]);
  assert.match(await p.textContent("#job-result"), new RegExp(`K=${picked}\\)`));
  assert.match(await p.textContent("#job-status"), /succeeded/);
  assert.equal(await p.$eval("#job-bar", (b) => b.style.width), "100%");
  await p.screenshot({ path: path.join(artifacts, "recluster.png"), fullPage: true });
  await p.click("#activate-new");
  await p.waitForFunction((k) => document.getElementById("model-info").textContent.includes(`K=${k}`), picked);
  const info = await fetch(`${base}/info`).then((r) => r.json());
  assert.equal(info.num_classes, picked);
  await fetch(`${base}/models/default/activate`, { method: "POST" });
});

test("segments a set, shows each class's crops, names one and downloads the masks", async () => {
  const p = await page();
  await p.click("#tab-train");
  await p.fill("#dataset-name", "pile");
  await p.click("#dataset-create");
  await p.waitForFunction(() => document.getElementById("dataset-select").selectedOptions[0]?.textContent.startsWith("pile"));
  await p.setInputFiles("#dataset-files", [fixture("chelsea.png"), fixture("coffee.jpg"), fixture("rocket.jpg")]);
  await p.click("#dataset-upload");
  await p.waitForFunction(() => document.getElementById("upload-report").textContent.includes("3 added"));
  await p.selectOption("#job-type", "segment");
  assert.equal(await p.isVisible("#job-k"), false, "a segmentation takes no K");
  await p.selectOption("#job-quality", "fast");
  await p.click("#job-start");
  await p.waitForSelector(".gallery-class .crops img", { timeout: 120_000 });
  assert.match(await p.textContent("#job-result"), /3 masks at quality fast/);
  // Every crop loaded, and the classes are listed largest share first.
  await p.waitForFunction(() => [...document.querySelectorAll(".crops img")].every((i) => i.complete && i.naturalWidth === 160));
  const shares = await p.$$eval(".gallery-class .share", (s) => s.map((e) => parseFloat(e.textContent)));
  assert.equal(shares.length, 11);
  assert.deepEqual(shares, [...shares].sort((a, b) => b - a));
  await p.screenshot({ path: path.join(artifacts, "gallery.png"), fullPage: true });
  // Name the largest class, then download: the archive names it.
  const first = p.locator(".gallery-class").first();
  const index = Number(await first.getAttribute("data-class"));
  await first.locator("input[type=text]").fill("biggest");
  await first.locator("button").click();
  await p.waitForSelector(".gallery-class.saved");
  const href = await p.getAttribute("#archive", "href");
  const zip = Buffer.from(await (await fetch(base + href)).arrayBuffer());
  assert.equal(zip.subarray(0, 2).toString(), "PK");
  const model = await fetch(`${base}/models/default`).then((r) => r.json());
  assert.equal(model.classes[index].name, "biggest");
  const gallery = await fetch(`${base}${href.replace("masks.zip", "gallery")}`).then((r) => r.json());
  assert.equal(gallery.classes[index].name, "biggest");
  // Phone width: the gallery fits.
  await p.setViewportSize({ width: 390, height: 844 });
  const overflow = await p.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `the gallery overflows a phone screen by ${overflow}px`);
});

test("an invalid file shows a readable error", async () => {
  const p = await page();
  const bogus = path.join(mkdtempSync(path.join(tmpdir(), "picie-bad-")), "holiday.png");
  writeFileSync(bogus, "this is not a picture");
  await p.setInputFiles("#file", bogus);
  await p.waitForSelector("#error:not([hidden])");
  const text = await p.textContent("#error");
  assert.match(text, /Could not segment holiday\.png: .*(image|format)/i);
  await p.screenshot({ path: path.join(artifacts, "invalid-file.png"), fullPage: true });
});

test("asks for the API key when the server answers 401, then retries", async () => {
  const keyedPort = port + 1;
  const keyedBase = `http://127.0.0.1:${keyedPort}`;
  const data = mkdtempSync(path.join(tmpdir(), "picie-web-key-"));
  const keyed = spawn(binary, ["serve", "--host", "127.0.0.1", "--port", String(keyedPort), "--data-dir", data,
    "--models-dir", path.join(root, "models"), "--api-key", "sesame"], { cwd: root, stdio: "ignore" });
  try {
    const deadline = Date.now() + 60_000;
    for (;;) {
      try { if ((await fetch(`${keyedBase}/health/ready`)).ok) break; } catch (_) {}
      if (Date.now() > deadline) throw new Error("the keyed server did not become ready");
      await new Promise((r) => setTimeout(r, 200));
    }
    const p = await browser.newPage({ viewport: { width: 1200, height: 900 } });
    p.on("pageerror", (e) => { throw e; });
    await p.goto(keyedBase + "/");
    await p.click("#tab-train");
    await p.fill("#dataset-name", "guarded");
    await p.click("#dataset-create");
    await p.waitForSelector("#key-dialog[open]");
    assert.match(await p.textContent("#key-dialog-message"), /API key/);
    await p.screenshot({ path: path.join(artifacts, "api-key-dialog.png") });
    await p.fill("#key-dialog-input", "sesame");
    await p.click("#key-dialog-ok");
    await p.waitForFunction(() => document.getElementById("dataset-select").selectedOptions[0]?.textContent.startsWith("guarded"));
    assert.equal(await p.evaluate(() => localStorage.getItem("picie-api-key")), "sesame");
    const list = await fetch(`${keyedBase}/datasets`).then((r) => r.json());
    assert.equal(list.length, 1);
  } finally {
    keyed.kill("SIGTERM");
  }
});
