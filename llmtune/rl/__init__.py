"""Online RL on transformers + peft + accelerate, causal and seq2seq: one loop (rollout → score →
advantage → clipped update) for PPO, GRPO, RLOO and REINFORCE++.

core.py      the maths (KL estimators, GAE, group and leave-one-out baselines, REINFORCE++ returns,
             clipped losses, loss aggregation, KL controllers), pure tensors
rollout.py   the Trajectory record and the forward pass that scores its tokens (policy, reference)
value.py     the critic of algorithm ppo (value head on the policy trunk, or a separate value model)
heldout.py   greedy answers to held-out prompts, scored: what a run reports as held-out reward
plot.py      the reward-curve PNG
The training loop itself is `llmtune.stages.rl`.
"""
