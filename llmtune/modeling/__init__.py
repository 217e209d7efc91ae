"""Model loading (base, LoRA, QLoRA, full) and heads used by the stages and the server."""
