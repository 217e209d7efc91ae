"""Data layer: a registry of named datasets, raw-format readers and converters into TRL's
conversational shapes (sft, preference, prompt), and weighted mixing with held-out eval rows."""
