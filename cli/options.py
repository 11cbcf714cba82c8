"""What several commands share: sampling options (their defaults stay in GenerationConfig), the
one place a GenerationConfig is built from flags, and the flag that names a library option."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine.config import GenerationConfig
from ..models import CausalLM

GENERATION = GenerationConfig()  # the defaults the options show

MaxTokens = Annotated[int, typer.Option(help="Most new tokens.")]
Temp = Annotated[float, typer.Option(help="Temperature; 0 is greedy.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass.")]
TopK = Annotated[int, typer.Option(help="Keep the k most likely tokens (0: all).")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min_p * p_max.")]
RepetitionPenalty = Annotated[
    float | None, typer.Option(help="Hugging Face repetition penalty (1.0: none).")
]
Seed = Annotated[int | None, typer.Option(help="Random seed.")]
PromptLookup = Annotated[
    int | None, typer.Option(help="Prompt-lookup speculative decoding: tokens proposed per step.")
]
MaxNgram = Annotated[int, typer.Option(help="Longest n-gram prompt lookup matches.")]
DraftModel = Annotated[
    str | None, typer.Option(help="Draft model (folder or hub id) for speculative decoding.")
]
NumDraft = Annotated[int, typer.Option(help="Tokens the draft model proposes per step.")]
Adapter = Annotated[Path | None, typer.Option(help="LoRA adapter folder.")]
ChatTemplate = Annotated[
    Path | None,
    typer.Option(help="Jinja chat template file (or a JSON file with 'chat_template')."),
]
# A hub id given as --model is converted once into the local cache (convert/cache.py).
HubBits = Annotated[int, typer.Option(help="For a hub id: quantize to 4 or 8 bits on first use.")]
HubQuantize = Annotated[
    bool, typer.Option(help="For a hub id: --no-quantize keeps float16 weights.")
]
HfToken = Annotated[
    str | None, typer.Option(help="Hub token for gated repos (default: $HF_TOKEN).")
]

# Library option names whose flag is not `--` + the name with dashes.
RENAMED_FLAGS = {"temperature": "--temp"}


def flag(option: str) -> str:
    """The command-line flag of a library option (a dataclass field name)."""
    return RENAMED_FLAGS.get(option, "--" + option.replace("_", "-"))


def generation_config(
    *,
    max_tokens: int,
    temp: float,
    top_p: float,
    top_k: int,
    min_p: float,
    repetition_penalty: float | None,
    seed: int | None,
    prompt_lookup: int | None,
    max_ngram: int,
    stop: list[str] | None = None,
    draft_model: CausalLM | None = None,
    num_draft: int = GENERATION.num_draft,
) -> GenerationConfig:
    """The GenerationConfig of the sampling flags (validated: an OptionError names the field)."""
    config = GenerationConfig(
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
        prompt_lookup=prompt_lookup,
        max_ngram=max_ngram,
        draft_model=draft_model,
        num_draft=num_draft,
    )
    config.validate()
    return config
