"""An llmtune reward model's held-out accuracy on exactly the pairs a plain TRL run keeps.

TRL's RewardTrainer drops every pair whose raw transcript plus its EOS token is longer than
max_length, in training and in evaluation, so `rm_trl_baseline.py` reports accuracy on a subset of
the held-out pairs. This script scores an llmtune rm run on all held-out pairs (the same split:
data, eval_fraction and seed as the recipe) and on the subset TRL keeps at each given max_length,
counted with the same tokenizer, so the two accuracies can be compared pair for pair.

    python benchmarks/rm_same_pairs.py RUN_DIR --seed 42 --max-length 128 512
"""

from __future__ import annotations

import argparse
import gzip
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def squeeze(text: str) -> str:
    return "".join(text.split())


def hh_transcript(row: dict) -> str:
    """The raw HH text of a canonical row's chosen side (whitespace aside), to find its raw line."""
    turns = row["prompt"] + row["chosen"]
    return "".join(f"Human: {m['content']}" if m["role"] == "user" else f"Assistant: {m['content']}" for m in turns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="llmtune rm run directory (or its model directory)")
    ap.add_argument("--data", default="../shared/data/hh-harmless-sample.jsonl.gz", help="raw HH jsonl(.gz)")
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=42, help="the run's training.seed (it picks the held-out pairs)")
    ap.add_argument("--max-length", type=int, nargs="+", default=[512], help="TRL max_length values to compare with")
    args = ap.parse_args()

    from rm_trl_baseline import held_out, minilm_dir  # this script's neighbour in benchmarks/
    from transformers import AutoTokenizer

    from llmtune.config.schema import RewardSection
    from llmtune.eval.reward_accuracy import UNCAPPED, preference_rows
    from llmtune.rewards.reward_model import RewardModelScorer, split_pair

    # The baseline's tokenizer and held-out indices, and TRL's length rule (transcript + EOS).
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    opener = gzip.open if args.data.endswith(".gz") else open
    with opener(args.data, "rt") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    held = held_out(len(raw), args.eval_fraction, args.seed)
    trl_length = {squeeze(raw[i]["chosen"]): max(len(tok(raw[i][side], verbose=False)["input_ids"]) + 1
                                                  for side in ("chosen", "rejected")) for i in held}

    rows = preference_rows("hh", args.data, eval_fraction=args.eval_fraction, seed=args.seed)
    lengths = [trl_length[squeeze(hh_transcript(r))] for r in rows]
    scorer = RewardModelScorer(RewardSection(type="reward_model", model=args.run, batch_size=32, max_length=UNCAPPED))
    pairs = [split_pair(r) for r in rows]
    prompts = [p for p, _, _ in pairs]
    scores = scorer.score(prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs])
    wins = [c > r for c, r in zip(scores[:len(pairs)], scores[len(pairs):], strict=True)]

    def accuracy(keep: list[bool]) -> dict[str, float | int]:
        kept = [w for w, k in zip(wins, keep, strict=True) if k]
        return {"accuracy": round(sum(kept) / max(1, len(kept)), 4), "n": len(kept)}

    print(json.dumps({"run": args.run, "split_seed": args.seed, "all": accuracy([True] * len(wins)),
                      "pairs_trl_keeps": {str(m): accuracy([n <= m for n in lengths]) for m in args.max_length}}))


if __name__ == "__main__":
    main()
