// Drives the llmtune web UI like a person would, in Debian's chromium through playwright-core, and checks
// the rough edges issue 18 found: a mistyped recipe name (one toast, no error pills over the form), form
// edits that keep the YAML's comments and number spellings, a cleared field that falls back to its
// default, ok/error validation states, a live plot that picks up eval_loss mid-run, and the ranking box
// hidden for two models. Then chat with two models side by side, vote, and compare.
// Usage: node webui.js URL SCREENSHOT_DIR RUN_NAME   (run by tests/test_webui_browser.py; the test has
// written WORKSPACE/recipes/sft-eval.yaml: sft-tiny with an evaluation at step 150)
const { step, withPage, openTab, chooseOption, addChoices, setNumber, yamlText, waitYaml, waitValidation,
  waitRun } = require("./lib");

const [url, shots, runName] = process.argv.slice(2);

withPage(url, shots, "basic-", async (page, shot) => {
  // Recipes: a recipe loads on open (the quickstart); pick the tiny SFT one.
  await waitYaml(page, (t) => t.includes("stage:"), "the recipe shown on open");
  await chooseOption(page, "recipe-pick", "shipped/sft-tiny.yaml");
  await waitYaml(page, (t) => t.includes("tiny-llama") && t.includes("output_dir: runs/sft-tiny"), "sft-tiny");
  await waitValidation(page, "ok");

  // A mistyped recipe name: one message, on the action's own line; the form and editor keep no pills.
  const pick = page.locator("#recipe-pick input");
  await pick.click();
  await pick.fill("shipped/sft-tiyn.yaml");
  await page.locator("#load-recipe").click();
  await page.getByText("no such file: shipped/sft-tiyn.yaml").first().waitFor();
  await page.waitForTimeout(2000); // a second toast (the old double event) would be here by now
  const toasts = await page.getByText("no such file: shipped/sft-tiyn.yaml").count();
  const pills = await page.locator("#recipe-yaml .error, #max-steps .error, #batch-size .error, #form-model .error")
    .count();
  if (toasts !== 1 || pills !== 0) throw new Error(`mistyped recipe: ${toasts} messages, ${pills} error pills on the form`);
  if (!(await yamlText(page)).includes("tiny-llama")) throw new Error("the mistyped name replaced the recipe");
  step("mistyped recipe: one message, no pills");

  // The test's recipe; form edits keep its comments and how its numbers are written.
  await chooseOption(page, "recipe-pick", "recipes/sft-eval.yaml");
  await waitYaml(page, (t) => t.includes("eval_steps: 150"), "the sft-eval recipe");
  await page.locator("#recipe-hint").filter({ hasText: "CPU quickstart" }).waitFor();
  await setNumber(page, "max-steps", "160");
  await waitYaml(page, (t) => t.includes("max_steps: 160"), "max_steps: 160");
  const edited = await yamlText(page);
  for (const kept of ["# written by the browser test", "learning_rate: 3.0e-3   # as typed", "epochs: 4"]) {
    if (!edited.includes(kept)) throw new Error(`a form edit lost "${kept}":\n${edited}`);
  }
  // Clearing a field removes its key: the YAML and the form both fall back to the default (batch_size 4).
  await setNumber(page, "batch-size", "");
  await waitYaml(page, (t) => !t.includes("batch_size"), "batch_size removed");
  await page.waitForFunction(() => document.querySelector("#batch-size input")?.value === "4");
  // Validation says ok in green and errors in red.
  await waitValidation(page, "ok");
  await setNumber(page, "epochs", "0");
  await waitValidation(page, "error");
  await page.locator("#validation-result").getByText("training.epochs").waitFor();
  await setNumber(page, "epochs", "4");
  await waitValidation(page, "ok");
  await waitYaml(page, (t) => /\n  epochs: 4 *\n/.test(t + "\n"), "epochs: 4 written as typed");
  await shot("recipes");

  // Runs: launch; the live plot draws loss, then picks up eval_loss (step 150) without reselecting the run.
  await openTab(page, "Runs");
  await page.locator("#run-name input, #run-name textarea").first().fill(runName);
  await page.locator("#launch").click();
  await page.locator("#launch-msg").getByText(`launched run ${runName}`).waitFor();
  await page.locator("#loss-plot").getByText("no metrics logged yet").first().waitFor();
  step("launched; waiting for the first points");
  await page.locator("#loss-chart[data-series='loss']").waitFor({ timeout: 240_000 });
  step("loss drawn; waiting for eval_loss on the live plot");
  await page.locator("#loss-chart[data-series='loss,eval_loss']").waitFor({ timeout: 240_000 });
  await page.locator("#loss-plot svg").getByText("eval_loss", { exact: true }).waitFor();
  await waitRun(page, "completed", 240_000);
  await page.locator("#runs-table").getByText(runName, { exact: true }).filter({ visible: true }).first().waitFor();
  await shot("runs");

  // Chat & compare: the new run against the untrained base; two models get A/Tie/B, no ranking box.
  await openTab(page, "Chat & compare");
  await addChoices(page, "chat-models", [`runs/${runName}`, "tiny-llama"]);
  await page.locator("#vote-a").waitFor();
  if (await page.getByText(/^Ranking/).filter({ visible: true }).count()) {
    throw new Error("the ranking box shows for two models");
  }
  await page.locator("#chat-message textarea").fill("Hello! Can you tell me a story?");
  await page.locator("#chat-send").click();
  await page.locator("#chat-status").getByText("all 2 answers are in").waitFor({ timeout: 120_000 });
  for (const slot of ["A", "B"]) {
    await page.locator(`#answer-${slot}`).getByText("Hello! Can you tell me a story?").first().waitFor();
  }
  await page.locator("#vote-a").click();
  await page.locator("#vote-msg").getByText("recorded").waitFor();
  await page.locator("#feedback-counter").getByText(/^1 preference pairs collected/).waitFor();
  await shot("chat");

  // Evaluate: `llmtune compare` of the same two models on two held-out demo prompts.
  await openTab(page, "Evaluate");
  await addChoices(page, "eval-models", [`runs/${runName}`, "tiny-llama"]);
  await page.locator("#eval-n input").fill("2");
  await page.locator("#compare").click();
  await page.locator("#compare-table").getByText(`runs/${runName}`, { exact: true }).filter({ visible: true })
    .first().waitFor({ timeout: 180_000 });
  await page.locator("#compare-summary").getByText("No judge").waitFor();
  await shot("evaluate");
}).catch((err) => {
  console.error(err);
  process.exit(1);
});
