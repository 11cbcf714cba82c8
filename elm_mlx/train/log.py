"""What a training run shows and records: the progress line, the CSV log, and Ctrl-C."""

from __future__ import annotations

import csv
import signal
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

LOG_FILE = "train_log.csv"
LOG_FIELDS = ("step", "loss", "val_loss", "learning_rate", "grad_norm", "tokens",
              "tokens_per_sec", "peak_memory_gb", "elapsed_s")  # fmt: skip


class TrainLog:
    """train_log.csv: a row per training step and per validation (blank cells where n/a).

    `metrics`: the objective's own columns (e.g. reward_accuracy), each with a val_ twin."""

    def __init__(self, path: Path, resume_step: int = 0, metrics: tuple[str, ...] = ()):
        self.fields = (*LOG_FIELDS, *metrics, *(f"val_{m}" for m in metrics))
        rows: list[list[str]] = []
        if resume_step and path.exists():  # a resumed run drops steps after its last save
            with path.open(newline="") as f:
                rows = [[r.get(name) or "" for name in self.fields] for r in csv.DictReader(f)
                        if r["step"] and int(r["step"]) <= resume_step]  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerows([self.fields, *rows])
        self.file.flush()

    def write(self, **values: float | int | None) -> None:
        cells = [values.get(name) for name in self.fields]
        self.writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v
                              for v in cells])  # fmt: skip
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ProgressBar:
    """One line: step, loss, latest validation loss, learning rate, tokens/s, peak memory, ETA
    (and for preference methods, the reward accuracy of the step and of the validation)."""

    def __init__(self, total: int, initial: int, val_loss: float | None = None):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
            bar_format="{n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}",
        )  # fmt: skip
        self.val_loss = val_loss
        self.val_accuracy: float | None = None
        self.stats: list[str] = ["loss -"]  # of the last step: loss (and accuracy)
        self.rates: list[str] = []  # of the last step: learning rate, tokens/s
        self.show(refresh=True)

    def update(self, metrics: dict[str, float], lr: float, tokens_per_sec: float) -> None:
        """A training step is done."""
        self.stats = [f"loss {metrics['loss']:.3f}"]
        if "reward_accuracy" in metrics:
            self.stats.append(f"acc {metrics['reward_accuracy']:.2f}")
        self.rates = [f"lr {lr:.2e}", f"{tokens_per_sec:,.0f} tok/s"]
        self.show(refresh=False)
        self.bar.update(1)

    def validated(self, step: int, metrics: dict[str, float]) -> None:
        """A validation is done: print it, and show it until the next one."""
        self.val_loss, self.val_accuracy = metrics["loss"], metrics.get("reward_accuracy")
        line = f"step {step}: validation loss {self.val_loss:.3f}"
        if self.val_accuracy is not None:
            line += (f", reward accuracy {self.val_accuracy:.3f}, "
                     f"margin {metrics['reward_margin']:.3f}")  # fmt: skip
        self.write(line)
        self.show(refresh=True)

    def show(self, refresh: bool) -> None:
        val = "-" if self.val_loss is None else f"{self.val_loss:.3f}"
        if self.val_accuracy is not None:
            val += f" acc {self.val_accuracy:.2f}"
        fields = [*self.stats, f"val {val}", *self.rates,
                  f"peak {mx.get_peak_memory() / 1e9:.2f} GB"]  # fmt: skip
        self.bar.set_postfix_str(" | ".join(fields), refresh=refresh)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class StopFlag:
    """Ctrl-C asks the loop to stop after the current step and save; a second one aborts."""

    def __init__(self) -> None:
        self.flag = False
        self.previous: Any = None

    def __enter__(self) -> StopFlag:
        try:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def handle(self, signum: int, frame: Any) -> None:
        self.flag = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def is_set(self, world: mx.distributed.Group) -> bool:
        if world.size() == 1:
            return self.flag
        # Every process must stop at the same step, or the next all_sum would hang.
        return mx.distributed.all_sum(mx.array(float(self.flag)), group=world).item() > 0
