"""The critic-free estimators and the loss options of online RL against values computed by hand, and
GRPO against TRL 1.16's own GRPOTrainer on identical tensors (its code paths, not a re-implementation)."""

from __future__ import annotations

import math
import statistics
import tempfile

import pytest
import torch

from llmtune.rl import core


def test_kl_estimators() -> None:
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])          # r = log p - log p_ref = 0.5, -1.0
    assert core.kl_estimate(logp, ref, "k1").tolist()[0] == pytest.approx([0.5, -1.0])
    assert core.kl_estimate(logp, ref, "k2").tolist()[0] == pytest.approx([0.125, 0.5])
    assert core.kl_estimate(logp, ref, "k3").tolist()[0] == pytest.approx([math.exp(-0.5) - 1 + 0.5,
                                                                          math.exp(1.0) - 1 - 1.0])
    assert (core.kl_estimate(torch.randn(4, 5), torch.randn(4, 5), "k3") >= 0).all()


def test_group_advantages_by_hand() -> None:
    scores = torch.tensor([1.0, 0.0, 0.5, 0.0, 3.0, 1.0])
    adv = core.group_advantages(scores, group=3)
    first, second = [1.0, 0.0, 0.5], [0.0, 3.0, 1.0]
    expected = [(x - statistics.mean(g)) / (statistics.stdev(g) + 1e-4) for g in (first, second) for x in g]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # Dr. GRPO: the mean only
    assert core.group_advantages(scores, 3, scale=False).tolist() == pytest.approx([0.5, -0.5, 0.0, -4 / 3, 5 / 3, -1 / 3])


def test_group_of_one_and_zero_variance_groups_give_zero_not_nan() -> None:
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 2.0])
    adv = core.group_advantages(scores, group=3)
    assert torch.isfinite(adv).all()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]          # every response of the group scored the same
    assert core.zero_variance(scores, 3).tolist() == [True, True, True, False, False, False]
    for estimator in (core.group_advantages, core.leave_one_out_advantages):
        single = estimator(torch.tensor([0.3, -2.0]), 1)
        assert single.tolist() == [0.0, 0.0]              # a group of one has nothing to compare with


def test_leave_one_out_baseline_by_hand() -> None:
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0])
    adv = core.leave_one_out_advantages(scores, group=4)
    # r_i - mean of the other three
    assert adv.tolist() == pytest.approx([1 - 2.5 / 3, 0 - 3.5 / 3, 0.5 - 3 / 3, 2 - 1.5 / 3])
    assert adv.sum().item() == pytest.approx(0.0, abs=1e-6)  # sum_i r_i - (S - r_i) / (k - 1) = S - S


def test_reinforce_pp_returns_and_global_normalisation() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])   # the padded 9.0 must not leak in
    rewards = core.token_rewards(torch.tensor([1.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, -1.25, 0.0]]))
    returns = core.discounted_returns(rewards, mask, gamma=0.5)
    # G_t = r_t + 0.5 G_{t+1}
    row0 = [-0.05 + 0.5 * (-0.1 + 0.5 * 0.85), -0.1 + 0.5 * 0.85, 0.85]
    row1 = [-0.2 + 0.5 * -1.25, -1.25, 0.0]
    torch.testing.assert_close(returns, torch.tensor([row0, row1]))
    adv = core.reinforce_pp_advantages(rewards, mask, gamma=0.5)
    real = row0 + row1[:2]
    expected = [(x - statistics.mean(real)) / statistics.stdev(real) for x in real]
    assert [adv[0, 0], adv[0, 1], adv[0, 2], adv[1, 0], adv[1, 1]] == pytest.approx(expected, abs=1e-4)
    assert adv[1, 2].item() == 0.0


def test_clip_higher_lets_a_rising_token_go_further() -> None:
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.25, 0.7]]))
    adv = torch.tensor([1.0])                           # one advantage per response, broadcast over its tokens
    symmetric, _, clipped = core.policy_loss_per_token(new, old, adv, cliprange=0.2)
    assert symmetric.tolist()[0] == pytest.approx([-1.2, -0.7]) and clipped.tolist() == [[True, False]]
    higher, _, clipped = core.policy_loss_per_token(new, old, adv, cliprange=0.2, cliprange_high=0.28)
    assert higher.tolist()[0] == pytest.approx([-1.25, -0.7]) and not clipped.any()


