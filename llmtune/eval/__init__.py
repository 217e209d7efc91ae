"""Evaluation of trained models: reward-model pairwise accuracy (`llmtune eval reward-accuracy`),
with more evaluations registered as further `llmtune eval` subcommands in `llmtune.eval.cli`."""
