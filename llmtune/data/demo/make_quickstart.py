"""Regenerate quickstart.jsonl, the built-in SFT demo set.

The rows are templated and regular on purpose: a tiny random-init model must be able
to learn them in a minute or two on a laptop CPU so the quickstart loss visibly falls.
A fixed seed makes every run write the identical file.

    python -m llmtune.data.demo.make_quickstart [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234
N_ROWS = 300
DEFAULT_OUT = Path(__file__).with_name("quickstart.jsonl")

NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Emma",
    "Felix",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Kira",
    "Leo",
    "Maya",
    "Nico",
    "Olga",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Victor",
]
WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "book",
    "lamp",
    "river",
    "apple",
    "house",
    "cloud",
    "stone",
    "bird",
    "train",
    "music",
    "paper",
    "glass",
    "horse",
    "plant",
    "chair",
    "light",
]
FACTS = [
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What colour is fresh grass?", "Fresh grass is green."),
    ("What colour is snow?", "Snow is white."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What do bees make?", "Bees make honey."),
    ("What does a cow drink?", "A cow drinks water."),
    ("Which animal says meow?", "A cat says meow."),
    ("Which animal says woof?", "A dog says woof."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("What rises in the east every morning?", "The sun rises in the east every morning."),
    ("What do we use to write on paper?", "We use a pen or a pencil to write on paper."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("What is the first letter of the alphabet?", "The first letter of the alphabet is A."),
    ("What comes after Monday?", "Tuesday comes after Monday."),
]
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer in one short sentence.",
    "You are llmtune's demo assistant. Keep answers short.",
]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "What is {a} + {b}?"])
    return q.format(a=a, b=b), f"{a} plus {b} is {a + b}."


def _sub(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 20)
    b = rng.randint(0, a)
    q = rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}.", "What is {a} - {b}?"])
    return q.format(a=a, b=b), f"{a} minus {b} is {a - b}."


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    q = rng.choice(["Reverse the word: {w}", "Spell {w} backwards.", "Write {w} in reverse."])
    return q.format(w=w), w[::-1]


def _greet(rng: random.Random) -> tuple[str, str]:
    n = rng.choice(NAMES)
    q = rng.choice(["Say hello to {n}.", "Greet {n}.", "Please say hi to {n}."])
    return q.format(n=n), f"Hello, {n}!"


def _upper(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    q = rng.choice(["Write {w} in capital letters.", "Uppercase the word: {w}"])
    return q.format(w=w), w.upper()


def _fact(rng: random.Random) -> tuple[str, str]:
    return rng.choice(FACTS)


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [_add, _sub, _reverse, _greet, _upper, _fact]


def make_rows(n: int = N_ROWS, seed: int = SEED) -> list[dict]:
    """Build `n` rows: ~10% two-turn, ~15% with a system message, the rest single-turn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.15:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        turns = 2 if rng.random() < 0.10 else 1
        for _ in range(turns):
            user, assistant = rng.choice(TASKS)(rng)
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        rows.append({"messages": messages})
    return rows


def write(out: Path = DEFAULT_OUT) -> Path:
    """Write the rows as JSON lines with stable formatting (byte-identical across runs)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_rows())
    out.write_text(text, encoding="utf-8", newline="\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .jsonl path")
    args = p.parse_args(argv)
    print(write(args.out))


if __name__ == "__main__":
    main()
