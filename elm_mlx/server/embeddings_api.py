"""POST /v1/embeddings (OpenAI's shape): `input` as a string, a list of strings, a list of token
ids or a list of token-id lists; `encoding_format` float or base64 (little-endian float32, as
OpenAI's clients decode it). The vectors come from elm_mlx.engine.embeddings on the worker."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..tokenizer import encode_prompt
from .protocol import APIError, Served, _check_length, _check_model, _Strict, _text, read_body

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingBody(_Strict):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


@dataclass(frozen=True)
class EmbeddingJob:
    texts: list[list[int]]  # token ids, one list per input
    base64: bool


def embedding_job(data: dict[str, Any], served: Served) -> EmbeddingJob:
    body = read_body(data, EmbeddingBody)
    _check_model(body, served)
    if body.dimensions is not None:
        raise APIError(400, "dimensions is not supported: vectors have the model's width",
                       "dimensions")  # fmt: skip
    inputs: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
    if inputs and isinstance(inputs[0], int):
        inputs = [inputs]  # one text as token ids
    if not inputs:
        raise APIError(400, "input must hold at least one text", "input")
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"input holds {len(inputs)} texts, at most {MAX_INPUTS}", "input")
    texts = []
    for i, item in enumerate(inputs):
        param = "input" if isinstance(body.input, str) else f"input[{i}]"
        if isinstance(item, str):
            _check_length(len(item), served, param)
            tokens = encode_prompt(served.tokenizer, _text(item, param)) if item else []
        else:
            if any(not 0 <= t < served.vocab_size for t in item):
                raise APIError(400, f"token ids must be in [0, {served.vocab_size})", param)
            tokens = list(item)
        if not tokens:
            raise APIError(400, f"{param} is empty", param)
        if len(tokens) > served.context_length:
            raise APIError(
                400,
                f"{param} is {len(tokens)} tokens and the context holds "
                f"{served.context_length}: send a shorter text",
                param,
                "context_length_exceeded",
            )
        texts.append(tokens)
    return EmbeddingJob(texts, body.encoding_format == "base64")


def embedding_response(job: EmbeddingJob, vectors: np.ndarray, model_id: str) -> dict[str, Any]:
    """vectors: (N, D) float32, in the order of the inputs."""
    data = []
    for i, vector in enumerate(vectors):
        if job.base64:
            encoded: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            encoded = vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = sum(map(len, job.texts))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model_id, "usage": usage}
