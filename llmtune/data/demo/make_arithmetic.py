"""Regenerate the `arithmetic` data set: word problems whose answers a program checks.

A verifiable task for online RL (`llmtune.rewards.rules:numeric_answer` scores a response 1 when its
final number is the row's `answer`), in four levels of difficulty:

    1  sums and differences of one-digit numbers, five wordings "Add 7 and 5."
    2  one-step word problems with numbers up to 20           "Mia has 12 shells and finds 5 more. ..."
    3  one step with two-digit numbers, or a product         "Each box holds 6 pens. How many pens ..."
    4  two steps                                              "... buys 3 packs of 8 cards and gives away 5 ..."

Rows are SFT conversations (the question, then a worked answer ending in "The answer is N.") with
the extra columns `answer` (int) and `level`; as prompts (stages rs, ppo, rl) the columns travel
with the question to the reward. Three fixed splits, no question in two of them: train (for
training), dev (for choosing hyperparameters) and test (for reporting only). Level 1 has only 155
one-digit facts, so its splits share facts in other words; from level 2 on problems are new. A
fixed seed makes every run write identical files.

    python -m llmtune.data.demo.make_arithmetic [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 2024
SPLITS = {"train": 1600, "dev": 200, "test": 400}  # problems per split, equally many per level
LEVELS = (1, 2, 3, 4)
DEFAULT_OUT = Path(__file__).with_name("arithmetic")

NAMES = ["Mia", "Leo", "Ava", "Noah", "Emma", "Liam", "Zoe", "Omar", "Lily", "Ben", "Sara", "Tom", "Nina",
         "Ravi", "Ella", "Jack", "Maya", "Luis", "Anna", "Kai"]
THINGS = ["apples", "shells", "stickers", "marbles", "pencils", "cards", "stamps", "cookies", "books", "coins",
          "flowers", "balloons", "pens", "buttons", "eggs", "toy cars"]
Problem = tuple[str, str, int]  # question, worked answer, answer


ADD = ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
       "What do you get when you add {a} and {b}?"]
SUB = ["What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
       "What is left when you take {b} away from {a}?"]


def _level1(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return rng.choice(ADD).format(a=a, b=b), f"{a} + {b} = {a + b}.", a + b
    a, b = max(a, b), min(a, b)
    return rng.choice(SUB).format(a=a, b=b), f"{a} - {b} = {a - b}.", a - b


def _one_step(rng: random.Random, low: int, high: int) -> Problem:
    n, x = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(low, high), rng.randint(low, high)
    if rng.random() < 0.5:
        q = rng.choice([f"{n} has {a} {x} and gets {b} more. How many {x} does {n} have now?",
                        f"There are {a} {x} in a box and {b} {x} on the table. How many {x} are there in total?",
                        f"{n} collected {a} {x} on Monday and {b} {x} on Tuesday. How many {x} did {n} collect?"])
        return q, f"{a} + {b} = {a + b}.", a + b
    a, b = max(a, b), min(a, b)
    q = rng.choice([f"{n} had {a} {x} and gave {b} to a friend. How many {x} does {n} have left?",
                    f"A shelf holds {a} {x}. {n} takes {b} of them. How many {x} are still on the shelf?",
                    f"{n} needs {a} {x} and already has {b}. How many more {x} does {n} need?"])
    return q, f"{a} - {b} = {a - b}.", a - b


def _level2(rng: random.Random) -> Problem:
    return _one_step(rng, 1, 20)


def _level3(rng: random.Random) -> Problem:
    if rng.random() < 0.6:
        return _one_step(rng, 10, 99)
    n, x = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = rng.choice([f"{n} buys {a} bags with {b} {x} in each bag. How many {x} does {n} buy?",
                    f"Each box holds {b} {x}. How many {x} are in {a} boxes?"])
    return q, f"{a} * {b} = {a * b}.", a * b


def _level4(rng: random.Random) -> Problem:
    n, x = rng.choice(NAMES), rng.choice(THINGS)
    if rng.random() < 0.5:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b)
        q = f"{n} has {a} {x}, buys {b} more and then gives away {c}. How many {x} does {n} have now?"
        return q, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
    q = f"{n} buys {a} packs of {b} {x} and finds {c} more. How many {x} does {n} have?"
    return q, f"{a} * {b} = {a * b}. {a * b} + {c} = {a * b + c}.", a * b + c


MAKERS: dict[int, Callable[[random.Random], Problem]] = {1: _level1, 2: _level2, 3: _level3, 4: _level4}


def make_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """Every split's rows; a question is drawn again until it is in no split yet."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in SPLITS.items():
        rows = []
        for i in range(n):
            level = LEVELS[i % len(LEVELS)]
            question, work, answer = MAKERS[level](rng)
            while question in seen:
                question, work, answer = MAKERS[level](rng)
            seen.add(question)
            messages = [{"role": "user", "content": question},
                        {"role": "assistant", "content": f"{work} The answer is {answer}."}]
            rows.append({"messages": messages, "answer": answer, "level": level})
        out[split] = rows
    return out


def write(out: Path = DEFAULT_OUT) -> Path:
    """Write train.jsonl, dev.jsonl and test.jsonl under OUT (byte-identical across runs)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in make_splits().items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8", newline="\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = p.parse_args(argv)
    print(write(args.out))


if __name__ == "__main__":
    main()
