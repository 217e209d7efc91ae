"""Recipes: loading (YAML, inheritance, overrides) and the one schema that validates them."""

from llmtune.config.load import load_recipe

__all__ = ["load_recipe"]