def test_loss_aggregations_by_hand() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert core.aggregate(per_token, mask, "token_mean", 2, mask.sum(), 5).item() == pytest.approx(10 / 4)
    assert core.aggregate(per_token, mask, "sequence_mean", 2, mask.sum(), 5).item() == pytest.approx((2 + 4) / 2)
    assert core.aggregate(per_token, mask, "token_sum_norm", 2, mask.sum(), 5).item() == pytest.approx(10 / (2 * 5))
    # Micro-batches normalised by their minibatch's counts add up to the minibatch's loss.
    halves = sum(core.aggregate(per_token[i:i + 1], mask[i:i + 1], "token_mean", 2, 4, 5) for i in range(2))
    assert halves.item() == pytest.approx(10 / 4)


@pytest.fixture(scope="module")
def trl_grpo() -> dict:
    """TRL 1.16's GRPOTrainer on the tiny Llama: one generation batch (2 prompts x 4 completions) scored by a
    reward function with fixed values, through TRL's own `_generate_and_score_completions`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from llmtune.modeling.load import base_location
    from llmtune.registry.models import resolve_model

    torch.manual_seed(0)
    path = base_location(resolve_model("tiny-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    rewards = [1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, 2.0]  # the second group has no variance

    def reward(prompts: list, completions: list, **kwargs: object) -> list[float]:
        return rewards[:len(completions)]

    # Two prompts of the same token length: TRL's forward passes no position ids, so left padding would
    # shift its positions (ours are right under padding; that difference is not what this test is about).
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "What is 1 + 2?"}]},
                            {"prompt": [{"role": "user", "content": "What is 3 + 4?"}]}])
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=6, beta=0.04, epsilon=0.2, epsilon_high=0.28, num_iterations=2,
                      temperature=0.9, report_to="none", use_cpu=True, bf16=False, disable_dropout=True,
                      use_bias_correction_kl=False, logging_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer._generate_and_score_completions([ds[0]] * 4 + [ds[1]] * 4)
    assert (batch["prompt_mask"] == 1).all()
    return {"trainer": trainer, "batch": batch, "rewards": torch.tensor(rewards)}


def test_grpo_advantages_match_trl(trl_grpo: dict) -> None:
    ours = core.group_advantages(trl_grpo["rewards"], group=4)
    torch.testing.assert_close(ours, trl_grpo["batch"]["advantages"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("aggregation", "loss_type"), [("token_mean", "dapo"), ("sequence_mean", "grpo"),
                                                         ("token_sum_norm", "dr_grpo")])
def test_grpo_loss_matches_trl(trl_grpo: dict, aggregation: str, loss_type: str) -> None:
    """After an update has moved the policy (so ratios differ from 1 and clipping bites), TRL's
    `_compute_loss` and ours give the same loss: log-probs at the sampling temperature, clip-higher,
    k3 KL to the reference in the loss, each aggregation."""
    from types import SimpleNamespace

    from llmtune.rl.rollout import Scorer, keeps_logits

    trainer, batch = trl_grpo["trainer"], trl_grpo["batch"]
    model = trainer.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.loss_type = loss_type
    # Completions of different lengths make the aggregations differ.
    batch = dict(batch, completion_mask=batch["completion_mask"].clone())
    batch["completion_mask"][0, 3:] = 0
    batch["completion_mask"][5, 1:] = 0
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    theirs = trainer._compute_loss(model, batch)

    t = SimpleNamespace(query_ids=batch["prompt_ids"], query_mask=batch["prompt_mask"],
                        response_ids=batch["completion_ids"], response_mask=batch["completion_mask"])
    logprobs = Scorer("causal", None, 0.9, keeps_logits(model))(model, t)[0]
    per_token, ratio, _ = core.policy_loss_per_token(logprobs, batch["old_per_token_logps"],
                                                     core.group_advantages(trl_grpo["rewards"], 4), 0.2, 0.28)
    assert (ratio - 1).abs().max() > 0.05, "the policy moved: the ratios are not all 1"
    per_token = per_token + 0.04 * core.kl_estimate(logprobs, batch["ref_per_token_logps"], "k3")
    mask = batch["completion_mask"].float()
    ours = core.aggregate(per_token, mask, aggregation, 8, mask.sum(), 6)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
