"""The LoRA training loop: AdamW with warmup and cosine decay, gradient accumulation and
checkpointing, gradient clipping, a compiled step, validation, save/resume, and data
parallelism, for SFT, DPO and ORPO (the objectives are in objectives.py).

Each micro-batch's loss is divided by the global batch's counts (trained tokens, pairs),
counted before the step, and gradients are summed over micro-batches and processes, then
clipped by their global norm, so N processes, or N accumulated micro-batches, give the same
update as one process on the whole batch. A step whose loss or gradient is not finite stops
the run with the last good adapter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_reduce, tree_unflatten

from ..errors import OptionError, TrainingError
from ..lora import LoRAConfig
from .dataset import Batch, Example, Pair, Splits, collate, eval_batches, train_batches
from .log import LOG_FILE, ProgressBar, StopFlag, TrainLog
from .objectives import DPO_LOSSES, METHODS, make_objective
from .run_state import RunState, check_options, load_run, save_run

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
    max_grad_norm: float = 1.0  # clip the gradient's global norm to this (0: off), as HF does
    grad_checkpoint: bool = False
    max_seq_len: int = 2048
    train_on_prompt: bool = False
    skip_bad_rows: bool = False
    val_every: int = 100  # 0: never
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100  # 0: only at the end
    seed: int = 0
    plot: bool = False
    method: str = "sft"  # sft, dpo or orpo
    beta: float = 0.1  # DPO's beta; ORPO's lambda
    loss: str = "sigmoid"  # DPO's loss: sigmoid (Rafailov et al.) or ipo (Azar et al.)

    def validate(self, world: int = 1) -> None:
        for name in ("iters", "batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0 < self.learning_rate < math.inf:
            raise OptionError("learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0 <= self.max_grad_norm < math.inf:
            raise OptionError("max_grad_norm", f"must be >= 0 (0: off), got {self.max_grad_norm}")
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
        if self.method not in METHODS:
            raise OptionError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.loss not in DPO_LOSSES:
            raise OptionError("loss", f"must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        if self.loss != "sigmoid" and self.method != "dpo":
            raise OptionError("loss", f"chooses DPO's loss; --method is {self.method}")
        if not 0 < self.beta < math.inf:
            raise OptionError("beta", f"must be > 0, got {self.beta}")
        if self.train_on_prompt and self.method != "sft":
            raise OptionError("train_on_prompt", f"is for SFT; {self.method} learns completions")
        if self.batch_size % world:
            raise OptionError(
                "batch_size", f"{self.batch_size} must be divisible by the {world} processes"
            )

    # Options a resumed run must share with the saved one, or the data order and the
    # optimizer state would not mean the same thing.
    RESUME_KEYS = ("batch_size", "grad_accum", "seed", "max_seq_len", "train_on_prompt",
                   "method", "beta", "loss")  # fmt: skip


@dataclass
class TrainResult:
    step: int
    loss: float | None
    val_loss: float | None
    test_loss: float | None
    interrupted: bool
    metrics: dict[str, float] = field(default_factory=dict)  # of the last step
    val_metrics: dict[str, float] = field(default_factory=dict)  # of the last validation


@dataclass
class StepStats:
    """What one optimizer step did, as logged."""

    metrics: dict[str, float]  # loss, and the objective's metrics
    grad_norm: float
    learning_rate: float
    tokens: int
    seconds: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.metrics["loss"]) and math.isfinite(self.grad_norm)


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    lr = config.learning_rate
    decay = optim.cosine_decay(lr, config.iters - config.warmup, lr * config.min_lr_ratio)
    if config.warmup:
        warmup = optim.linear_schedule(lr / config.warmup, lr, max(config.warmup - 1, 1))
        decay = optim.join_schedules([warmup, decay], [config.warmup])
    # Bias correction as in PyTorch's AdamW (Hugging Face's Trainer): without it, MLX's first
    # updates are up to ~6x the learning rate (3.2x at step 1), which is what made LoRA on
    # SmolLM2 diverge at 2e-3 (see BENCHMARKS.md); clipping cannot help there, as Adam's update
    # does not depend on the gradient's scale.
    return optim.AdamW(learning_rate=decay, weight_decay=config.weight_decay, bias_correction=True)


def clip_by_global_norm(grads: Any, max_norm: float) -> tuple[Any, mx.array]:
    """The gradients scaled down to a global norm of at most `max_norm` (0: unchanged), and
    their norm before clipping."""
    if max_norm:
        return optim.clip_grad_norm(grads, max_norm)
    return grads, mx.sqrt(tree_reduce(lambda acc, g: acc + g.square().sum(), grads, 0.0))


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
        self.objective = make_objective(config.method, config.beta, config.loss)
        self.optimizer = make_optimizer(config)
        self.optimizer.init(model.trainable_parameters())
        self.progress = progress
        self.log: TrainLog | None = None
        self.bar: ProgressBar | None = None
        self.run_id = RunState.new_run_id()
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.val_loss: float | None = None  # the latest validation loss
        self.val_metrics: dict[str, float] = {}
        self.interrupted = False

    # ---- the compiled step ---------------------------------------------------------------
    def make_step(self) -> Callable[..., tuple[mx.array, Any]]:
        """step(inputs, targets, mask, weights, acc, update) accumulates (sums, gradients) of
        the objective, whose loss is (sums * weights).sum(); with update=True it applies them
        and returns (sums, grad norm)."""
        model, optimizer, world, objective = self.model, self.optimizer, self.world, self.objective
        max_norm = self.config.max_grad_norm

        def loss_fn(model, inputs, targets, mask, weights):
            sums = objective.sums(model, inputs, targets, mask, grad=True)  # (K,)
            return (sums * weights).sum(), sums

        loss_and_grad = nn.value_and_grad(model, loss_fn)
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(inputs, targets, mask, weights, acc, update: bool):
            (_, sums), grads = loss_and_grad(model, inputs, targets, mask, weights)
            if acc is not None:
                sums, grads = sums + acc[0], tree_map(mx.add, grads, acc[1])
            if not update:
                return sums, grads
            if world.size() > 1:
                grads, sums = all_sum_tree((grads, sums), world)
            grads, norm = clip_by_global_norm(grads, max_norm)
            # A step whose loss or gradient is not finite leaves the weights and the optimizer
            # state as they were (the loop then stops the run).
            ok = mx.isfinite((sums * weights).sum()) & mx.isfinite(norm)
            before = model.trainable_parameters(), tree_map(lambda x: x, optimizer.state)
            optimizer.update(model, grads)
            keep = partial(mx.where, ok)
            model.update(tree_map(keep, model.trainable_parameters(), before[0]))
            optimizer.state.update(tree_map(keep, optimizer.state, before[1]))  # in place
            return sums, norm

        return step

    def loss_weights(self, batches: list[Batch]) -> mx.array:
        """The objective's weights for a global batch: 1 / its counts over every process."""
        counts = sum(self.objective.counts(b) for b in batches)
        if self.size > 1:
            counts = np.array(mx.distributed.all_sum(mx.array(counts), group=self.world))
        return mx.array(self.objective.weights(counts))

    def train_step(self, step_fn: Callable[..., Any], batches: Iterator[Batch]) -> StepStats:
        """One optimizer update over `grad_accum` micro-batches."""
        c = self.config
        tic = time.perf_counter()
        # Dropout masks depend on (seed, step, process) only, so a resumed run draws the same
        # ones as an uninterrupted run.
        mx.random.seed((c.seed * 1_000_003 + self.step) * 1009 + self.rank)
        micro = [next(batches) for _ in range(c.grad_accum)]
        weights = self.loss_weights(micro)
        acc = None
        for i, b in enumerate(micro):
            arrays = (mx.array(b.inputs), mx.array(b.targets), mx.array(b.mask))
            acc = step_fn(*arrays, weights, acc, i == c.grad_accum - 1)
            mx.eval(acc, self.model.state, self.optimizer.state)
        sums = np.array(acc[0])
        return StepStats(
            metrics=self.objective.metrics(sums),
            grad_norm=acc[1].item(),
            learning_rate=self.optimizer.learning_rate.item(),  # the rate this update used
            tokens=self.objective.tokens(sums),
            seconds=time.perf_counter() - tic,
        )

    # ---- validation ----------------------------------------------------------------------
    def evaluate(self, examples: list[Example | Pair], max_batches: int) -> float | None:
        """The objective's loss over `examples` (None when there are none)."""
        return self.measure(examples, max_batches).get("loss")

    def measure(self, examples: list[Example | Pair], max_batches: int) -> dict[str, float]:
        """The objective's loss and metrics over `examples` (each process takes every size-th
        batch); empty when there are none."""
        if not examples:
            return {}
        self.model.eval()
        total = mx.zeros(len(self.objective.names))
        batches = eval_batches(examples, self.config.batch_size, max_batches)
        for group in batches[self.rank :: self.size]:
            b = collate(group, 32)
            arrays = (mx.array(b.inputs), mx.array(b.targets), mx.array(b.mask))
            total = total + self.objective.sums(self.model, *arrays, grad=False)
            mx.eval(total)
        self.model.train()
        if self.size > 1:
            total = mx.distributed.all_sum(total, group=self.world)
        return self.objective.metrics(np.array(total))

    def validate(self) -> None:
        metrics = self.measure(self.splits.valid, self.config.val_batches)
        if not metrics:
            return
        self.val_loss, self.val_metrics = metrics["loss"], metrics
        if self.log:
            values = {f"val_{k}": v for k, v in metrics.items()}
            self.log.write(step=self.step, elapsed_s=self.elapsed, **values)
        if self.bar:
            self.bar.validated(self.step, metrics)

    # ---- the loop ------------------------------------------------------------------------
    def run(self, on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
        """Train up to `config.iters` steps; `on_step(trainer)` is called after each one.

        Raises TrainingError when the loss or the gradient stops being finite, after saving
        the adapter of the last good step (every process stops at the same step: both are
        computed after the gradients are summed over processes)."""
        c = self.config
        step_fn, batches = self.make_step(), self.open_run()
        stats = diverged = None
        self.model.train()
        with StopFlag() as stop, grad_checkpointing(self.model.layers, c.grad_checkpoint):
            while self.step < c.iters:
                stats = self.train_step(step_fn, batches)
                self.record(stats)
                if not stats.finite:
                    diverged = stats  # and the step left no update
                    break
                self.step, self.tokens = self.step + 1, self.tokens + stats.tokens
                self.elapsed += stats.seconds
                at_end = self.step == c.iters
                if c.val_every and (self.step % c.val_every == 0 or at_end):
                    self.validate()
                if on_step is not None:
                    on_step(self)
                if stop.is_set(self.world):
                    self.interrupted = True
                    break
                if c.save_every and self.step % c.save_every == 0 and not at_end:
                    self.save()
        return self.close_run(stats, diverged)

    def open_run(self) -> Iterator[Batch]:
        """The batches from the current step on; the log and the bar; the first validation."""
        c = self.config
        batches = train_batches(
            self.splits.train, c.batch_size, c.seed, self.step * c.grad_accum,
            self.rank, self.size,
        )  # fmt: skip
        first = self.rank == 0
        fields = (*self.objective.metrics_logged,)
        self.log = TrainLog(self.out / LOG_FILE, self.step, fields) if first else None
        show = first and self.progress
        self.bar = ProgressBar(c.iters, self.step, self.val_loss) if show else None
        if c.val_every and self.step == 0:
            self.validate()
        return batches

    def record(self, stats: StepStats) -> None:
        """A training step in the log and on the bar."""
        if self.log:
            self.log.write(
                step=self.step + 1, learning_rate=stats.learning_rate, grad_norm=stats.grad_norm,
                tokens=self.tokens + stats.tokens, tokens_per_sec=stats.tokens / stats.seconds,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
                elapsed_s=self.elapsed + stats.seconds, **stats.metrics,
            )  # fmt: skip
        if self.bar and stats.finite:
            self.bar.update(stats.metrics, stats.learning_rate, stats.tokens / stats.seconds)

    def close_run(self, last: StepStats | None, diverged: StepStats | None) -> TrainResult:
        """The final save, the test loss, the plot; raises if the run diverged."""
        c = self.config
        self.save()
        if diverged is not None and self.size > 1:  # the others wait for the save
            mx.eval(mx.distributed.all_sum(mx.array(0.0), group=self.world))
        test = {}
        if self.splits.test and not self.interrupted and diverged is None:
            test = self.measure(self.splits.test, c.val_batches)
        if self.bar:
            self.bar.close()
        if self.log:
            self.log.close()
            if c.plot and diverged is None:
                from .plot import plot_log

                plot_log(self.out / LOG_FILE, self.out / PLOT_FILE)
        if diverged is not None:
            raise TrainingError(self.divergence_message(diverged))
        metrics = last.metrics if last else {}
        return TrainResult(
            self.step, metrics.get("loss"), self.val_loss, test.get("loss"), self.interrupted,
            metrics, self.val_metrics,
        )  # fmt: skip

    def divergence_message(self, stats: StepStats) -> str:
        loss, grad_norm, lr = stats.metrics["loss"], stats.grad_norm, stats.learning_rate
        if math.isfinite(loss):
            what = f"the gradient norm became {grad_norm}"
        else:
            what = f"the loss became {loss}"
        clip = "" if self.config.max_grad_norm else " or clip gradients (--max-grad-norm 1.0)"
        return (
            f"step {self.step + 1}: {what}; stopped and kept the adapter of step {self.step} in "
            f"{self.out}. Lower --learning-rate (this step used {lr:.3g}){clip} and train "
            f"again, or --resume from step {self.step}"
        )

    # ---- saving and resuming -------------------------------------------------------------
    def save(self) -> None:
        if self.rank != 0:
            return
        training = {k: v for k, v in asdict(self.config).items() if k != "plot"}
        state = RunState(self.run_id, self.step, self.tokens, self.elapsed, self.val_loss)
        save_run(self.out, self.model, self.lora, training, self.optimizer, state)

    def resume(self) -> None:
        """Continue from the last save: adapter weights, optimizer state, data position.

        The first process reads and checks the files and sends their contents to the
        others, which may run on machines without them; if they do not pass, every process
        raises."""
        failure: TrainingError | OptionError | None = None
        if self.rank == 0:
            try:
                self.load_saved()
            except (TrainingError, OptionError) as e:
                failure = e
        if self.size > 1:
            failed = mx.distributed.all_sum(mx.array(float(failure is not None)), group=self.world)
            if failed.item() and failure is None:
                raise TrainingError("--resume: the first process could not resume (see its error)")
        if failure is not None:
            raise failure
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
        training = asdict(self.config)
        check_options(self.out, self.model, self.lora, training, TrainConfig.RESUME_KEYS)
        state = load_run(self.out, self.model, self.optimizer, self.config.iters)
        self.run_id, self.step, self.tokens = state.run, state.step, state.tokens
        self.elapsed, self.val_loss = state.elapsed_s, state.val_loss
