// Shared helpers of the browser tests: Debian's chromium through playwright-core on a fresh profile,
// screenshots, and the few Gradio widgets the scripts drive (tabs, dropdowns, number fields).
const { chromium } = require("playwright-core");
const fs = require("fs");
const os = require("os");
const path = require("path");

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

function step(msg) {
  console.log(`[browser] ${msg}`);
}

// Runs BODY(page, shot) in a fresh headless chromium; a failure screenshot is kept as PREFIX-failure.png.
async function withPage(url, shots, prefix, body) {
  fs.mkdirSync(shots, { recursive: true });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "llmtune-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  const page = await context.newPage();
  page.setDefaultTimeout(60_000);
  const shot = async (name) => {
    if (name !== "failure") { // a failure keeps its error messages in the picture
      for (const close of await page.locator(".toast-close").all()) await close.click().catch(() => {});
    }
    await page.waitForTimeout(500); // let the last update paint
    await page.screenshot({ path: path.join(shots, `${prefix}${name}.png`), fullPage: true });
    step(`screenshot ${prefix}${name}.png`);
  };
  try {
    step(`open ${url}`);
    await page.goto(url, { waitUntil: "domcontentloaded" });
    await body(page, shot);
    step("done");
  } catch (err) {
    await shot("failure").catch(() => {});
    throw err;
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

// Clicks #ID until DONE (a locator) shows: the Runs tab re-renders every 2 s, and a click that lands
// while the layout moves can miss its button.
async function clickUntil(page, id, done, tries = 3) {
  for (let i = 1; ; i++) {
    await page.locator(`#${id}`).click();
    try {
      await done.waitFor({ timeout: 20_000 });
      return;
    } catch (err) {
      if (i >= tries) throw err;
      step(`#${id}: no effect yet, clicking again`);
    }
  }
}

async function openTab(page, name) {
  await page.getByRole("tab", { name, exact: true }).click();
}

// Picks the option whose label contains TEXT in the dropdown #ID (fires the dropdown's select event).
async function chooseOption(page, id, text) {
  const input = page.locator(`#${id} input`);
  await input.click();
  await input.fill(text);
  await page.getByRole("option", { name: new RegExp(text.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")) }).first().click();
}

// Adds NAMES to the multiselect dropdown #ID.
async function addChoices(page, id, names) {
  const input = page.locator(`#${id} input`);
  for (const name of names) {
    await input.click();
    await input.fill(name);
    await input.press("Enter");
    await page.locator(`#${id}`).getByText(name, { exact: true }).filter({ visible: true }).first().waitFor();
  }
  await page.keyboard.press("Escape");
}

// Types VALUE into the number field #ID (empty string: clears it) and leaves the field.
async function setNumber(page, id, value) {
  const input = page.locator(`#${id} input`);
  await input.fill(value);
  await input.press("Tab");
}

async function yamlText(page) {
  return page.locator("#recipe-yaml .cm-content").innerText();
}

async function waitYaml(page, predicate, what) {
  await page.waitForFunction(
    ([source]) => {
      const text = document.querySelector("#recipe-yaml .cm-content")?.innerText || "";
      return new Function("text", `return (${source})(text)`)(text);
    },
    [predicate.toString()],
    { timeout: 60_000 },
  ).catch(async (err) => {
    throw new Error(`recipe YAML never showed ${what}:\n${await yamlText(page)}\n${err}`);
  });
}

async function waitValidation(page, state) {
  await page.locator(`#validation-result[data-state="${state}"]`).waitFor();
}

async function waitRun(page, status, timeout) {
  await page.locator(`#run-progress[data-status="${status}"]`).waitFor({ timeout });
}

module.exports = { step, withPage, clickUntil, openTab, chooseOption, addChoices, setNumber, yamlText, waitYaml, waitValidation,
  waitRun };
