"""What several commands share: the generation flags, declared once here (their defaults are
GenerationConfig's), the model-loading flags, and the flag that names a library option."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..engine.config import GenerationConfig

GENERATION = GenerationConfig()  # the defaults the options show
PANEL = "Generation options"  # their own section of --help


@dataclass(frozen=True)
class GenerationFlag:
    """A GenerationConfig field as a command-line option."""

    type: Any  # what the command line parses (a list for a repeatable flag)
    help: str
    name: str | None = None  # the flag, when it is not `--` + the field name with dashes


GENERATION_FLAGS: dict[str, GenerationFlag] = {
    "max_tokens": GenerationFlag(int, "Most new tokens (per answer in a chat)."),
    "temperature": GenerationFlag(float, "Temperature; 0 is greedy.", "--temp"),
    "top_p": GenerationFlag(float, "Nucleus sampling: the smallest set of tokens with this mass."),
    "top_k": GenerationFlag(int, "Keep the k most likely tokens (0: all)."),
    "min_p": GenerationFlag(float, "Drop tokens below min_p * p_max."),
    "repetition_penalty": GenerationFlag(
        float | None, "Hugging Face repetition penalty (1.0: none)."
    ),
    "seed": GenerationFlag(int | None, "Random seed."),
    "stop": GenerationFlag(list[str] | None, "Stop at this string (repeatable)."),
    "prompt_lookup": GenerationFlag(
        int | None, "Prompt-lookup speculative decoding: tokens proposed per step."
    ),
    "max_ngram": GenerationFlag(int, "Longest n-gram prompt lookup matches."),
    "num_draft": GenerationFlag(int, "Tokens the draft model proposes per step."),
    "kv_bits": GenerationFlag(
        int | None, "Quantize the KV cache's keys and values to 8 or 4 bits."
    ),
    "kv_group_size": GenerationFlag(int, "KV quantization group along the head dimension."),
    "kv_full_tokens": GenerationFlag(int, "First tokens kept unquantized in the KV cache."),
    "kv_recent_tokens": GenerationFlag(
        int,
        "Quantized KV cache: each token attends to this many last tokens unquantized (KIVI's "
        "window; 0: none).",
    ),
    "max_kv_size": GenerationFlag(
        int | None, "Keep 4 first tokens and the last ones in the KV cache, this many in all."
    ),
}


# The KV cache's fields, for the commands that take all of them.
KV_FIELDS = ("kv_bits", "kv_group_size", "kv_full_tokens", "kv_recent_tokens", "max_kv_size")


def flag(option: str) -> str:
    """The command-line flag of a library option (a dataclass field name)."""
    known = GENERATION_FLAGS.get(option)
    return (known and known.name) or "--" + option.replace("_", "-")


Command = TypeVar("Command", bound=Callable[..., Any])


def generation_options(*fields: str) -> Callable[[Command], Command]:
    """Give a command the flags of these GenerationConfig fields. The command declares a
    keyword `config: GenerationConfig` instead, and receives them in it, validated before the
    command runs (an OptionError names the field; the CLI turns it into the flag)."""
    unknown = set(fields) - set(GENERATION_FLAGS)
    if unknown:
        raise ValueError(f"no generation flag for {sorted(unknown)}")

    def option(field: str) -> inspect.Parameter:
        spec, default = GENERATION_FLAGS[field], getattr(GENERATION, field)
        info = typer.Option(flag(field), help=spec.help, rich_help_panel=PANEL)
        return inspect.Parameter(
            field,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[spec.type, info],
            default=None if default == () else default,  # a repeatable flag: none given
        )

    def decorate(command: Command) -> Command:
        own = inspect.signature(command, eval_str=True).parameters
        if "config" not in own:
            raise TypeError(f"{command.__name__} must take a keyword `config: GenerationConfig`")
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own.values()]
        params = [p for p in params if p.name != "config"] + [option(f) for f in fields]

        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            flags = {f: values.pop(f) for f in fields}
            if "stop" in flags:
                flags["stop"] = flags["stop"] or ()  # none given
            return command(**values, config=GenerationConfig(**flags).normalized())

        wrapper.__signature__ = inspect.Signature(params)  # what typer reads
        return wrapper  # type: ignore[return-value]

    return decorate


# Options that are no GenerationConfig field but still shared.
DraftModel = Annotated[
    str | None, typer.Option(help="Draft model (folder or hub id) for speculative decoding.")
]
Adapter = Annotated[Path | None, typer.Option(help="LoRA adapter folder.")]
ChatTemplate = Annotated[
    Path | None,
    typer.Option(help="Jinja chat template file (or a JSON file with 'chat_template')."),
]
# The KV cache's flags for commands without the generation panel (eval, cache-prompt).
KvBits = Annotated[int | None, typer.Option(help=GENERATION_FLAGS["kv_bits"].help)]
KvGroupSize = Annotated[int, typer.Option(help=GENERATION_FLAGS["kv_group_size"].help)]
KvFullTokens = Annotated[int, typer.Option(help=GENERATION_FLAGS["kv_full_tokens"].help)]
KvRecentTokens = Annotated[int, typer.Option(help=GENERATION_FLAGS["kv_recent_tokens"].help)]
MaxKvSize = Annotated[int | None, typer.Option(help=GENERATION_FLAGS["max_kv_size"].help)]
# A hub id given as --model is converted once into the local cache (convert/hub_cache.py).
HubBits = Annotated[int, typer.Option(help="For a hub id: quantize to 4 or 8 bits on first use.")]
HubQuantize = Annotated[
    bool, typer.Option(help="For a hub id: --no-quantize keeps float16 weights.")
]
HfToken = Annotated[
    str | None, typer.Option(help="Hub token for gated repos (default: $HF_TOKEN).")
]


def model_name(model: str, adapter: Path | None) -> str:
    """What a prompt cache file names its model by: the folder's name (or the hub id as given),
    and the adapter's."""
    name = Path(model).expanduser().resolve().name if Path(model).expanduser().exists() else model
    return name if adapter is None else f"{name}+{Path(adapter).expanduser().resolve().name}"
