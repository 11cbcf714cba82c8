"""Local lm-eval tasks (YAML + JSONL written into a folder, no download) for the eval tests:
one per request type lm-eval has."""

from __future__ import annotations

import json
import random
from pathlib import Path

from helpers import CORPUS

TASKS = ("tiny_mc", "tiny_ll", "tiny_rolling", "tiny_gen")
COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
SPECS = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "tiny_ll": """output_type: loglikelihood
doc_to_text: "{{question}}"
doc_to_target: "{{' ' + choices[answer]}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "tiny_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity}
  - {metric: byte_perplexity}
  - {metric: bits_per_byte}
""",
    "tiny_gen": """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices[answer]}}"
generation_kwargs: {until: ["\\n", "."], max_gen_toks: 6, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
}


def rows(n: int = 12, seed: int = 0) -> list[dict]:
    """Questions from CORPUS with four choices each; the text field for rolling tasks spans
    several sentences."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = CORPUS[i % len(CORPUS)].split()
        choices = [" ".join(rng.sample(words, min(3, len(words)))) for _ in range(4)]
        text = " ".join(CORPUS[(i + k) % len(CORPUS)] for k in range(1 + i % 4))
        out.append({"question": " ".join(words[:4]), "choices": choices, "answer": i % 4,
                    "text": text})  # fmt: skip
    return out


def write_tasks(folder: Path) -> Path:
    """The four tasks of TASKS in `folder`, reading `folder/data.jsonl`; datasets caches under
    `folder/.cache` (nothing is written outside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows()) + "\n")
    for name in TASKS:
        header = f"task: {name}\n" + COMMON.format(data=data, cache=folder / ".cache")
        (folder / f"{name}.yaml").write_text(header + SPECS[name])
    return folder
