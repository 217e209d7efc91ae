"""llmtune's web UI (Gradio): recipes, runs, side-by-side chat with feedback, and evaluation.

It drives the same recipes, `llmtune train` processes and run directories as the command line;
start it with `llmtune webui`. See webui/README.md for the tabs and the scriptable API endpoints.
"""
