"""`llmtune serve` throughput and latency at several client concurrencies, this checkout's engine
beside another checkout's (the engine before batching), measured side by side in one run.

Both servers serve the same model with the same thread budget; the official `openai` client sends
the same seeded chat requests to each (a seeded answer is the same on both engines, so both do the
same work), at concurrency 1, 8 and 32, A/B alternating (old, new, then new, old, ...) so that load
from other processes on the machine hits both alike. Prints one JSON line per measurement (with the
machine's load average) and a Markdown table of medians with the ratios new/old and new at N / new
at 1.

    python benchmarks/serve_throughput.py --old /tmp/oldmain --models tiny-llama smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a lighthouse", "a lost key", "winter", "a robot", "a garden", "the moon", "a train",
          "a library", "an old map", "a storm", "a bakery", "a violin", "a river", "a fox", "a clock"]


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def start(checkout: Path, model: str, threads: int) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "serve", model, "--port", "0", "--max-tokens", "64"],
                            cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"{checkout}: server did not start: {line}")
    return proc, line.split("listening on ")[1].split()[0]


def measure(client: Any, model: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """REQUESTS seeded chat completions from CONCURRENCY closed-loop clients."""
    def ask(i: int) -> tuple[float, int]:
        began = time.perf_counter()
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Tell me a story about {TOPICS[i % len(TOPICS)]}."}],
            max_tokens=max_tokens, temperature=0.9, seed=i)
        return time.perf_counter() - began, out.usage.completion_tokens

    began, load_before = time.perf_counter(), load()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(ask, range(requests)))
    wall = time.perf_counter() - began
    tokens = sum(t for _, t in done)
    return {"tokens_per_s": tokens / wall, "p50_s": statistics.median(s for s, _ in done), "tokens": tokens,
            "wall_s": wall, "load": [load_before, load()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=Path, help="checkout of the engine to compare with")
    ap.add_argument("--new", default=ROOT, type=Path, help="checkout measured (default: this one)")
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m-instruct"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds per concurrency")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each server")
    args = ap.parse_args()
    from openai import OpenAI

    table = []
    for model in args.models:
        servers = {side: start(path, model, args.threads) for side, path in (("old", args.old), ("new", args.new))}
        try:
            clients = {side: OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
                       for side, (_, url) in servers.items()}
            for client in clients.values():  # warm up: first calls build caches
                measure(client, model, 2, 4, args.max_tokens)
            results: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for rnd in range(args.rounds):
                for conc in args.concurrency:
                    for side in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
                        r = measure(clients[side], model, conc, max(args.requests, conc), args.max_tokens)
                        results.setdefault((side, conc), []).append(r)
                        print(json.dumps({"model": model, "engine": side, "concurrency": conc, "round": rnd,
                                          **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}}),
                              flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)

        def med(side: str, conc: int, key: str, results: dict = results) -> float:
            return statistics.median(r[key] for r in results[(side, conc)])

        for conc in args.concurrency:
            old, new = med("old", conc, "tokens_per_s"), med("new", conc, "tokens_per_s")
            table.append(f"| {model} | {conc} | {old:.0f} | {new:.0f} | {new / old:.2f}x | "
                         f"{new / med('new', args.concurrency[0], 'tokens_per_s'):.2f}x | "
                         f"{med('old', conc, 'p50_s'):.2f} / {med('new', conc, 'p50_s'):.2f} s "
                         f"({med('new', conc, 'p50_s') / med('old', conc, 'p50_s'):.2f}x) |")
    print(f"\n| model | concurrency | old tokens/s | new tokens/s | new/old | new vs concurrency "
          f"{args.concurrency[0]} | p50 latency old / new |\n|---|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
