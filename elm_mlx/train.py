"""The LoRA training loop: AdamW with warmup and cosine decay, gradient accumulation and
checkpointing, a compiled step, validation, save/resume, and data parallelism.

Gradients are summed over every trained token of a global batch (across micro-batches and
processes) and divided by the token count once, so N processes, or N accumulated
micro-batches, give the same update as one process on the whole batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from .data import Example, Splits, collate, eval_batches, train_batches
from .errors import OptionError, TrainingError
from .lora import (
    ADAPTER_FILE,
    LoRAConfig,
    adapter_config_dict,
    read_adapter_config,
    save_adapters,
)
from .losses import cross_entropy_sum
from .progress import LOG_FILE, ProgressBar, StopFlag, TrainLog

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
PLOT_FILE = "loss.png"


@dataclass(frozen=True)
class TrainConfig:
    """Every training option and its default (the CLI reads its defaults from here).

    `iters` counts optimizer updates; each one consumes `grad_accum` batches of `batch_size`
    rows (the global batch, shared among processes under mlx.launch).
    """

    iters: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup: int = 0
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.01
    grad_checkpoint: bool = False
    max_seq_len: int = 2048
    train_on_prompt: bool = False
    skip_bad_rows: bool = False
    val_every: int = 100  # 0: never
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100  # 0: only at the end
    seed: int = 0
    plot: bool = False

    def validate(self, world: int = 1) -> None:
        for name in ("iters", "batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise OptionError("learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup < self.iters:
            raise OptionError("warmup", f"must be in [0, iters = {self.iters}), got {self.warmup}")
        if self.weight_decay < 0:
            raise OptionError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise OptionError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("val_every", "save_every"):
            if getattr(self, name) < 0:
                raise OptionError(name, f"must be >= 0 (0: never), got {getattr(self, name)}")
        if self.val_batches < -1:
            raise OptionError("val_batches", f"must be >= 0 or -1 (all), got {self.val_batches}")
        if self.batch_size % world:
            raise OptionError(
                "batch_size", f"{self.batch_size} must be divisible by the {world} processes"
            )

    # Options a resumed run must share with the saved one, or the data order and the
    # optimizer state would not mean the same thing.
    RESUME_KEYS = ("batch_size", "grad_accum", "seed", "max_seq_len", "train_on_prompt")


@dataclass
class TrainResult:
    step: int
    loss: float | None
    val_loss: float | None
    test_loss: float | None
    interrupted: bool


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    lr = config.learning_rate
    decay = optim.cosine_decay(lr, config.iters - config.warmup, lr * config.min_lr_ratio)
    if config.warmup:
        warmup = optim.linear_schedule(lr / config.warmup, lr, max(config.warmup - 1, 1))
        decay = optim.join_schedules([warmup, decay], [config.warmup])
    return optim.AdamW(learning_rate=decay, weight_decay=config.weight_decay)


def all_sum_tree(tree: Any, world: mx.distributed.Group) -> Any:
    """Sum a tree of arrays over processes in one flat message."""
    flat = tree_flatten(tree)
    vector = mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in flat])
    vector = mx.distributed.all_sum(vector, group=world)
    out, offset = [], 0
    for k, v in flat:
        out.append((k, vector[offset : offset + v.size].reshape(v.shape).astype(v.dtype)))
        offset += v.size
    return tree_unflatten(out)


@contextmanager
def grad_checkpointing(layers: list[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Recompute each block in the backward pass instead of keeping its activations.

    Only these instances change (their class is swapped for a subclass while training).
    """
    originals = [type(layer) for layer in layers]
    if enabled:
        subclasses: dict[type, type] = {}
        for layer, cls in zip(layers, originals, strict=True):
            if cls not in subclasses:
                subclasses[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {
                    "__call__": _checkpointed_call(cls.__call__)})  # fmt: skip
            layer.__class__ = subclasses[cls]
    try:
        yield
    finally:
        for layer, cls in zip(layers, originals, strict=True):
            layer.__class__ = cls


