"""Evaluation speed, elm vs mlx-lm, on the same float model folder, with equal results checked.

1. Perplexity of held-out English (the standard library's pydoc topics, which every Python
   has): elm's `perplexity` (windows of --window tokens, no overlap) vs mlx-lm's
   `mlx_lm.perplexity.eval_ppl` (rows of --window tokens, batches of 8). tokens/s counts scored
   tokens. The check: elm's NLL over mlx-lm's rows equals mlx-lm's.
2. Log-likelihood requests of a local multiple-choice task (cloze: which 5 words continue a
   passage of the same text; 4 choices): elm's lm-eval model `elm` vs mlx-lm's `mlx_lm.evaluate`
   model (`mlxlm`), on the same lm-eval Instances. The check: the same log-likelihoods (within
   1e-3) and accuracy.

    elm convert ~/.cache/elm-mlx/smollm2-135m-instruct-hf -o /tmp/smollm2-fp32 --dtype float32
    python benchmarks/bench_eval.py --model /tmp/smollm2-fp32

One run, both engines in this process, one after the other (elm first), each after a short
warm-up. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import tempfile
import time
from pathlib import Path

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np


def held_out_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def bench_perplexity(elm_model, elm_tok, mlx_model, text: str, tokens: int, window: int) -> dict:
    from mlx_lm.perplexity import eval_ppl

    from elm_mlx.eval.perplexity import perplexity, score_tokens

    ids = elm_tok.encode(text)[:tokens]
    text = elm_tok.decode(ids)
    perplexity(elm_model, elm_tok, text[:2000], window=window)  # warm-up
    ours = perplexity(elm_model, elm_tok, text, window=window)
    rows = mx.array(ids[: len(ids) // window * window]).reshape(-1, window)
    eval_ppl(mlx_model, rows[:1], batch_size=8)  # warm-up
    tic = time.perf_counter()
    theirs, _ = eval_ppl(mlx_model, rows, batch_size=8)
    seconds = time.perf_counter() - tic
    scored = rows.shape[0] * (window - 1)
    ours_on_rows = sum(score_tokens(elm_model, r, window, window)[0] for r in rows.tolist())
    ours_on_rows = math.exp(ours_on_rows / scored)
    return {
        "tokens": ours.tokens,
        "elm_ppl": ours.perplexity,
        "elm_tok_s": ours.tokens / ours.seconds,
        "mlx_lm_ppl": theirs,
        "mlx_lm_tok_s": scored / seconds,
        "elm_ppl_on_mlx_lm_rows": ours_on_rows,
        "equal": abs(ours_on_rows / theirs - 1) < 1e-4,
    }


def cloze_task(folder: Path, text: str, docs: int, seed: int = 0) -> Path:
    """A 4-choice cloze task: a 30-word passage, then which 5 words come next."""
    words = text.split()
    starts = list(range(0, len(words) - 35, 35))[:docs]
    rng = random.Random(seed)
    rows = []
    for i, s in enumerate(starts):
        spans = [" ".join(words[s + 30 : s + 35])]
        while len(spans) < 4:
            o = rng.choice(starts)
            if o != s:
                spans.append(" ".join(words[o + 30 : o + 35]))
        answer = i % 4
        spans[0], spans[answer] = spans[answer], spans[0]
        rows.append({"passage": " ".join(words[s : s + 30]), "choices": spans, "answer": answer})
    (folder / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "bench_cloze.yaml").write_text(
        f"task: bench_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'cloze.jsonl'}\n  cache_dir: {folder / '.cache'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{passage}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "target_delimiter: ' '\nmetric_list:\n  - {metric: acc}\n"
    )
    return folder


def accuracy(instances, results) -> float:
    by_doc: dict[int, list[float]] = {}
    gold = {}
    for inst, (ll, _) in zip(instances, results, strict=True):
        by_doc.setdefault(inst.doc_id, []).append(ll)
        gold[inst.doc_id] = inst.doc["answer"]
    return float(np.mean([int(np.argmax(v)) == gold[d] for d, v in by_doc.items()]))


def bench_loglikelihood(model_dir: Path, elm_loaded, text: str, docs: int) -> dict:
    from lm_eval.tasks import TaskManager
    from mlx_lm.evaluate import MLXLM

    from elm_mlx.eval.lm_eval_model import ElmLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = cloze_task(Path(tmp), text, docs)
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        task = manager.load(["bench_cloze"])["tasks"]["bench_cloze"]
        task.build_all_requests(rank=0, world_size=1)
        instances = task.instances
    engines = {
        "elm": ElmLM(str(model_dir), loaded=elm_loaded),
        "mlx_lm": MLXLM(str(model_dir), use_chat_template=False),
    }
    out: dict = {"requests": len(instances), "docs": docs}
    results = {}
    for name, lm in engines.items():
        lm.loglikelihood(instances[:8])  # warm-up
        tic = time.perf_counter()
        results[name] = lm.loglikelihood(instances)
        seconds = time.perf_counter() - tic
        out[f"{name}_req_s"] = len(instances) / seconds
        out[f"{name}_acc"] = accuracy(instances, results[name])
    diff = np.abs(np.array([r[0] for r in results["elm"]]) - [r[0] for r in results["mlx_lm"]])
    out["max_abs_diff"] = float(diff.max())
    out["equal"] = bool(diff.max() < 1e-3 and out["elm_acc"] == out["mlx_lm_acc"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/smollm2-fp32"))
    parser.add_argument("--tokens", type=int, default=8192, help="perplexity text length")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--docs", type=int, default=100, help="multiple-choice questions")
    args = parser.parse_args()

    from mlx_lm import load as mlx_lm_load

    from elm_mlx import load

    text = held_out_text()
    elm_model, elm_tok = load(args.model)
    mlx_model, _ = mlx_lm_load(str(args.model))
    ppl = bench_perplexity(elm_model, elm_tok, mlx_model, text, args.tokens, args.window)
    ll = bench_loglikelihood(args.model, (elm_model, elm_tok), text[len(text) // 2 :], args.docs)

    print(f"\nmodel {args.model}, {platform.machine()}, {mx.default_device()}")
    print(f"{'benchmark':<44}{'elm':>12}{'mlx-lm':>12}{'elm/mlx-lm':>12}  equal")
    rows = [
        (f"perplexity tokens/s ({ppl['tokens']} tokens, window {args.window})",
         ppl["elm_tok_s"], ppl["mlx_lm_tok_s"], ppl["equal"]),
        (f"loglikelihood requests/s ({ll['requests']} requests)",
         ll["elm_req_s"], ll["mlx_lm_req_s"], ll["equal"]),
    ]  # fmt: skip
    for name, ours, theirs, equal in rows:
        print(f"{name:<44}{ours:>12,.1f}{theirs:>12,.1f}{ours / theirs:>12.2f}  {equal}")
    print(
        f"perplexity: elm {ppl['elm_ppl']:.3f} (its windows); on mlx-lm's rows elm "
        f"{ppl['elm_ppl_on_mlx_lm_rows']:.4f} vs mlx-lm {ppl['mlx_lm_ppl']:.4f}"
    )
    print(
        f"multiple choice: accuracy elm {ll['elm_acc']:.3f}, mlx-lm {ll['mlx_lm_acc']:.3f}; "
        f"max |loglikelihood difference| {ll['max_abs_diff']:.2e}"
    )
    print(json.dumps({"bench": "eval", "model": str(args.model), "window": args.window,
                      "perplexity": ppl, "loglikelihood": ll}))  # fmt: skip


if __name__ == "__main__":
    main()
