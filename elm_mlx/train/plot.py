"""`--plot`: the loss curves of a training log as a PNG, with no plotting library.

Training loss is drawn in blue, validation loss in orange, on a grid with numbered axes
(step across, loss up). A preference run's log (DPO, ORPO) adds a second panel below: the
reward accuracy of training steps and validations. A 3x5 pixel font covers the few characters
the labels need.
"""

from __future__ import annotations

import csv
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 40
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)
GRID, AXIS, TEXT = (225, 225, 225), (60, 60, 60), (30, 30, 30)
SCALE = 2  # font pixels per glyph pixel

# Each glyph: 5 rows of 3 bits, top row first.
FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 2, 2),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7), "t": (2, 7, 2, 2, 3), "r": (0, 6, 5, 4, 4), "a": (0, 6, 1, 7, 7),
    "i": (2, 0, 2, 2, 2), "n": (0, 6, 5, 5, 5), "v": (0, 5, 5, 5, 2), "l": (6, 2, 2, 2, 7),
    "s": (0, 7, 6, 1, 7), "o": (0, 7, 5, 5, 7), "p": (0, 7, 5, 7, 4), " ": (0, 0, 0, 0, 0),
    "w": (0, 5, 5, 7, 5), "d": (1, 7, 5, 5, 7), "c": (0, 7, 4, 4, 7), "u": (0, 5, 5, 5, 7),
    "y": (5, 5, 7, 1, 7),
}  # fmt: skip


def write_png(path: Path, image: np.ndarray) -> None:
    """image (H, W, 3) uint8 -> an RGB PNG file."""
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    png += chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def draw_text(image: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int]) -> None:
    for i, char in enumerate(text):
        for r, bits in enumerate(FONT.get(char, FONT[" "])):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    x0, y0 = x + (4 * i + c) * SCALE, y + r * SCALE
                    image[y0 : y0 + SCALE, x0 : x0 + SCALE] = color


def text_width(text: str) -> int:
    return len(text) * 4 * SCALE


def draw_line(image: np.ndarray, points: np.ndarray, color: tuple[int, int, int]) -> None:
    """points (N, 2) pixel x, y: a 2-pixel-wide polyline."""
    height, width, _ = image.shape
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs = np.linspace(x0, x1, n).round().astype(int)
        ys = np.linspace(y0, y1, n).round().astype(int)
        for dx in (0, 1):
            for dy in (0, 1):
                image[np.clip(ys + dy, 0, height - 1), np.clip(xs + dx, 0, width - 1)] = color
    if len(points) == 1:
        x, y = points[0].round().astype(int)
        image[y - 2 : y + 3, x - 2 : x + 3] = color


def label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.1e}".replace("+", "")


def read_curves(log: Path, column: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(step, value) pairs of `column` for training and of val_`column` for validation."""
    train, val = [], []
    with log.open() as f:
        for row in csv.DictReader(f):
            if row.get(column):
                train.append((float(row["step"]), float(row[column])))
            if row.get(f"val_{column}"):
                val.append((float(row["step"]), float(row[f"val_{column}"])))
    return np.array(train).reshape(-1, 2), np.array(val).reshape(-1, 2)


def plot_log(log: Path, out: Path) -> Path:
    panels = [("loss", "train loss", "val loss")]
    accuracy = read_curves(log, "reward_accuracy")
    if any(len(c) for c in accuracy):
        panels.append(("reward_accuracy", "train reward accuracy", "val reward accuracy"))
    image = np.full((HEIGHT * len(panels), WIDTH, 3), 255, np.uint8)
    for i, (column, train_label, val_label) in enumerate(panels):
        panel = image[i * HEIGHT : (i + 1) * HEIGHT]  # a view: drawing on it draws on image
        draw_panel(panel, *read_curves(log, column))
        draw_text(panel, train_label, LEFT, 12, BLUE)
        draw_text(panel, val_label, LEFT + text_width(train_label + "  "), 12, ORANGE)
        draw_text(panel, "step", WIDTH - RIGHT - text_width("step"), HEIGHT - 16, TEXT)
    write_png(out, image)
    return out


def draw_panel(image: np.ndarray, train: np.ndarray, val: np.ndarray) -> None:
    """The grid, numbered axes and both curves on an image (HEIGHT, WIDTH, 3)."""
    both = np.concatenate([train, val])
    if not len(both):
        return
    (x_lo, y_lo), (x_hi, y_hi) = both.min(axis=0), both.max(axis=0)
    x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-3)
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = (y_lo - pad if y_lo < 0 else max(0.0, y_lo - pad)), y_hi + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_pixels(data: np.ndarray) -> np.ndarray:
        x = LEFT + (data[:, 0] - x_lo) / (x_hi - x_lo) * plot_w
        y = TOP + (y_hi - data[:, 1]) / (y_hi - y_lo) * plot_h
        return np.stack([x, y], axis=1)

    for t in np.linspace(0, 1, 6):
        gx, gy = int(LEFT + t * plot_w), int(TOP + t * plot_h)
        image[TOP : HEIGHT - BOTTOM, gx] = GRID
        image[gy, LEFT : WIDTH - RIGHT] = GRID
        y_text = label(y_hi - t * (y_hi - y_lo))
        draw_text(image, y_text, LEFT - 6 - text_width(y_text), gy - 5, TEXT)
        x_text = str(round(x_lo + t * (x_hi - x_lo)))
        draw_text(image, x_text, gx - text_width(x_text) // 2, HEIGHT - BOTTOM + 8, TEXT)
    image[TOP : HEIGHT - BOTTOM, LEFT] = AXIS
    image[HEIGHT - BOTTOM, LEFT : WIDTH - RIGHT] = AXIS
    for data, color in ((train, BLUE), (val, ORANGE)):
        if len(data):
            draw_line(image, to_pixels(data), color)
