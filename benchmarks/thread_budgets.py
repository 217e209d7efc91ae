"""Thread budgets on a small CPU: a training run while a model is being chatted with, as in the web
UI (which serves chat in its own process while the runs it launched train).

Two sides, A/B alternating (default, budgets, then budgets, default, ...):
  default — both processes with torch's default threads (one per core each);
  budgets — the split `llmtune webui` applies (llmtune/launch/threads.py: webui_split): the chat
            server gets the UI's share, the run gets the rest.
Each measurement: start `llmtune serve` on the chat model, keep two clients chatting with it, run
`llmtune train RECIPE` to the end; report the run's wall time and the chat tokens/s meanwhile, with
the machine's load average. Prints JSON lines and a Markdown table of medians.

    python benchmarks/thread_budgets.py --recipe recipes/sft-tiny.yaml --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def env(threads: int | None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    if threads:
        out.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return out


def measure(recipe: str, model: str, chat_threads: int | None, run_threads: int | None, work: Path,
            overrides: list[str]) -> dict[str, Any]:
    server = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "serve", model, "--port", "0"], cwd=ROOT,
                              env=env(chat_threads), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split("listening on ")[1].split()[0]
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        stop, tokens = threading.Event(), [0]

        def chat() -> None:
            i = 0
            while not stop.is_set():
                out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                                     max_tokens=32, temperature=0.9, seed=i)
                tokens[0] += out.usage.completion_tokens
                i += 1

        chatters = [threading.Thread(target=chat) for _ in range(2)]
        for t in chatters:
            t.start()
        began, load_before = time.perf_counter(), load()
        out = work / f"run-{time.time_ns()}"
        proc = subprocess.run([sys.executable, "-m", "llmtune.cli", "train", recipe, *overrides, "--output-dir",
                               str(out)], cwd=ROOT, env=env(run_threads), capture_output=True, text=True)
        wall = time.perf_counter() - began
        stop.set()
        for t in chatters:
            t.join()
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        return {"train_wall_s": wall, "chat_tokens_per_s": tokens[0] / wall, "load": [load_before, load()]}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/sft-tiny.yaml")
    ap.add_argument("--chat-model", default="tiny-llama")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    args = ap.parse_args()
    from llmtune.launch.threads import cores, webui_split

    ui, run = webui_split()
    sides = {"default": (None, None), "budgets": (ui, run)}
    work = Path(tempfile.mkdtemp(prefix="llmtune-threads-"))
    results: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for side in (("default", "budgets") if rnd % 2 == 0 else ("budgets", "default")):
            r = measure(args.recipe, args.chat_model, *sides[side], work, args.overrides)
            results.setdefault(side, []).append(r)
            print(json.dumps({"side": side, "round": rnd, "cores": cores(), "chat_threads": sides[side][0],
                              "run_threads": sides[side][1], **{k: round(v, 2) if isinstance(v, float) else v
                                                                for k, v in r.items()}}), flush=True)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    print(f"\n| {cores()} cores | `llmtune train {args.recipe}` wall | chat tokens/s meanwhile |\n|---|---|---|")
    for side in ("default", "budgets"):
        label = "default threads" if side == "default" else f"budgets (chat {ui}, run {run} threads)"
        print(f"| {label} | {med(side, 'train_wall_s'):.1f} s | {med(side, 'chat_tokens_per_s'):.0f} |")
    print(f"| default / budgets | {med('default', 'train_wall_s') / med('budgets', 'train_wall_s'):.2f}x | "
          f"{med('default', 'chat_tokens_per_s') / med('budgets', 'chat_tokens_per_s'):.2f}x |")


if __name__ == "__main__":
    main()
