"""Every generation option and its default, in one place: the library, `elm generate`,
`elm chat` and `elm serve` all fill this dataclass, and `normalized()` is the one check of a
request's options that every front-end goes through."""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..errors import GenerationError, OptionError
from ..models import PREFILL_STEP_SIZE, CausalLM
from .batch_kv import KVConfig
from .constraint import ConstraintSpec
from .sampling import LogitsProcessor, Transform, make_logits_processors, make_transform

# Bounds on what one request may cost per step (a server takes these fields from strangers):
# a proposal of k tokens makes every verify pass of its batch k + 1 tokens wide, and speculation
# stops paying well before 64; n-grams longer than 16 tokens find nothing shorter ones would not;
# every stop string is searched for after every token of its row (OpenAI allows 4).
MAX_PROPOSAL = 64  # prompt_lookup, num_draft
MAX_NGRAM = 16
MAX_STOPS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class GenerationConfig:
    """Generation options. `validate()` names the first field whose value cannot be used."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    prefill_step_size: int = PREFILL_STEP_SIZE
    # speculative decoding: prompt lookup (n-gram) or a draft model
    prompt_lookup: int | None = None
    max_ngram: int = 3
    draft_model: CausalLM | None = field(default=None, compare=False, repr=False)
    num_draft: int = 4
    # the output must match this (JSON schema, JSON object, regular expression, grammar)
    constraint: ConstraintSpec | None = None
    # the KV cache: quantized (8 or 4 bits, the first tokens and each query's last ones read in
    # full precision), windowed
    kv_bits: int | None = KVConfig.bits
    kv_group_size: int = KVConfig.group_size
    kv_full_tokens: int = KVConfig.full_tokens
    kv_recent_tokens: int = KVConfig.recent_tokens
    max_kv_size: int | None = KVConfig.max_size

    def validate(self) -> None:
        stops = (self.stop,) if isinstance(self.stop, str) else self.stop
        checks = (
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0: all tokens)"),
            ("min_p", 0.0 <= self.min_p < 1.0, "must be in [0, 1)"),
            (
                "repetition_penalty",
                self.repetition_penalty is None or self.repetition_penalty > 0,
                "must be > 0",
            ),
            ("seed", self.seed is None or self.seed >= 0, "must be >= 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("prefill_step_size", self.prefill_step_size >= 1, "must be >= 1"),
            (
                "prompt_lookup",
                self.prompt_lookup is None or 0 <= self.prompt_lookup <= MAX_PROPOSAL,
                f"must be in [0, {MAX_PROPOSAL}]",
            ),
            ("max_ngram", 1 <= self.max_ngram <= MAX_NGRAM, f"must be in [1, {MAX_NGRAM}]"),
            ("num_draft", 1 <= self.num_draft <= MAX_PROPOSAL, f"must be in [1, {MAX_PROPOSAL}]"),
            ("stop", len(stops) <= MAX_STOPS, f"must hold at most {MAX_STOPS} strings"),
            (
                "stop",
                all(len(s) <= MAX_STOP_CHARS for s in stops),
                f"strings must be at most {MAX_STOP_CHARS} characters",
            ),
        )
        for name, ok, problem in checks:
            if not ok:
                raise OptionError(name, f"{problem}, got {reprlib.repr(getattr(self, name))}")
        self.kv_config().validate()
        if self.prompt_lookup and self.draft_model is not None:
            raise OptionError("prompt_lookup", "and a draft model cannot be combined: use one")
        if self.constraint is not None:
            if not isinstance(self.constraint, ConstraintSpec):
                raise OptionError(
                    "constraint", f"must be a ConstraintSpec, got {self.constraint!r}"
                )
            self.constraint.validate()

    def normalized(self) -> GenerationConfig:
        """This config with a lone stop string made a tuple, validated (OptionError)."""
        config = self
        if isinstance(self.stop, str):
            config = replace(self, stop=(self.stop,))
        elif not isinstance(self.stop, tuple):
            config = replace(self, stop=tuple(self.stop))
        config.validate()
        return config

    def kv_config(self) -> KVConfig:
        """The batch cache these options ask for (`batch_kv.make_batch_cache`)."""
        return KVConfig(
            self.kv_bits,
            self.kv_group_size,
            self.kv_full_tokens,
            recent_tokens=self.kv_recent_tokens,
            max_size=self.max_kv_size,
        )

    @property
    def speculative(self) -> bool:
        return bool(self.prompt_lookup) or self.draft_model is not None

    def transform(self) -> Transform | None:
        """The sampling distribution's transform; None when decoding is greedy."""
        if self.temperature <= 0:
            return None
        return make_transform(self.temperature, self.top_p, self.top_k, self.min_p)

    def logits_processors(self) -> list[LogitsProcessor]:
        return make_logits_processors(self.repetition_penalty)


def check_prompt(prompt: Sequence[int]) -> list[int]:
    """A request's prompt as a list of token ids; an empty one is refused."""
    tokens = [int(t) for t in prompt]
    if not tokens:
        raise GenerationError("the prompt is empty: give at least one token")
    return tokens
