"""Calibration text written by the float model itself.

Following LLM-QAT (Liu et al. 2023, "LLM-QAT: Data-Free Quantization Aware Training for Large
Language Models", arXiv:2305.17888): each sequence starts from a random first token, takes the
model's top-1 choice for a few tokens (so it settles into something the model finds likely),
then samples from its next-token distribution. What the model writes reflects every domain its
training covered in proportion to what it learned, where any one fixed text covers one domain;
Williams & Aletras 2024 ("On the Impact of Calibration Data in Post-training Quantization and
Pruning", arXiv:2311.09755) find the calibration set's domain moves downstream quality, and that
self-generated text is a competitive choice. Degenerate output (loops) and near-duplicates are
dropped: a sequence whose 8-grams were mostly seen already adds nothing.

A plain sampling loop over the model with its KV cache (models and mx only: the quantizer sits
below the engine).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..models import CausalLM, make_cache

GREEDY_PREFIX = 3  # top-1 tokens after the random start, as LLM-QAT does
NGRAM = 8
PACK = 4  # sequences per window
MAX_SEEN_SHARE = 0.5  # drop a sequence when over half of its 8-grams were seen before


def sample_sequences(
    model: CausalLM,
    starts: list[int],
    length: int,
    seed: int = 0,
    temperature: float = 1.0,
) -> np.ndarray:
    """One sampled sequence of `length` tokens per start token, as one batch: (len(starts),
    length) token ids."""
    key = mx.random.key(seed)
    cache = make_cache(model)
    tokens = mx.array(starts, mx.int32)[:, None]  # (B, 1)
    out = [tokens]
    for step in range(length - 1):
        logits = model(tokens, cache)[:, -1].astype(mx.float32)  # (B, V)
        if step < GREEDY_PREFIX:
            tokens = mx.argmax(logits, axis=-1)
        else:
            key, sub = mx.random.split(key)
            tokens = mx.random.categorical(logits / temperature, key=sub)
        tokens = tokens.astype(mx.int32)[:, None]
        out.append(tokens)
        mx.eval(tokens)
    return np.array(mx.concatenate(out, axis=1))


def deduplicate(sequences: np.ndarray) -> list[np.ndarray]:
    """The sequences (N, L) in order, without those mostly made of 8-grams already seen (in
    earlier sequences or earlier in themselves: loops)."""
    seen: set[bytes] = set()
    kept = []
    for seq in sequences:
        grams = [seq[i : i + NGRAM].tobytes() for i in range(len(seq) - NGRAM + 1)]
        repeated = len(grams) - len(set(grams)) + sum(g in seen for g in set(grams))
        if repeated <= MAX_SEEN_SHARE * len(grams):
            kept.append(seq)
        seen.update(grams)
    return kept


def self_generated_windows(
    model: CausalLM, vocab: int, count: int, window: int, seed: int = 0, batch: int = 8
) -> np.ndarray:
    """Up to `count` windows (n, window) of text the model wrote (fewer if too much of what it
    wrote repeats itself). Sequences are `window / PACK` long, packed PACK to a window (short
    sequences in one batch make the sampling loop cheap: its cost is per step, not per row;
    packing documents is how pretraining reads them)."""
    length = max(window // PACK, NGRAM + GREEDY_PREFIX)
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    want = count * window // length
    for attempt in range(3):  # a model that loops a lot gets two more tries
        need = want - len(kept)
        if need <= 0:
            break
        starts = rng.integers(0, vocab, size=max(need, batch)).tolist()  # one batch
        rows = sample_sequences(model, starts, length, seed=seed + attempt)
        kept = deduplicate(np.vstack([*kept, rows]))[:want]  # kept rows are 1-D, rows 2-D
    per = window // length
    n = len(kept) // per
    if n == 0:
        return np.zeros((0, window), np.int32)
    return np.stack(kept[: n * per]).reshape(n, per * length)[:, :window].astype(np.int32)
