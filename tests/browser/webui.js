// Drives the llmtune web UI like a person would, in Debian's chromium through playwright-core:
// load the tiny SFT recipe, lower max_steps in the form, launch it, wait for completion with the
// loss plot drawn, chat with two models side by side, vote, and screenshot every tab.
// Usage: node webui.js URL SCREENSHOT_DIR RUN_NAME   (run by tests/test_webui_browser.py)
const { chromium } = require("playwright-core");
const fs = require("fs");
const os = require("os");
const path = require("path");

const [url, shots, runName] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

function step(msg) {
  console.log(`[browser] ${msg}`);
}

async function main() {
  fs.mkdirSync(shots, { recursive: true });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "llmtune-chromium-"));
  // A persistent context on a fresh profile directory: chromium's own --user-data-dir, nothing reused.
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
    await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
    step(`screenshot ${name}.png`);
  };
  try {
    step(`open ${url}`);
    await page.goto(url, { waitUntil: "domcontentloaded" });

    // Recipes: the quickstart (SmolLM2) loads on open; pick the tiny SFT recipe instead (a CPU-quick
    // run), then lower max_steps through the form.
    const yaml = page.locator("#recipe-yaml");
    await yaml.getByText("smollm2-135m-instruct").first().waitFor();
    const pick = page.locator("#recipe-pick input");
    await pick.click();
    await pick.fill("shipped/sft-tiny.yaml");
    await pick.press("Enter");
    await page.keyboard.press("Escape");
    await page.locator("#load-recipe").click();
    await yaml.getByText("tiny-llama").first().waitFor();
    const maxSteps = page.locator("#max-steps input");
    await maxSteps.fill("10");
    await maxSteps.press("Tab");
    await yaml.getByText("max_steps: 10").first().waitFor();
    await page.locator("#validation textarea").filter({ hasText: /^ok:/ }).waitFor().catch(async () => {
      await page.waitForFunction(() => document.querySelector("#validation textarea")?.value.startsWith("ok:"));
    });
    await shot("recipes");

    // Runs: launch, then wait for the run to complete with its loss curve drawn.
    await page.getByRole("tab", { name: "Runs" }).click();
    await page.locator("#run-name input, #run-name textarea").first().fill(runName);
    await page.locator("#launch").click();
    await page.locator("#launch-msg").getByText(`launched run ${runName}`).waitFor();
    step("launched; waiting for completion");
    await page.locator('#run-progress[data-status="completed"]').waitFor({ timeout: 240_000 });
    await page.locator("#loss-plot canvas, #loss-plot svg").first().waitFor();
    await page.locator("#runs-table").getByText(runName, { exact: true }).filter({ visible: true }).first().waitFor();
    await shot("runs");

    // Chat & compare: the new run against the untrained base, side by side.
    await page.getByRole("tab", { name: "Chat & compare" }).click();
    const models = page.locator("#chat-models input");
    for (const name of [`runs/${runName}`, "tiny-llama"]) {
      await models.click();
      await models.fill(name);
      await models.press("Enter");
      await page.locator("#chat-models").getByText(name, { exact: true }).filter({ visible: true }).first().waitFor();
    }
    await page.keyboard.press("Escape");
    await page.locator("#chat-message textarea").fill("Hello! Can you tell me a story?");
    await page.locator("#chat-send").click();
    await page.locator("#chat-status").getByText("all 2 answers are in").waitFor({ timeout: 120_000 });
    for (const slot of ["A", "B"]) {
      await page.locator(`#answer-${slot}`).getByText("Hello! Can you tell me a story?").first().waitFor();
    }
    await shot("chat");

    // Feedback: A wins; the counter shows it.
    await page.locator("#vote-a").click();
    await page.locator("#vote-msg").getByText("recorded").waitFor();
    await page.locator("#feedback-counter").getByText("1", { exact: false }).first().waitFor();
    await shot("feedback");

    // Evaluate: `llmtune compare` of the same two models on two held-out demo prompts.
    await page.getByRole("tab", { name: "Evaluate" }).click();
    const evalModels = page.locator("#eval-models input");
    for (const name of [`runs/${runName}`, "tiny-llama"]) {
      await evalModels.click();
      await evalModels.fill(name);
      await evalModels.press("Enter");
      await page.locator("#eval-models").getByText(name, { exact: true }).filter({ visible: true }).first().waitFor();
    }
    await page.keyboard.press("Escape");
    await page.locator("#eval-n input").fill("2");
    await page.locator("#compare").click();
    await page.locator("#compare-table").getByText(`runs/${runName}`, { exact: true }).filter({ visible: true })
      .first().waitFor({ timeout: 180_000 });
    await shot("evaluate");
    step("done");
  } catch (err) {
    await shot("failure").catch(() => {});
    throw err;
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
