"""Model registry (models.yaml) and the built-in tiny models."""
