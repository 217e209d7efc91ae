"""`llmtune eval policy`: did RL make the policy better, and how far did it move?

Both models answer the same held-out prompts with the same sampling settings and seed; a reward
source scores every answer. The result: mean reward of each, win/tie/loss of the model against the
baseline per prompt, and KL(model || baseline) estimated on the model's own samples as the mean over
responses of sum_t [log p_model(y_t) - log p_baseline(y_t)], over exactly the tokens the model sampled
(re-tokenising the decoded text would score an end-of-turn the model never produced when a response
hit max_new_tokens, and bias the estimate).

SOURCE (--reward): the reward-source syntax of `llmtune.rewards.source` (rule:module:function,
classifier:PATH, a reward YAML/JSON file, or a reward-model run directory).
"""

from __future__ import annotations

from typing import Any

from llmtune.config.schema import GenerationSection, RewardSection
from llmtune.errors import ConfigError
from llmtune.rewards.source import parse_source


def reward_section(source: str) -> RewardSection:
    """Parse the --reward SOURCE syntax (shared with `compare --judge`)."""
    return parse_source(source, "--reward")


def compare(model_ref: str, baseline_ref: str, prompts: list[list[dict[str, str]]], reward: Any,
            gen: GenerationSection, seed: int = 0, max_prompt_length: int = 256,
            batch_size: int = 8, tie_margin: float = 1e-6) -> dict[str, Any]:
    """Generate with both models, score, and measure KL on the model's samples. Prompt i is sampled
    with seed + i by both (`sample_rows`), so an answer does not depend on the batching and a model
    compared with itself ties everywhere."""
    import torch

    from llmtune.data.templates import ChatTemplate, encode_prompt
    from llmtune.modeling.generate import row_spec, sample_rows, token_logprobs
    from llmtune.modeling.load import load_for_inference

    model, tok, spec = load_for_inference(model_ref)
    base, base_tok, base_spec = load_for_inference(baseline_ref)
    if spec.kind != base_spec.kind or len(tok) != len(base_tok):
        raise ConfigError(f"--baseline: '{baseline_ref}' ({base_spec.kind}, {len(base_tok)} tokens) cannot be "
                          f"compared token by token with '{model_ref}' ({spec.kind}, {len(tok)} tokens)")
    kind = spec.kind
    template = ChatTemplate.get(spec.template)
    rows = [row_spec(gen, seed + i, template.stop) for i in range(len(prompts))]
    answers: dict[str, list[str]] = {}
    tokens: list[tuple[list[int], list[int]]] = []  # the model's (prompt, response) token ids
    for name, (m, t) in {"model": (model, tok), "baseline": (base, base_tok)}.items():
        m.eval()
        ids = [encode_prompt(t, template, p, max_prompt_length, kind) for p in prompts]
        answers[name] = []
        for i in range(0, len(prompts), batch_size):
            with torch.inference_mode():
                s = sample_rows(m, t, kind, ids[i:i + batch_size], rows[i:i + batch_size])
            answers[name] += s.texts
            if name == "model":
                tokens += [(ids[i + j], s.response_ids[j][s.response_mask[j].bool()].tolist()) for j in range(len(s.texts))]
    scores = {name: [float(s) for s in reward.score(prompts, texts)] for name, texts in answers.items()}
    wins = sum(a > b + tie_margin for a, b in zip(scores["model"], scores["baseline"]))
    losses = sum(b > a + tie_margin for a, b in zip(scores["model"], scores["baseline"]))

    def response_logprob(m: Any, prompt: list[int], response: list[int]) -> float:
        values, _ = token_logprobs(m, kind, prompt, response, decoder_start_id=getattr(m.config, "decoder_start_token_id", None))
        return sum(values[-len(response):]) if response else 0.0

    kl = [response_logprob(model, p, r) - response_logprob(base, p, r) for p, r in tokens]
    n = len(prompts)
    return {
        "model": model_ref, "baseline": baseline_ref, "n": n,
        "reward_model_mean": sum(scores["model"]) / n, "reward_baseline_mean": sum(scores["baseline"]) / n,
        "wins": wins, "ties": n - wins - losses, "losses": losses, "win_rate": wins / n,
        "kl_model_baseline": sum(kl) / n,
        "examples": [{"prompt": p, "model": a, "model_reward": sa, "baseline": b, "baseline_reward": sb}
                     for p, a, sa, b, sb in list(zip(prompts, answers["model"], scores["model"],
                                                     answers["baseline"], scores["baseline"]))[:3]],
    }
