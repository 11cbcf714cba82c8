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

A chat model (one whose tokenizer has a chat template) writes answers to prompts instead: a
random first token sends a chat-tuned model into lists, code and fragments, while asked for a
news article, a letter or a guide it writes running English of many kinds. Calibrated on such
answers beside the Python documentation, the noisy SmolLM2 at 4.5 bits per weight lost 15-22%
less KL on fiction than with text from random first tokens (BENCHMARKS.md, issue 17, twelfth
round), for twice the sampling (answers of up to 256 tokens, against 128 from random starts).
The prompts ask for no fiction, so the fiction the benchmark holds out stays a domain
calibration did not see. Self-calibration (Williams et al. 2025, "Self-calibration for Language
Model Quantization and Pruning", arXiv:2410.17170) likewise generates from the model with no
external data.

A plain sampling loop over the model with its KV cache (models and mx only: the quantizer sits
below the engine; the caller renders the prompts with the tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..models import CausalLM, make_cache

GREEDY_PREFIX = 3  # top-1 tokens after the random start, as LLM-QAT does
NGRAM = 8
PACK = 4  # sequences per window
MAX_SEEN_SHARE = 0.5  # drop a sequence when over half of its 8-grams were seen before
ANSWER = 256  # tokens at most per answer to a prompt

# What a chat model is asked to write: kinds of non-fiction about everyday topics, 192 requests
KINDS = (
    "Write a news article about {}.",
    "Write an encyclopedia entry about {}.",
    "Write a letter to a friend about {}.",
    "Write an opinion essay about {}.",
    "Explain {} to a curious teenager.",
    "Write a product review related to {}.",
    "Write a short speech about {}.",
    "Write a how-to guide about {}.",
)
TOPICS = (
    "the history of bridges", "a small town's farmers market", "volcanoes",
    "learning a second language", "the invention of the printing press", "saving money",
    "migratory birds", "a local football team", "rainy weather", "public libraries",
    "the human heart", "coffee", "electric cars", "the ocean tides", "a famous painter",
    "gardening in spring", "ancient Rome", "city traffic", "friendship", "mountain hiking",
    "the stock market", "bread baking", "the moon landing", "recycling",
)  # fmt: skip


def sample_sequences(
    model: CausalLM,
    prompts: np.ndarray,
    length: int,
    seed: int = 0,
    temperature: float = 1.0,
    greedy: int = 0,
    stops: Sequence[int] = (),
) -> np.ndarray:
    """`length` tokens sampled after each prompt, as one batch: prompts (B, P) -> (B, length)
    token ids; the first `greedy` are the model's top choices. A row that samples one of `stops`
    has ended: it leaves the batch (the cache keeps only the rows still writing) and is padded
    with `stops[0]`; sampling ends when every row has."""
    key = mx.random.key(seed)
    cache = make_cache(model)
    out = np.full((len(prompts), length), stops[0] if stops else 0, np.int32)
    rows = np.arange(len(prompts))  # the batch's rows in `out`
    ended = np.zeros(len(rows), bool)
    tokens = mx.array(prompts, mx.int32)  # (B, P), then (b, 1) per step
    for step in range(length):
        logits = model(tokens, cache)[:, -1].astype(mx.float32)  # (b, V)
        if step < greedy:
            tokens = mx.argmax(logits, axis=-1)
        else:
            key, sub = mx.random.split(key)
            tokens = mx.random.categorical(logits / temperature, key=sub)
        tokens = tokens.astype(mx.int32)[:, None]
        out[rows, step] = np.array(tokens)[:, 0]
        if not stops:
            continue
        ended |= np.isin(out[rows, step], stops)
        if ended.all():
            break
        if ended.sum() >= max(1, len(rows) // 8):  # drop the ended rows now and then
            keep = np.flatnonzero(~ended)
            index = mx.array(keep)
            for c in cache:
                keys, values = c.state
                c.state = (keys[index], values[index])
            tokens, rows, ended = tokens[index], rows[keep], ended[keep]
    return out


def deduplicate(sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The sequences (each 1-D, e.g. the rows of an (N, L) array) in order, without those mostly
    made of 8-grams already seen (in earlier sequences or earlier in themselves: loops)."""
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
        starts = rng.integers(0, vocab, size=(max(need, batch), 1))  # one batch
        rows = sample_sequences(model, starts, length - 1, seed + attempt, greedy=GREEDY_PREFIX)
        rows = np.concatenate([starts, rows], axis=1)
        kept = deduplicate(np.vstack([*kept, rows]))[:want]  # kept rows are 1-D, rows 2-D
    per = window // length
    n = len(kept) // per
    if n == 0:
        return np.zeros((0, window), np.int32)
    return np.stack(kept[: n * per]).reshape(n, per * length)[:, :window].astype(np.int32)


def first(row: np.ndarray, ends: Sequence[int]) -> int:
    """The index of the first of `ends` in the 1-D row, or its length."""
    hits = np.flatnonzero(np.isin(row, ends))
    return int(hits[0]) if len(hits) else len(row)


def requests(seed: int = 0) -> list[str]:
    """Every request of KINDS x TOPICS, in a seeded order (any leading slice spreads over both)."""
    asks = [kind.format(topic) for kind in KINDS for topic in TOPICS]
    return [asks[i] for i in np.random.default_rng(seed).permutation(len(asks))]


def answered_windows(
    model: CausalLM,
    prompts: list[list[int]],
    count: int,
    window: int,
    ends: Sequence[int],
    seed: int = 0,
) -> np.ndarray:
    """Up to `count` windows (n, window) of the model's answers to chat prompts (token ids, as
    the chat template renders them; as many are asked as it takes, one batch at a time). Each
    answer is cut at the first of `ends` and followed by `ends[0]`, the answers packed one after
    another as pretraining packs documents; near-duplicates are dropped. The prompts of a batch
    are left-padded with `ends[0]` to one length: to the model, ends of earlier turns."""
    want = count * window
    batch = max(8, -(-2 * want // ANSWER))  # answers run to about two thirds of ANSWER
    kept: list[np.ndarray] = []
    for attempt, start in enumerate(range(0, len(prompts), batch)):
        if attempt == 3 or sum(len(a) + 1 for a in kept) >= want:
            break
        group = prompts[start : start + batch]
        width = max(map(len, group))
        rows = np.array([[ends[0]] * (width - len(p)) + p for p in group], np.int32)
        new = sample_sequences(model, rows, ANSWER, seed + attempt, stops=ends)
        answers = [row[: first(row, ends)] for row in new]
        kept = deduplicate([*kept, *(a for a in answers if len(a) >= NGRAM)])
    if not kept:
        return np.zeros((0, window), np.int32)
    stream = np.concatenate([np.append(a, ends[0]) for a in kept])
    n = min(count, len(stream) // window)
    return stream[: n * window].reshape(n, window).astype(np.int32)
