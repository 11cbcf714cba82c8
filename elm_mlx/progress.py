"""What a training run shows and records: the progress line, the CSV log, and Ctrl-C."""

from __future__ import annotations

import csv
import signal
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

LOG_FILE = "train_log.csv"
LOG_FIELDS = ("step", "loss", "val_loss", "learning_rate", "tokens", "tokens_per_sec",
              "peak_memory_gb", "elapsed_s")  # fmt: skip


class TrainLog:
    """train_log.csv: a row per training step and per validation (blank cells where n/a)."""

    def __init__(self, path: Path, resume_step: int = 0):
        rows: list[list[str]] = []
        if resume_step and path.exists():  # a resumed run drops steps after its last save
            with path.open(newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerows([LOG_FIELDS, *rows])
        self.file.flush()

    def write(self, **values: float | int | None) -> None:
        cells = [values.get(name) for name in LOG_FIELDS]
        self.writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v
                              for v in cells])  # fmt: skip
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ProgressBar:
    """One line: step, loss, validation loss, learning rate, tokens/s, peak memory, ETA."""

    def __init__(self, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
            bar_format="{n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}",
        )  # fmt: skip

    def update(self, loss: float, val_loss: float | None, lr: float, tokens_per_sec: float):
        val = "-" if val_loss is None else f"{val_loss:.3f}"
        self.bar.set_postfix_str(
            f"loss {loss:.3f} | val {val} | lr {lr:.2e} | {tokens_per_sec:,.0f} tok/s | "
            f"peak {mx.get_peak_memory() / 1e9:.2f} GB",
            refresh=False,
        )
        self.bar.update(1)

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
