"""Does alignment measurably help? Every method of llmtune on a real model, SmolLM2-135M-Instruct, on 2 CPU
cores, each arm a plain llmtune recipe run through `llmtune.train.train` and then scored the same way.

Verifiable task (the bundled `arithmetic` set; held-out accuracy = greedy answers to the first 200 test
problems, 50 per level, scored by `numeric_answer`, with its standard error):
  base          SmolLM2-135M-Instruct as it ships
  sft           LoRA SFT on 800 of the train split's worked answers ("... = 12. The answer is 12.")
  rs            best-of-4 rejection sampling from sft on 120 prompts: the checker keeps a correct answer per
                prompt; one round
  dpo           DPO from sft on on-policy pairs: rs's samples, a correct and a wrong answer of the same prompt
  ppo, grpo, rloo, reinforce_pp
                online RL from sft with the checker as the reward, the same number of samples per step, LoRA
                (the reference, and the start of "KL to start", is sft)
HH (harmlessness; /work/shared/data/hh-harmless-sample.jsonl.gz split three ways by a seeded shuffle):
  rm_a, rm_b    MiniLM-L6 reward models on disjoint parts A and B (recipes/rm-minilm-hh.yaml)
  hh_ppo, hh_grpo
                online RL of SmolLM2-135M-Instruct (the start) on part A's prompts against rm_a; rm_b, which
                never saw A, is the judge: its mean score and win/tie/loss against the start on part C's
                held-out prompts (greedy answers)

Hyperparameters are fixed in ARMS below, chosen before any test-split number was seen (the dev split and the
tiny quickstarts informed them), and sized so that each arm stays within 20 minutes on 2 CPU cores shared with
other work (one thread: on an oversubscribed machine more threads make everything slower).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/alignment.py --out runs/alignment            # every arm
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/alignment.py --out runs/alignment grpo hh_ppo  # some arms
    python benchmarks/alignment.py --out runs/alignment --table            # the README table from the results

An arm whose result file exists is skipped (delete OUT/results/ARM.json to run it again); the arms an arm
starts from run first. Results: OUT/results/ARM.json, one per arm.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
HH = ROOT.parent / "shared" / "data" / "hh-harmless-sample.jsonl.gz"
CHECKER = {"type": "rule", "function": "llmtune.rewards.rules:numeric_answer"}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
EVAL_TOKENS = 48          # held-out answers (a worked answer takes about 20 tokens)
RL_TOKENS = 48
KL_PROMPTS = 50           # held-out prompts whose sampled answers estimate KL(arm || start)
HH_EVAL_PROMPTS = 100
TEST_ROWS = 200           # the first 200 of the 400 test problems (levels interleaved: 50 each)

# --- the arms ----------------------------------------------------------------------------------


def task_data(**extra: Any) -> dict[str, Any]:
    return {"name": "arithmetic", "max_length": 160, "max_prompt_length": 96, **extra}


def rl_arm(algorithm: str, steps: int, **rl: Any) -> dict[str, Any]:
    """Online RL from sft on the task, 32 answers per step in 2 minibatches."""
    section = {"algorithm": algorithm, "generation": {"max_new_tokens": RL_TOKENS, "temperature": 1.0},
               "sample_every": 5, **rl}
    return {"stage": "rl", "model": {"name": "@sft", "lora": LORA}, "data": task_data(),
            "training": {"max_steps": steps, "learning_rate": 1e-4, "lr_scheduler": "constant", "logging_steps": 1,
                         "save_steps": 1000, "seed": 42},
            "reward": CHECKER, "rl": section}


ARMS: dict[str, dict[str, Any]] = {
    "sft": {"stage": "sft", "model": {"name": MODEL, "lora": {**LORA, "dropout": 0.05}},
            "data": task_data(eval_split="dev", num_samples=800),
            "training": {"epochs": 1, "learning_rate": 2e-4, "batch_size": 8, "warmup_ratio": 0.05, "logging_steps": 20,
                         "save_steps": 1000, "seed": 42}},
    "rs": {"stage": "rs", "model": {"name": "@sft", "lora": {**LORA, "dropout": 0.05}},
           "data": task_data(num_samples=120), "reward": CHECKER,
           "rs": {"num_samples": 4, "threshold": 1.0, "generation_batch_size": 16,
                  "generation": {"max_new_tokens": RL_TOKENS, "temperature": 1.0}},
           "training": {"epochs": 2, "learning_rate": 1e-4, "batch_size": 8, "logging_steps": 10, "save_steps": 1000,
                        "seed": 42}},
    "dpo": {"stage": "dpo", "model": {"name": "@sft", "lora": {**LORA, "dropout": 0.05}},
            "data": {"path": "@pairs", "format": "canonical", "max_length": 160, "max_prompt_length": 96},
            "dpo": {"beta": 0.1},
            "training": {"epochs": 2, "learning_rate": 1e-4, "batch_size": 8, "logging_steps": 10, "save_steps": 1000,
                         "seed": 42}},
    "ppo": rl_arm("ppo", 12, rollout_batch_size=32, mini_batch_size=16, ppo_epochs=1, generation_batch_size=32),
    "grpo": rl_arm("grpo", 12, rollout_batch_size=4, num_generations=8, mini_batch_size=16, generation_batch_size=4,
                   kl_coef=0.04),
    "rloo": rl_arm("rloo", 12, rollout_batch_size=4, num_generations=8, mini_batch_size=16, generation_batch_size=4,
                   kl_coef=0.04),
    "reinforce_pp": rl_arm("reinforce_pp", 12, rollout_batch_size=32, mini_batch_size=16, generation_batch_size=32,
                           kl_coef=0.04),
    "rm_a": {"base": "rm-minilm-hh.yaml", "data": {"path": "@hh_a", "eval_fraction": 0.1}},
    "rm_b": {"base": "rm-minilm-hh.yaml", "data": {"path": "@hh_b", "eval_fraction": 0.1}},
}


def hh_arm(algorithm: str, steps: int, **rl: Any) -> dict[str, Any]:
    """Online RL of the instruct model on HH prompts against rm_a, rm_b scored beside it (monitoring only)."""
    return {"stage": "rl", "model": {"name": MODEL, "lora": LORA},
            "data": {"name": "hh", "path": "@hh_a", "max_length": 192, "max_prompt_length": 128},
            "training": {"max_steps": steps, "learning_rate": 1e-4, "lr_scheduler": "constant", "logging_steps": 1,
                         "save_steps": 1000, "seed": 42},
            "reward": {"type": "reward_model", "model": "@rm_a", "max_length": 256},
            "eval_reward": {"type": "reward_model", "model": "@rm_b", "max_length": 256},
            "rl": {"algorithm": algorithm, "generation": {"max_new_tokens": RL_TOKENS, "temperature": 1.0},
                   "sample_every": 5, **rl}}


ARMS["hh_ppo"] = hh_arm("ppo", 10, rollout_batch_size=16, mini_batch_size=8, ppo_epochs=1, generation_batch_size=16)
ARMS["hh_grpo"] = hh_arm("grpo", 10, rollout_batch_size=4, num_generations=4, mini_batch_size=8,
                         generation_batch_size=4, kl_coef=0.04)
TASK_ARMS = ["base", "sft", "rs", "dpo", "ppo", "grpo", "rloo", "reinforce_pp"]
HH_ARMS = ["hh_start", "hh_ppo", "hh_grpo"]
NEEDS = {"rs": ["sft"], "dpo": ["rs"], "ppo": ["sft"], "grpo": ["sft"], "rloo": ["sft"], "reinforce_pp": ["sft"],
         "hh_ppo": ["rm_a", "hh_start"], "hh_grpo": ["rm_a", "hh_start"], "hh_start": ["rm_b"]}

# --- running ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, out: Path):
        self.out = out
        (out / "results").mkdir(parents=True, exist_ok=True)

    def result_file(self, arm: str) -> Path:
        return self.out / "results" / f"{arm}.json"

    def done(self, arm: str) -> bool:
        return self.result_file(arm).exists()

    def refs(self) -> dict[str, str]:
        return {"@sft": str(self.out / "sft"), "@pairs": str(self.out / "dpo_pairs.jsonl"),
                "@hh_a": str(self.out / "hh" / "a.jsonl"), "@hh_b": str(self.out / "hh" / "b.jsonl"),
                "@rm_a": str(self.out / "rm_a"), "@rm_b": str(self.out / "rm_b")}

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        return self.refs().get(value, value) if isinstance(value, str) else value

    def smoke(self) -> None:
        """Shrink every arm to seconds on the tiny Llama: checks the whole chain, measures nothing."""
        global MODEL, KL_PROMPTS, HH_EVAL_PROMPTS, TEST_ROWS
        MODEL, KL_PROMPTS, HH_EVAL_PROMPTS, TEST_ROWS = "tiny-llama", 4, 8, 8
        for arm, spec in ARMS.items():
            spec.setdefault("training", {})["max_steps"] = 2
            if spec.get("model", {}).get("name") == "smollm2-135m-instruct":
                spec["model"]["name"] = MODEL
            if arm == "rs":
                spec["data"]["num_samples"] = 8

    def run(self, arm: str) -> None:
        for dep in NEEDS.get(arm, []):
            if not self.done(dep):
                self.run(dep)
        if self.done(arm):
            return
        print(f"== {arm}", flush=True)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        if arm in ("rm_a", "rm_b") or arm.startswith("hh"):
            split_hh(self.out / "hh")
        if arm == "dpo" and not write_pairs(self.out / "rs", self.out / "dpo_pairs.jsonl"):
            self.result_file(arm).write_text(json.dumps({"arm": arm, "skipped": "rs sampled no prompt with both a "
                                                         "correct and a wrong answer: no pairs"}) + "\n")
            return
        run_dir = None
        if arm in ARMS:
            run_dir = self.train(arm)
        trained_s = time.perf_counter() - started
        if arm in ("rm_a", "rm_b"):
            result = self.rm_result(arm)
        elif arm.startswith("hh"):
            result = self.hh_result(arm, run_dir)
        else:
            result = self.task_result(arm, run_dir)
        result.update(arm=arm, train_wall_s=round(trained_s, 1), total_wall_s=round(time.perf_counter() - started, 1),
                      load_avg_start=round(load, 2), load_avg_end=round(os.getloadavg()[0], 2),
                      recipe=ARMS.get(arm))
        if run_dir is not None:
            result.update(training_metrics(run_dir))
        self.result_file(arm).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "recipe"}), flush=True)

    def train(self, arm: str) -> Path:
        from llmtune.config.load import load_recipe, recipe_from_dict
        from llmtune.train import train

        spec = self.resolve(ARMS[arm])
        run_dir = self.out / arm
        if "base" in spec:  # a shipped recipe plus overrides
            overrides = [f"{k}.{kk}={vv}" for k, v in spec.items() if k != "base" for kk, vv in v.items()]
            recipe = load_recipe(str(ROOT / "recipes" / spec["base"]), overrides)
        else:
            recipe = recipe_from_dict(spec)
        info_file = run_dir / "run.json"
        done = info_file.exists() and json.loads(info_file.read_text()).get("status") == "completed"
        if not done:
            train(recipe, run_dir, force=True)
        return run_dir

    # -- scoring ----------------------------------------------------------------------------------
    def task_result(self, arm: str, run_dir: Path | None) -> dict[str, Any]:
        from llmtune.data.load import load_rows

        rows = load_rows("arithmetic", None, split="test", shape="prompt").rows[:TEST_ROWS]
        model_ref = MODEL if run_dir is None else str(run_dir)
        scored = score_model(model_ref, rows, CHECKER)
        acc = scored["reward_mean"]
        by_level: dict[int, list[float]] = {}
        for row, s in zip(rows, scored["scores"]):
            by_level.setdefault(row["level"], []).append(s)
        out = {"task": "arithmetic", "n": len(rows), "accuracy": acc, "se": math.sqrt(acc * (1 - acc) / len(rows)),
               "accuracy_by_level": {str(k): sum(v) / len(v) for k, v in sorted(by_level.items())},
               "example_answers": scored["answers"][:4]}
        if arm not in ("base", "sft"):
            out["kl_to_start"] = kl_to(model_ref, str(self.out / "sft"), rows[:KL_PROMPTS])
        elif arm == "sft":
            out["kl_to_start"] = 0.0
        return out

    def hh_result(self, arm: str, run_dir: Path | None) -> dict[str, Any]:
        rows = hh_eval_rows(self.out / "hh")
        judge = {"type": "reward_model", "model": str(self.out / "rm_b"), "max_length": 256}
        model_ref = MODEL if run_dir is None else str(run_dir)
        scored = score_model(model_ref, rows, judge)
        out: dict[str, Any] = {"task": "hh", "n": len(rows), "judge_mean": scored["reward_mean"],
                               "judge_se": statistics.stdev(scored["scores"]) / math.sqrt(len(rows)),
                               "example_answers": scored["answers"][:3]}
        if run_dir is not None:
            start = json.loads(self.result_file("hh_start").read_text())
            pairs = list(zip(scored["scores"], start["scores"]))
            out.update(wins=sum(a > b + 1e-6 for a, b in pairs), losses=sum(b > a + 1e-6 for a, b in pairs))
            out["ties"] = len(pairs) - out["wins"] - out["losses"]
            out["kl_to_start"] = kl_to(model_ref, MODEL, rows[:KL_PROMPTS])
        out["scores"] = scored["scores"]
        return out

    def rm_result(self, arm: str) -> dict[str, Any]:
        rows = [json.loads(line) for line in (self.out / arm / "metrics.jsonl").read_text().splitlines()]
        accuracy = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
        return {"task": "hh reward model", "eval_accuracy": accuracy[-1] if accuracy else None}


def score_model(model_ref: str, rows: list[dict[str, Any]], reward: dict[str, Any]) -> dict[str, Any]:
    """Greedy answers of MODEL_REF to ROWS, scored by the reward section REWARD."""
    import torch

    from llmtune.config.schema import GenerationSection, parse
    from llmtune.data.templates import ChatTemplate
    from llmtune.modeling.load import load_for_inference
    from llmtune.rewards import build_reward
    from llmtune.rl.heldout import heldout_scores

    section = parse({"stage": "rs", "model": {"name": "x"}, "data": {"name": "x"}, "reward": reward}).reward
    model, tok, spec = load_for_inference(model_ref)
    torch.manual_seed(0)
    return heldout_scores(model, tok, ChatTemplate.get(spec.template), spec.kind, rows, build_reward(section),
                          GenerationSection(max_new_tokens=EVAL_TOKENS), max_prompt_length=128, batch_size=32)


def kl_to(model_ref: str, start_ref: str, rows: list[dict[str, Any]]) -> float:
    """KL(model || start) estimated on the model's own samples (temperature 1): the mean over prompts of
    sum_t log p_model(y_t) - log p_start(y_t)."""
    import torch

    from llmtune.config.schema import GenerationSection
    from llmtune.data.templates import ChatTemplate
    from llmtune.modeling.generate import sample
    from llmtune.modeling.load import load_for_inference
    from llmtune.rl.rollout import Scorer, keeps_logits

    model, tok, spec = load_for_inference(model_ref)
    start, _, _ = load_for_inference(start_ref)
    scorer = Scorer(spec.kind, None, 1.0, keeps_logits(model))
    torch.manual_seed(0)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 25):
            s = sample(model, tok, ChatTemplate.get(spec.template), spec.kind, [r["prompt"] for r in rows[i:i + 25]],
                       GenerationSection(max_new_tokens=RL_TOKENS), 128)
            diff = (scorer(model, s)[0] - scorer(start, s)[0]) * s.response_mask
            total += diff.sum().item()
    return total / len(rows)


def training_metrics(run_dir: Path) -> dict[str, Any]:
    """Throughput and the last KL of an online-RL run (median over steps, the first excluded as warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "samples_per_s" in r][1:]
    if not steps:
        return {}
    out = {"samples_per_s": statistics.median(r["samples_per_s"] for r in steps), "steps": len(steps) + 1,
           "train_reward_first": statistics.mean(r["reward_mean"] for r in steps[:5]),
           "train_reward_last": statistics.mean(r["reward_mean"] for r in steps[-5:])}
    if "kl" in steps[-1]:
        out["train_kl_last"] = steps[-1]["kl"]
    if "eval_reward_mean" in steps[-1]:
        out.update(judge_first=statistics.mean(r["eval_reward_mean"] for r in steps[:5]),
                   judge_last=statistics.mean(r["eval_reward_mean"] for r in steps[-5:]))
    return out


