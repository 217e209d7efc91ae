"""llmtune: one YAML recipe in, a trained, evaluated model you can chat with out."""

__version__ = "0.1.0"
