// The preference flywheel in a real browser (issue 18's acceptance): launch a short rejection-sampling run
// of tiny-llama → open its rollouts → label two pairs → "Train on this feedback" → launch the DPO →
// "Compare with its parent" → the win matrix shows; then the two models side by side in Chat, and the
// Feedback tab with its snapshot and a TRL export. A screenshot of every tab goes to SCREENSHOT_DIR.
// Usage: node loop.js URL SCREENSHOT_DIR   (run by tests/test_webui_browser.py, which has written
// WORKSPACE/recipes/rs-tiny.yaml: two rounds of best-of-4 on 6 prompts)
const { step, withPage, clickUntil, openTab, chooseOption, setNumber, waitYaml, waitValidation, waitRun } = require("./lib");

const [url, shots] = process.argv.slice(2);

withPage(url, shots, "", async (page, shot) => {
  // Recipes → Runs: the short RS run.
  await waitYaml(page, (t) => t.includes("stage:"), "the recipe shown on open");
  await chooseOption(page, "recipe-pick", "recipes/rs-tiny.yaml");
  await waitYaml(page, (t) => t.includes("stage: rs") && t.includes("iterations: 2"), "the rs-tiny recipe");
  await waitValidation(page, "ok");
  await openTab(page, "Runs");
  await page.locator("#run-name textarea").fill("rs-run");
  await page.locator("#launch").click();
  await page.locator("#launch-msg").getByText("launched run rs-run").waitFor();
  await waitRun(page, "completed", 240_000);
  step("rs-run completed");

  // Rollouts: pick A and B by clicking two answers to one prompt, label; then a suggested pair.
  await clickUntil(page, "open-rollouts", page.locator("#rollout-count").getByText("48 of 48 samples"));
  await page.locator("#rollout-chart-reward svg").getByText("samples: reward").waitFor();
  await page.locator("#rollout-table").getByText("r1-p0-c0", { exact: true }).last().click();
  await page.waitForFunction(() => document.querySelector("#pick-a textarea")?.value === "r1-p0-c0");
  await page.locator("#rollout-table").getByText("r1-p0-c1", { exact: true }).last().click();
  await page.waitForFunction(() => document.querySelector("#pick-b textarea")?.value === "r1-p0-c1");
  await page.locator("#rollout-pair [data-slot='B'][data-id='r1-p0-c1']").waitFor();
  await page.locator("#label-a").click();
  await page.locator("#label-msg").getByText("labelled r1-p0-c0 better than r1-p0-c1").waitFor();
  await page.locator("#suggest-pair").click();
  await page.waitForFunction(() => {
    const a = document.querySelector("#pick-a textarea")?.value;
    return a && a !== "r1-p0-c0";
  });
  await page.locator("#label-b").click();
  await page.locator("#label-msg").getByText("better than").filter({ hasNotText: "r1-p0-c0 better" }).waitFor();
  await shot("rollouts");

  // Train on this feedback: a DPO recipe from runs/rs-run on the snapshot, opened in Recipes.
  await page.locator("#train-on-feedback").click();
  await waitYaml(page, (t) => t.includes("stage: dpo") && t.includes("feedback/snapshots/feedback-"), "the DPO recipe");
  await setNumber(page, "max-steps", "2");
  await waitYaml(page, (t) => t.includes("max_steps: 2"), "max_steps: 2");
  await waitValidation(page, "ok");
  await shot("recipes");

  // Runs: launch it (the name is prefilled from its parent), wait, see where it comes from.
  await openTab(page, "Runs");
  const name = await page.locator("#run-name textarea").inputValue();
  if (!name.startsWith("dpo-rs-run-")) throw new Error(`run name not prefilled: ${name}`);
  await page.locator("#launch").click();
  await page.locator("#launch-msg").getByText(`launched run ${name}`).waitFor();
  await waitRun(page, "completed", 240_000);
  await page.locator("#run-lineage").getByText("trained on feedback snapshot").waitFor();
  await page.locator("#run-lineage").getByText("started from runs/rs-run").waitFor();
  await shot("runs");

  // Compare with its parent: Evaluate with both models and the RS run's reward as the judge.
  await clickUntil(page, "compare-parent", page.locator("#eval-msg").getByText("with its parent runs/rs-run"));
  await page.locator("#eval-models").getByText(`runs/${name}`, { exact: true }).filter({ visible: true }).first().waitFor();
  await page.locator("#eval-models").getByText("runs/rs-run", { exact: true }).filter({ visible: true }).first().waitFor();
  await page.waitForFunction(() => document.querySelector("#eval-judge input")?.value === "runs/rs-run/recipe.yaml");
  await page.locator("#eval-n input").fill("3");
  await page.locator("#compare").click();
  await page.locator("#win-matrix").getByText(/^\d+ \/ \d+ \/ \d+$/).filter({ visible: true }).first().waitFor({ timeout: 180_000 });
  await page.locator("#win-matrix").getByText(`runs/${name}`, { exact: true }).filter({ visible: true }).first().waitFor();
  await page.locator("#win-chart").waitFor();
  await page.locator("#compare-summary").getByText("mean score").waitFor();
  await shot("evaluate");

  // Chat & compare: both already selected; side by side.
  await openTab(page, "Chat & compare");
  await page.locator("#chat-models").getByText("runs/rs-run", { exact: true }).filter({ visible: true }).first().waitFor();
  await page.locator("#chat-message textarea").fill("What is 2 + 3?");
  await page.locator("#chat-send").click();
  await page.locator("#chat-status").getByText("all 2 answers are in").waitFor({ timeout: 120_000 });
  await shot("chat");

  // Feedback: the snapshot the DPO learned from, and a TRL export.
  await openTab(page, "Feedback");
  await page.locator("#fb-snapshots").getByText(/^feedback-\d{8}-\d{6}-[0-9a-f]{8}$/).filter({ visible: true }).first().waitFor();
  await page.locator("#fb-export").click();
  await page.locator("#fb-export-msg").getByText("TRL preference format").waitFor();
  await page.locator("#fb-file").getByText(/preferences-trl-.*\.jsonl/).filter({ visible: true }).first().waitFor();
  await shot("feedback");
}).catch((err) => {
  console.error(err);
  process.exit(1);
});
