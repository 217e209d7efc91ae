"""Our PPO for RLHF/RLAIF on transformers + peft + accelerate, causal and seq2seq.

core.py    the maths (KL penalty, KL controllers, GAE, whitening, clipped losses), pure tensors
rollout.py sampling and per-token log-probs/values/reference log-probs
value.py   the critic (value head on the policy trunk, or a separate value model)
plot.py    the reward-curve PNG
The training loop itself is `llmtune.stages.ppo`.
"""
