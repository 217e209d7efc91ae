"""How far a frozen MiniLM gets on the HH pairs: a reference point for recipes/rm-minilm-hh.yaml.

Encodes every pair exactly as the rm stage does (same split, same [CLS] conversation [SEP] response
[SEP] inputs at data.max_length), takes the frozen encoder's mean token state over the whole input
and over the response tokens only, and fits a Bradley–Terry linear head on the chosen − rejected
feature differences (L2-regularised logistic regression, LBFGS). Prints one JSON line per split and
feature set with the held-out pairwise accuracy. If fine-tuning barely beats this, the recipe is near
what the model and the 1,440 pairs allow; if it falls below, the fine-tune is hurting the features.
`--train-fractions` fits the probe on random parts of the training pairs too (a learning curve: mean
over 5 draws), which says whether more pairs of this kind would still help.

    python benchmarks/rm_minilm_probe.py --data ../shared/data/hh-harmless-sample.jsonl.gz --seeds 42 1 2
    python benchmarks/rm_minilm_probe.py --seeds 42 1 2 3 4 --l2 0.006 --train-fractions 0.25 0.5 0.75 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def differences(rows: list, model: Any, tok: Any, template: Any, max_length: int) -> dict[str, Any]:
    """chosen − rejected frozen features per pair: {'all': mean over every token, 'response': over the
    response segment (token_type_ids 1)}."""
    import torch

    from llmtune.rewards.reward_model import collate, encode_reward_input, split_pair

    backbone = model.backbone if hasattr(model, "backbone") else model.base_model
    out: dict[str, list[torch.Tensor]] = {"all": [], "response": []}
    for i in range(0, len(rows), 32):
        encoded = []
        for row in rows[i:i + 32]:
            prompt, chosen, rejected = split_pair(row)
            encoded += [encode_reward_input(tok, template, "encoder", prompt, text, max_length)
                        for text in (chosen, rejected)]
        batch = collate(encoded, tok.pad_token_id)
        with torch.no_grad():
            states = backbone(**batch).last_hidden_state
        for name, mask in (("all", batch["attention_mask"]),
                           ("response", batch["attention_mask"] * batch["token_type_ids"])):
            m = mask.unsqueeze(-1).float()
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
            out[name].append(pooled[0::2] - pooled[1::2])
    return {k: torch.cat(v) for k, v in out.items()}


def fit_probe(d: Any, l2: float) -> Any:
    """Weights w minimising mean(-log σ(d·w)) + l2·|w|² (Bradley–Terry on feature differences)."""
    import torch
    from torch.nn.functional import softplus

    w = torch.zeros(d.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = softplus(-(d @ w)).mean() + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/hh-harmless-sample.jsonl.gz", help="raw HH jsonl(.gz)")
    ap.add_argument("--recipe", default="recipes/rm-minilm-hh.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="split seeds (training.seed)")
    ap.add_argument("--l2", type=float, nargs="+", default=[0.002, 0.006, 0.02],
                    help="penalties on |w|^2 added to the mean pairwise loss")
    ap.add_argument("--train-fractions", type=float, nargs="+", default=[1.0],
                    help="fit on this share of the training pairs (below 1: mean over 5 random draws)")
    args = ap.parse_args()
    import torch

    from llmtune.config.load import load_recipe
    from llmtune.data.templates import ChatTemplate
    from llmtune.modeling.load import load_for_training
    from llmtune.stages.common import data_rows

    model = None
    for seed in args.seeds:
        start = time.time()
        recipe = load_recipe(args.recipe, [f"data.path={args.data}", f"training.seed={seed}"])
        train_rows, eval_rows = data_rows(recipe, "preference")
        if model is None:
            model, tok, spec = load_for_training(recipe, head="classifier")
            model.eval()
            template = ChatTemplate.get(spec.template)
        train_d, eval_d = (differences(rows, model, tok, template, recipe.data.max_length)
                           for rows in (train_rows, eval_rows))
        for name in ("all", "response"):
            for l2 in args.l2:
                for fraction in args.train_fractions:
                    n = len(train_rows)
                    draws = [torch.arange(n)] if fraction >= 1 else [
                        torch.randperm(n, generator=torch.Generator().manual_seed(k))[:round(fraction * n)]
                        for k in range(5)]
                    accuracy = sum(((eval_d[name] @ fit_probe(train_d[name][idx], l2)) > 0).float().mean().item()
                                   for idx in draws) / len(draws)
                    print(json.dumps({"probe": f"frozen MiniLM, mean over {name} tokens", "split_seed": seed,
                                      "l2": l2, "train_pairs": len(draws[0]), "eval_accuracy": round(accuracy, 4),
                                      "eval_pairs": len(eval_rows), "wall_s": round(time.time() - start, 1)}),
                          flush=True)


if __name__ == "__main__":
    main()
