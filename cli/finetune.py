"""`elm finetune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..lora import LoRAConfig
from ..train.trainer import TrainConfig

TRAINING, LORA = TrainConfig(), LoRAConfig()  # the defaults the options show


def command(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model folder or hub id.")],
    data: Annotated[
        Path, typer.Option(help="Folder with train.jsonl (and valid.jsonl, test.jsonl).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write.")],
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = LORA.rank,
    alpha: Annotated[
        float, typer.Option(help="LoRA alpha; the update is scaled by alpha/rank.")
    ] = LORA.alpha,
    dropout: Annotated[float, typer.Option(help="Dropout on the LoRA input.")] = LORA.dropout,
    num_layers: Annotated[
        int, typer.Option(help="Adapt the last N transformer blocks (-1: all).")
    ] = LORA.num_layers,
    targets: Annotated[
        str | None,
        typer.Option(help="Comma-separated layers to adapt, e.g. q_proj,v_proj (default: all)."),
    ] = None,
    iters: Annotated[int, typer.Option(help="Optimizer steps.")] = TRAINING.iters,
    batch_size: Annotated[
        int, typer.Option(help="Rows per batch (over all processes under mlx.launch).")
    ] = TRAINING.batch_size,
    grad_accum: Annotated[
        int, typer.Option(help="Batches whose gradients make one step.")
    ] = TRAINING.grad_accum,
    learning_rate: Annotated[
        float, typer.Option(help="Peak AdamW learning rate.")
    ] = TRAINING.learning_rate,
    warmup: Annotated[
        int, typer.Option(help="Linear warmup steps before cosine decay.")
    ] = TRAINING.warmup,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay.")
    ] = TRAINING.weight_decay,
    max_grad_norm: Annotated[
        float, typer.Option(help="Clip the gradient's global norm to this (0: no clipping).")
    ] = TRAINING.max_grad_norm,
    grad_checkpoint: Annotated[
        bool, typer.Option(help="Recompute activations in the backward pass (less memory).")
    ] = TRAINING.grad_checkpoint,
    max_seq_len: Annotated[
        int, typer.Option(help="Longest row in tokens; longer rows are bad rows.")
    ] = TRAINING.max_seq_len,
    train_on_prompt: Annotated[
        bool, typer.Option(help="Also learn prompts and user turns, not only the answers.")
    ] = TRAINING.train_on_prompt,
    skip_bad_rows: Annotated[
        bool, typer.Option(help="Skip bad rows (with a count) instead of stopping.")
    ] = TRAINING.skip_bad_rows,
    val_every: Annotated[
        int, typer.Option(help="Validation loss every N steps (0: never).")
    ] = TRAINING.val_every,
    val_batches: Annotated[
        int, typer.Option(help="Validation batches per evaluation (-1: all).")
    ] = TRAINING.val_batches,
    save_every: Annotated[
        int, typer.Option(help="Save the adapter every N steps (0: only at the end).")
    ] = TRAINING.save_every,
    seed: Annotated[
        int, typer.Option(help="Seed for LoRA init, data order, dropout.")
    ] = TRAINING.seed,
    resume: Annotated[
        bool, typer.Option(help="Continue the run saved in --out (same options).")
    ] = False,
    plot: Annotated[bool, typer.Option(help="Write loss.png of the loss curves.")] = TRAINING.plot,
    method: Annotated[
        str, typer.Option(help="sft (supervised), dpo or orpo (preference pairs).")
    ] = TRAINING.method,
    beta: Annotated[
        float, typer.Option(help="DPO's beta (KL strength); ORPO's lambda (odds-ratio weight).")
    ] = TRAINING.beta,
    loss: Annotated[
        str, typer.Option(help="DPO's loss: sigmoid (DPO paper) or ipo (IPO paper).")
    ] = TRAINING.loss,
) -> None:
    """Fine-tune a LoRA adapter on local JSONL data (QLoRA when the base is quantized).

    SFT rows are {"text"}, {"prompt", "completion"} or {"messages": [{"role", "content"}...]}.
    DPO/ORPO rows are {"prompt", "chosen", "rejected"}: strings, or TRL's conversational form
    (prompt a list of messages, chosen/rejected lists holding the assistant turn). DPO's
    reference is the base model itself (the adapter switched off); start from an SFT model
    made with `elm fuse`. Ctrl-C saves before exiting; --resume continues.
    Data-parallel: mlx.launch -n 2 -- elm finetune ...
    """
    from ..train.finetune import finetune

    lora = LoRAConfig(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        num_layers=num_layers,
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else None,
    )
    config = TrainConfig(
        iters=iters,
        batch_size=batch_size,
        grad_accum=grad_accum,
        learning_rate=learning_rate,
        warmup=warmup,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        grad_checkpoint=grad_checkpoint,
        max_seq_len=max_seq_len,
        train_on_prompt=train_on_prompt,
        skip_bad_rows=skip_bad_rows,
        val_every=val_every,
        val_batches=val_batches,
        save_every=save_every,
        seed=seed,
        plot=plot,
        method=method,
        beta=beta,
        loss=loss,
    )
    result = finetune(model, data, out, config, lora, resume=resume, echo=typer.echo)
    if result.interrupted:
        raise typer.Exit(130)
