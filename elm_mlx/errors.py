"""Domain exceptions. The CLI translates each into one clear message and a non-zero exit."""

from __future__ import annotations


class ElmError(Exception):
    """Base class for every error elm-mlx reports to a user."""


class ModelNotFoundError(ElmError):
    """A path or hub id does not name a model we can read."""


class ConfigError(ElmError):
    """config.json is missing, unreadable or describes an unsupported model."""


class UnsupportedModelError(ConfigError):
    """config.json names a model_type elm-mlx has no implementation for."""


class WeightsError(ElmError):
    """Weight files are missing, corrupt, or do not match the config."""


class TokenizerError(ElmError):
    """No usable tokenizer could be found or loaded."""


class OutputError(ElmError):
    """The output location cannot be written."""


class GenerationError(ElmError):
    """Generation was asked for something it cannot do (bad options, incompatible models)."""


class AdapterError(ElmError):
    """A LoRA adapter folder is missing, invalid, or does not fit the model."""


class DataError(ElmError):
    """A fine-tuning dataset is missing or has bad rows."""


class TrainingError(ElmError):
    """Fine-tuning options are invalid or a run cannot be resumed."""


class ChatError(ElmError):
    """A chat command, conversation file or chat template is invalid."""


class PromptCacheError(ElmError):
    """A prompt cache file cannot be used: unreadable, or made for another model or KV settings."""


class PromptCacheMismatch(PromptCacheError):
    """A readable prompt cache file made for another model or other KV settings."""


class OptionError(ElmError):
    """An option has a value it cannot take. `option` is the field of the options dataclass
    (GenerationConfig, ConvertOptions, TrainConfig, LoRAConfig, ...); the CLI names the flag."""

    def __init__(self, option: str, problem: str):
        self.option, self.problem = option, problem
        super().__init__(f"{option} {problem}")


class ServeError(ElmError):
    """`elm serve` cannot start: the address is taken or an option has no valid value."""


class EvaluationError(ElmError):
    """Perplexity or benchmark evaluation was given text, tasks or options it cannot use."""
