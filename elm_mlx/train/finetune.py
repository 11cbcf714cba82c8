"""`finetune(...)`: load a model and a data folder, add LoRA layers, train, save the adapter."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import TrainingError
from ..lora import ADAPTER_FILE, LoRAConfig, apply_lora
from .dataset import load_splits
from .run_state import STATE_FILE
from .trainer import TrainConfig, Trainer, TrainResult


def finetune(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    lora: LoRAConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train a LoRA adapter on `data` (a folder with train.jsonl) and save it in `out`, by
    supervised fine-tuning or, with `config.method`, DPO or ORPO on preference pairs (DPO's
    reference is `model` itself: the adapter switched off).

    Under `mlx.launch` every process runs this; each trains on its share of every batch and
    only the first one writes files and prints.
    """
    from ..loader import load  # the heavy imports only when training

    config, lora = config or TrainConfig(), lora or LoRAConfig()
    world = mx.distributed.init()
    config.validate(world.size())
    lora.validate()
    say = echo if world.rank() == 0 else lambda _: None
    out = Path(out).expanduser()
    if resume and world.rank() == 0 and not (out / STATE_FILE).exists():
        raise TrainingError(f"--resume: {out} holds no saved run ({STATE_FILE} is missing)")
    if not resume and world.rank() == 0 and (out / ADAPTER_FILE).exists():
        raise TrainingError(
            f"{out} already holds an adapter; pass --resume to continue it or choose another --out"
        )

    lm, tokenizer = load(model)
    splits = load_splits(
        Path(data), tokenizer, lm.model_type, config.max_seq_len,
        config.train_on_prompt, config.skip_bad_rows, pairs=config.method != "sft",
    )  # fmt: skip
    if splits.skipped:
        say(f"skipped {len(splits.skipped)} bad row(s) (--skip-bad-rows)")
    mx.random.seed(config.seed)  # the same LoRA initialisation in every process
    wrapped = apply_lora(lm, lora)
    trainable = sum(v.size for _, v in tree_flatten(lm.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(lm.parameters()))
    n_tokens = sum(int(r.mask.sum()) for e in splits.train for r in e.rows())
    what = "rows" if config.method == "sft" else f"pairs ({config.method.upper()})"
    say(
        f"LoRA on {len(wrapped)} layers: {trainable / 1e6:.3f}M trainable parameters "
        f"({100 * trainable / total:.2f}% of {total / 1e6:.1f}M); "
        f"train {len(splits.train)} {what} ({n_tokens} trained tokens), "
        f"valid {len(splits.valid)}, test {len(splits.test)}"
        + (f"; {world.size()} processes" if world.size() > 1 else "")
    )
    trainer = Trainer(lm, splits, out, config, lora, world, progress)
    if resume:
        trainer.resume()
        say(f"resuming at step {trainer.step} of {config.iters}")
    result = trainer.run()
    if result.test_loss is not None:
        say(f"test loss {result.test_loss:.3f}")
    what = "interrupted; saved" if result.interrupted else "saved"
    say(f"step {result.step}: {what} the adapter in {out}")
    return result
