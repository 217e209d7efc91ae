"""Reference PPO throughput: TRL 0.11.4's classic PPOTrainer on the same workload as
benchmarks/ppo_throughput.py (the same SFT model and tokenizer, LoRA r=16, 16 rollouts per step,
minibatches of 8, 2 PPO epochs, 16 sampled tokens, fixed KL 0.05, lr 1e-2, the PPO quickstart's
prompts and reward: the `arithmetic` train split scored by `numeric_answer`). Runs in its own
virtualenv because TRL 0.11 needs transformers 4.x:

    bash benchmarks/setup_trl011.sh /tmp/trl011
    OMP_NUM_THREADS=1 /tmp/trl011/bin/python benchmarks/ppo_trl011_baseline.py --model runs/ppo-quickstart/sft/model

Prints one JSON object with the same fields as ppo_throughput.py. It imports nothing from llmtune
(llmtune needs transformers 5): the reward is llmtune/rewards/rules.py loaded by path, and prompts
are the problems' questions in the model's chat format (--template llama2: the tiny Llama's [INST]
format; chatml: SmolLM2's), as llmtune's templates render a single user turn.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "llmtune" / "data" / "demo" / "arithmetic" / "train.jsonl"


def numeric_answer() -> Any:
    """llmtune.rewards.rules:numeric_answer itself, loaded by path (llmtune is not installed here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rules", ROOT / "llmtune" / "rewards" / "rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.numeric_answer


TEMPLATES = {"llama2": "<s>[INST] {q} [/INST]",
             "chatml": "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"}


def problems(template: str) -> list[tuple[str, int]]:
    """(prompt rendered as llmtune's template renders a single user turn, gold answer) per problem of the
    train split."""
    rows = [json.loads(line) for line in TASK.read_text().splitlines() if line.strip()]
    return [(TEMPLATES[template].format(q=r["messages"][0]["content"]), r["answer"]) for r in rows]


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer.json with its special tokens. transformers 5 saves the tokenizer class as
    `TokenizersBackend`, which transformers 4 cannot resolve, so build the fast tokenizer directly."""
    from transformers import PreTrainedTokenizerFast

    cfg_file = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    special = {k: cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                  **{k: v for k, v in special.items() if isinstance(v, str)})
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a causal LM directory (the SFT quickstart's model/)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mini-batch-size", type=int, default=8)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--template", choices=sorted(TEMPLATES), default="llama2")
    args = ap.parse_args()

    import torch
    import trl
    from peft import LoraConfig
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tok = load_tokenizer(Path(args.model))
    tok.padding_side = "left"
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = AutoModelForCausalLMWithValueHead.from_pretrained(args.model, peft_config=lora)
    config = PPOConfig(learning_rate=args.learning_rate, batch_size=args.batch_size,
                       mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs, adap_kl_ctrl=False,
                       init_kl_coef=0.05, max_grad_norm=1.0, seed=args.seed, log_with=None)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok)  # LoRA: reference = adapters off
    gen = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": 1, "do_sample": True, "top_k": 0,
           "top_p": 1.0, "temperature": 1.0, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    pool = problems(args.template)
    reward = numeric_answer()
    rng = random.Random(args.seed)
    steps = []
    for _ in range(args.steps):
        started = time.perf_counter()
        batch = [rng.choice(pool) for _ in range(args.batch_size)]
        queries = [tok(p, add_special_tokens=False, return_tensors="pt").input_ids[0] for p, _ in batch]
        responses = trainer.generate(queries, return_prompt=False, batch_size=args.batch_size, **gen)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        scores = [torch.tensor(reward([], t.strip(), answer)) for t, (_, answer) in zip(texts, batch)]
        stats = trainer.step(queries, responses, scores)
        elapsed = time.perf_counter() - started
        tokens = sum(len(r) for r in responses)
        steps.append({"reward_mean": float(sum(scores) / len(scores)), "kl": float(stats["objective/kl"]),
                      "samples_per_s": len(batch) / elapsed, "tokens_per_s": tokens / elapsed, "step_s": elapsed})
        print(f"trl step {len(steps)}: reward={steps[-1]['reward_mean']:.3f} kl={steps[-1]['kl']:.3f} "
              f"samples/s={steps[-1]['samples_per_s']:.1f}", flush=True)
    timed = steps[1:] or steps
    tenth = max(1, len(steps) // 10)
    print(json.dumps({
        "implementation": f"trl {trl.__version__} PPOTrainer", "model": args.model, "finetuning": "lora",
        "steps": len(steps), "rollout_batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
        "ppo_epochs": args.ppo_epochs, "max_new_tokens": args.max_new_tokens,
        "samples_per_s": statistics.median(s["samples_per_s"] for s in timed),
        "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed),
        "step_s": statistics.median(s["step_s"] for s in timed),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reward_first_tenth": sum(s["reward_mean"] for s in steps[:tenth]) / tenth,
        "reward_last_tenth": sum(s["reward_mean"] for s in steps[-tenth:]) / tenth,
        "kl_last_tenth": sum(s["kl"] for s in steps[-tenth:]) / tenth,
    }, indent=2))


if __name__ == "__main__":
    main()