def _checkpointed_call(call: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def checkpointed(self: nn.Module, x: mx.array, *args: Any) -> mx.array:
        def inner(params: Any, x: mx.array) -> mx.array:
            self.update(params)
            return call(self, x, *args)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    return checkpointed


class Trainer:
    """One run: the model (LoRA applied), its data, options, and where files go."""

    def __init__(
        self,
        model: nn.Module,
        splits: Splits,
        out: Path,
        config: TrainConfig,
        lora: LoRAConfig,
        world: mx.distributed.Group | None = None,
        progress: bool = True,
    ):
        self.model, self.splits, self.out = model, splits, Path(out)
        self.config, self.lora = config, lora
        self.world = world or mx.distributed.init()
        self.rank, self.size = self.world.rank(), self.world.size()
        config.validate(self.size)
        self.optimizer = make_optimizer(config)
        self.optimizer.init(model.trainable_parameters())
        self.progress = progress
        self.log: TrainLog | None = None
        self.bar: ProgressBar | None = None
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.interrupted = False

    # ---- the compiled step ---------------------------------------------------------------
    def make_step(self) -> Callable[..., tuple[mx.array, mx.array, Any]]:
        model, optimizer, world = self.model, self.optimizer, self.world
        loss_and_grad = nn.value_and_grad(model, cross_entropy_sum)
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(inputs, targets, mask, acc, update: bool):
            (loss, ntok), grads = loss_and_grad(model, inputs, targets, mask)
            if acc is not None:
                loss, ntok, grads = loss + acc[0], ntok + acc[1], tree_map(mx.add, grads, acc[2])
            if not update:
                return loss, ntok, grads
            if world.size() > 1:
                grads, (loss, ntok) = all_sum_tree((grads, (loss, ntok)), world)
            optimizer.update(model, tree_map(lambda g: g / mx.maximum(ntok, 1), grads))
            return loss, ntok, None

        return step

    # ---- validation ----------------------------------------------------------------------
    def evaluate(self, examples: list[Example], max_batches: int) -> float | None:
        """Mean loss per trained token; each process takes every size-th batch."""
        if not examples:
            return None
        self.model.eval()
        total, ntok = mx.array(0.0), mx.array(0.0)
        batches = eval_batches(examples, self.config.batch_size, max_batches)
        for group in batches[self.rank :: self.size]:
            b = collate(group, 32)
            arrays = (mx.array(b.inputs), mx.array(b.targets), mx.array(b.mask))
            loss, n = cross_entropy_sum(self.model, *arrays, grad=False)
            total, ntok = total + loss, ntok + n
            mx.eval(total, ntok)
        self.model.train()
        if self.size > 1:
            total, ntok = mx.distributed.all_sum(mx.stack([total, ntok]), group=self.world)
        return (total / mx.maximum(ntok, 1)).item()

    # ---- the loop ------------------------------------------------------------------------
    def run(self, on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
        """Train up to `config.iters` steps; `on_step(trainer)` is called after each one."""
        c = self.config
        step_fn = self.make_step()
        batches = train_batches(
            self.splits.train, c.batch_size, c.seed, self.step * c.grad_accum,
            self.rank, self.size,
        )  # fmt: skip
        first = self.rank == 0
        self.log = TrainLog(self.out / LOG_FILE, self.step) if first else None
        self.bar = ProgressBar(c.iters, self.step) if first and self.progress else None
        loss = val_loss = None
        if c.val_every and self.step == 0:
            val_loss = self.validate()
        self.model.train()
        with StopFlag() as stop, grad_checkpointing(self.model.layers, c.grad_checkpoint):
            while self.step < c.iters:
                tic = time.perf_counter()
                # Dropout masks depend on (seed, step, process) only, so a resumed run draws
                # the same ones as an uninterrupted run.
                mx.random.seed((c.seed * 1_000_003 + self.step) * 1009 + self.rank)
                acc = None
                for micro in range(c.grad_accum):
                    b = next(batches)
                    arrays = (mx.array(b.inputs), mx.array(b.targets), mx.array(b.mask))
                    acc = step_fn(*arrays, acc, micro == c.grad_accum - 1)
                    mx.eval(acc, self.model.state, self.optimizer.state)
                dt = time.perf_counter() - tic
                self.step, self.elapsed = self.step + 1, self.elapsed + dt
                n = int(acc[1].item())
                self.tokens += n
                loss = acc[0].item() / max(n, 1)
                lr = self.optimizer.learning_rate.item()  # the rate this update used
                if self.log:
                    self.log.write(
                        step=self.step, loss=loss, learning_rate=lr, tokens=self.tokens,
                        tokens_per_sec=n / dt, peak_memory_gb=mx.get_peak_memory() / 1e9,
                        elapsed_s=self.elapsed,
                    )  # fmt: skip
                if self.bar:
                    self.bar.update(loss, val_loss, lr, n / dt)
                at_end = self.step == c.iters
                if c.val_every and (self.step % c.val_every == 0 or at_end):
                    val_loss = self.validate()
                if on_step is not None:
                    on_step(self)
                if stop.is_set(self.world):
                    self.interrupted = True
                    break
                if c.save_every and self.step % c.save_every == 0 and not at_end:
                    self.save()
        self.save()
        test_loss = None
        if self.splits.test and not self.interrupted:
            test_loss = self.evaluate(self.splits.test, c.val_batches)
        if self.bar:
            self.bar.close()
        if self.log:
            self.log.close()
            if c.plot:
                from .plot import plot_log

                plot_log(self.out / LOG_FILE, self.out / PLOT_FILE)
        return TrainResult(self.step, loss, val_loss, test_loss, self.interrupted)

    def validate(self) -> float | None:
        val_loss = self.evaluate(self.splits.valid, self.config.val_batches)
        if val_loss is not None and self.log:
            self.log.write(step=self.step, val_loss=val_loss, elapsed_s=self.elapsed)
        if val_loss is not None and self.bar:
            self.bar.write(f"step {self.step}: validation loss {val_loss:.3f}")
        return val_loss

    # ---- saving and resuming -------------------------------------------------------------
    def save(self) -> None:
        if self.rank != 0:
            return
        training = {k: v for k, v in asdict(self.config).items() if k != "plot"}
        save_adapters(self.model, self.out, self.lora, {"training": training})
        opt_state = dict(tree_flatten(self.optimizer.state))
        tmp = self.out / f".{OPTIMIZER_FILE}.tmp.safetensors"
        mx.save_safetensors(str(tmp), opt_state)
        tmp.replace(self.out / OPTIMIZER_FILE)
        state = {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed}
        (self.out / STATE_FILE).write_text(json.dumps(state, indent=2))

    def resume(self) -> None:
        """Continue from the last save: adapter weights, optimizer state, data position.

        The first process reads the files and sends their contents to the others, which
        may run on machines without them.
        """
        if self.rank == 0:
            self.load_saved()
        if self.size > 1:
            params = self.model.trainable_parameters()
            saved = (params, self.optimizer.state, mx.array([self.step, self.tokens]))
            if self.rank != 0:
                saved = tree_map(mx.zeros_like, saved)
            params, self.optimizer.state, counts = all_sum_tree(saved, self.world)
            self.model.update(params)
            self.step, self.tokens = (int(v) for v in counts.tolist())
        mx.eval(self.model.parameters(), self.optimizer.state)

    def load_saved(self) -> None:
        state_path = self.out / STATE_FILE
        if not state_path.exists():
            raise TrainingError(f"--resume: {state_path} is missing; nothing to resume")
        raw, _ = read_adapter_config(self.out)
        saved = raw.get("training", {})
        diffs = [
            f"{k} {getattr(self.config, k)!r} (saved run: {saved.get(k)!r})"
            for k in TrainConfig.RESUME_KEYS
            if saved.get(k) != getattr(self.config, k)
        ]
        mine = adapter_config_dict(self.model, self.lora)
        mine = {"num_layers": mine["num_layers"], **mine["lora_parameters"]}
        theirs = {"num_layers": raw["num_layers"], **raw["lora_parameters"]}
        diffs += [
            f"{k} {mine[k]!r} (saved run: {theirs.get(k)!r})"
            for k in mine
            if mine[k] != theirs.get(k)
        ]
        if diffs:
            raise TrainingError(
                "--resume needs the options of the saved run; these differ: " + ", ".join(diffs)
            )
        state = json.loads(state_path.read_text())
        self.model.load_weights(str(self.out / ADAPTER_FILE), strict=False)
        opt = mx.load(str(self.out / OPTIMIZER_FILE))
        try:
            self.optimizer.state = tree_map_with_path(lambda k, _: opt[k], self.optimizer.state)
        except KeyError as e:
            raise TrainingError(f"--resume: {self.out / OPTIMIZER_FILE} lacks {e}") from e
        self.step, self.tokens = state["step"], state["tokens"]
        self.elapsed = state.get("elapsed_s", 0.0)