def write_pairs(rs_dir: Path, out: Path) -> int:
    """DPO pairs from rs's on-policy samples: for each prompt with a correct and a wrong answer, the first
    correct one is chosen and the first wrong one rejected. Returns how many."""
    rows = []
    for line in (rs_dir / "rs" / "round-1" / "samples.jsonl").read_text().splitlines():
        s = json.loads(line)
        good = [r for r, x in zip(s["responses"], s["scores"]) if x >= 1.0]
        bad = [r for r, x in zip(s["responses"], s["scores"]) if x < 1.0]
        if good and bad:
            rows.append({"prompt": s["prompt"], "chosen": [{"role": "assistant", "content": good[0]}],
                         "rejected": [{"role": "assistant", "content": bad[0]}]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def split_hh(root: Path) -> None:
    """Parts A (600 pairs: rm_a and the policy's prompts), B (600: the judge) and C (the other 600: held-out
    prompts) of the HH sample, by a seeded shuffle; written once, outside the repository."""
    if (root / "c.jsonl").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(HH, "rt") as fh:
        lines = [line for line in fh if line.strip()]
    random.Random(1234).shuffle(lines)
    for name, part in (("a", lines[:600]), ("b", lines[600:1200]), ("c", lines[1200:])):
        (root / f"{name}.jsonl").write_text("".join(part))


def hh_eval_rows(root: Path) -> list[dict[str, Any]]:
    from llmtune.data.load import load_rows

    return load_rows("hh", str(root / "c.jsonl"), shape="prompt").rows[:HH_EVAL_PROMPTS]


# --- the table ----------------------------------------------------------------------------------


def table(out: Path) -> str:
    res = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    lines = ["| arm | held-out accuracy (200 test problems) | by level 1/2/3/4 | KL to start | train wall | samples/s |",
             "|---|---|---|---|---|---|"]
    for arm in TASK_ARMS:
        r = res.get(arm)
        if r is None or "skipped" in r:
            lines.append(f"| {arm} | not run{': ' + r['skipped'] if r else ''} | | | | |")
            continue
        levels = "/".join(f"{100 * v:.0f}" for v in r["accuracy_by_level"].values())
        kl = f"{r['kl_to_start']:.2f}" if "kl_to_start" in r else ""
        sps = f"{r['samples_per_s']:.1f}" if "samples_per_s" in r else ""
        wall = f"{r['train_wall_s'] / 60:.1f} min" if arm != "base" else ""
        lines.append(f"| {arm} | {100 * r['accuracy']:.1f} % ± {100 * r['se']:.1f} | {levels} | {kl} | {wall} | {sps} |")
    lines += ["", "| arm | judge (rm_b) mean on 100 held-out HH prompts | win / tie / loss vs start | KL to start | "
              "train wall | samples/s |", "|---|---|---|---|---|---|"]
    for arm in HH_ARMS:
        r = res.get(arm)
        if r is None:
            lines.append(f"| {arm} | not run | | | | |")
            continue
        wtl = f"{r['wins']} / {r['ties']} / {r['losses']}" if "wins" in r else ""
        kl = f"{r['kl_to_start']:.2f}" if "kl_to_start" in r else ""
        sps = f"{r['samples_per_s']:.1f}" if "samples_per_s" in r else ""
        wall = f"{r['train_wall_s'] / 60:.1f} min" if "samples_per_s" in r else ""
        lines.append(f"| {arm} | {r['judge_mean']:.3f} ± {r['judge_se']:.3f} | {wtl} | {kl} | {wall} | {sps} |")
    for rm in ("rm_a", "rm_b"):
        if rm in res:
            lines.append(f"\n{rm}: held-out pair accuracy {res[rm]['eval_accuracy']:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arms", nargs="*", help=f"arms to run (default all): {', '.join(TASK_ARMS + HH_ARMS)}")
    ap.add_argument("--out", default="runs/alignment", help="where runs and results go")
    ap.add_argument("--table", action="store_true", help="print the results table and exit")
    ap.add_argument("--smoke", action="store_true", help="every arm on the tiny Llama in seconds (checks the chain)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        print(table(out))
        return
    bench = Bench(out)
    if args.smoke:
        bench.smoke()
    for arm in args.arms or TASK_ARMS + HH_ARMS:
        bench.run(arm)
    print(table(out))


if __name__ == "__main__":
    main()
