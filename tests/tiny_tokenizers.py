"""Tiny tokenizers the tests train: SentencePiece (byte fallback, as OpenELM's Llama-2 and
OpenLLaMA's) and byte-level BPE (as SmolLM2's and Llama 3's), the chat tokenizers with their
special tokens and templates, and the corpora they are trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split

from elm_mlx.model_folder import SPM_TOKENIZER_CONFIG

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "to be or not to be that is the question",
    "all that glitters is not gold",
    "the capital of france is paris",
    "the capital of italy is rome",
    "one two three four five six seven eight nine ten",
    "alpha beta gamma delta epsilon zeta eta theta",
    "User: hello there\nAssistant: hi, how can I help you today?",
]


BPE_EOS = "<|endoftext|>"


def train_spm_tokenizer(folder: Path, vocab_size: int = 400, text: str | None = None) -> Path:
    """A Llama-style SentencePiece BPE tokenizer (unk 0, BOS 1, EOS 2, byte fallback) plus the
    tokenizer_config.json a Llama repo ships; BOS is prepended on encode. `text` is the
    training corpus (default: this module's CORPUS and the Zephyr role markers)."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    if text is None:
        text = "\n".join(CORPUS * 20) + "\n<|user|> <|assistant|> <|system|>\n"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(SPM_TOKENIZER_CONFIG, indent=2))
    return folder


def train_bpe_tokenizer(folder: Path, vocab_size: int = 320) -> Path:
    """An OLMo-style (GPT-NeoX) byte-level BPE tokenizer.json: `<|endoftext|>` (id 0) is EOS,
    `<|padding|>` (id 1) pad, no BOS, nothing added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS, "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "GPTNeoXTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "eos_token": BPE_EOS,
        "unk_token": BPE_EOS,
        "pad_token": "<|padding|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


# ---------------------------------------------------------------------------- HF configs


SPEC_VOCAB = 320


SPEC_CORPUS = CORPUS[:3] + CORPUS[6:7]  # the fox, the journey, to be, one two three


def spec_tokenizer(folder: Path, vocab: int = SPEC_VOCAB) -> Path:
    """A BPE SentencePiece model (UNK 0, BOS 1, EOS 2) and its tokenizer_config.json."""
    return train_spm_tokenizer(folder, vocab, "\n".join(SPEC_CORPUS * 20) + "\n")


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


CHAT_CORPUS = [
    "hello there, how are you today?",
    "I am fine, thank you. What can I do for you?",
    "tell me about the weather in paris and rome",
    "the quick brown fox jumps over the lazy dog",
    "my name is alice and I like green apples",
    "remember the word banana, please",
    "which word did I ask you to remember?",
    "you are a helpful assistant who answers briefly",
    "User: Assistant: <|user|> <|assistant|> <|system|>",
]


CHAT_KINDS = ("chatml", "zephyr", "plain")


CHAT_BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_chat_bpe(folder: Path, chat_template: str | None) -> tuple[int, int]:
    """A byte-level BPE tokenizer.json over CHAT_CORPUS; returns (EOS id, vocab size). EOS is
    `<|im_end|>` with a template, `<|endoftext|>` without."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=CHAT_BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CHAT_CORPUS * 10, trainer)
    tok.save(str(folder / "tokenizer.json"))
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.token_to_id(eos), tok.get_vocab_size()
