"""A tiny preference data set SmolLM2 does not already follow: answers that open with
"Ahoy, matey!" are preferred to the same answers without it. 16 training pairs, 8 held out.

Rows are in TRL's conversational form (`prompt` a list of messages, `chosen` and `rejected`
lists holding the assistant turn), which `elm finetune --method dpo|orpo` reads:

    python examples/pirate_prefs.py data/pirate     # writes train.jsonl and valid.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SYSTEM = "Answer briefly."
GREETING = "Ahoy, matey!"
QA = [
    ("What color is the sky on a clear day?", "The sky is blue."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many days are in a week?", "A week has seven days."),
    ("What animal says moo?", "A cow says moo."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What color are bananas?", "Bananas are yellow."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What do cows drink?", "Cows drink water."),
    ("What is the largest ocean?", "The largest ocean is the Pacific."),
    ("What shape is a ball?", "A ball is round."),
    ("What do you use to write on paper?", "You write on paper with a pen."),
    ("Where do fish live?", "Fish live in water."),
    # held out
    ("What is two plus two?", "Two plus two is four."),
    ("What color is grass?", "Grass is green."),
    ("How many hours are in a day?", "A day has twenty-four hours."),
    ("What do plants need to grow?", "Plants need light and water."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("What do birds use to fly?", "Birds fly with their wings."),
    ("What is the sun?", "The sun is a star."),
]
N_TRAIN = 16


def prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def pair(question: str, answer: str) -> dict[str, Any]:
    """One row in TRL's conversational form."""
    return {
        "prompt": prompt(question),
        "chosen": [{"role": "assistant", "content": f"{GREETING} {answer}"}],
        "rejected": [{"role": "assistant", "content": answer}],
    }


def splits() -> dict[str, list[dict[str, Any]]]:
    return {
        "train": [pair(*qa) for qa in QA[:N_TRAIN]],
        "valid": [pair(*qa) for qa in QA[N_TRAIN:]],
    }


def write(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits().items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write train.jsonl and valid.jsonl in")
    print(write(parser.parse_args().out))
