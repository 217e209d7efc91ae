"""Run directories: the single place a run writes its recipe, status, metrics, checkpoints and model."""
