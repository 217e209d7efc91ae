"""Scale-out: multi-process re-launch (accelerate / DeepSpeed), DeepSpeed configs generated from the
recipe, and `llmtune plan` (what a run will cost before any model loads).

Nothing in this package imports torch at module level: `llmtune plan` and the re-launching parent
process must start instantly.
"""
