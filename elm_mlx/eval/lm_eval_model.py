"""elm as an lm-evaluation-harness model, registered as `elm`, and task runs through it.

`lm_eval --model elm --model_args model=PATH[,adapter=DIR] --batch_size N` finds the class
through the `lm_eval.models` entry point (lm-eval releases that read it) or, with any release,
through `python -m elm_mlx.eval.lm_eval_cli` / `elm eval`. Tokenization follows lm-eval's own
Hugging Face model (`hf`), so the two give the same requests and, on the same weights, the same
log-likelihoods. Under `mlx.launch`, every process runs lm-eval in full but scores only its share
of the requests; the results are exchanged, so every process sees all of them.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from ..engine.config import GenerationConfig
from ..engine.scheduler import batch_generate
from ..errors import EvaluationError
from ..loader import load
from ..models import CausalLM, context_length
from ..tokenizer import Tokenizer, render_chat
from .loglikelihood import EvalConfig, loglikelihoods, owners, share
from .perplexity import score_tokens

DEFAULTS = EvalConfig()


def _progress(total: int, desc: str, disable: bool) -> tuple[Callable[[int, int], None], Any]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, disable=disable)

    def update(done: int, _total: int) -> None:
        bar.update(min(done, total) - bar.n)

    return update, bar


@register_model("elm")
class ElmLM(TemplateLM):
    """An elm model folder (or hub id) for lm-eval. `model_args`: model, adapter, max_length
    (default: the model's context), add_bos_token, max_gen_toks; lm-eval's --batch_size."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        adapter: str | os.PathLike | None = None,
        batch_size: int | str | None = DEFAULTS.batch_size,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        max_gen_toks: int = DEFAULTS.max_gen_toks,
        device: str | None = None,  # lm-eval passes it; MLX picks the device itself
        max_batch_size: int | None = None,  # lm-eval passes it; unused (no "auto" search)
        loaded: tuple[CausalLM, Tokenizer] | None = None,  # already loaded; `model` names it
    ) -> None:
        super().__init__()
        if model is None and loaded is None:
            raise EvaluationError("give the model as model=PATH (lm_eval --model_args)")
        self.model, self.tokenizer = loaded or load(model, adapter_path=adapter)
        self.model_name = str(model or self.model.model_type)
        self._batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else context_length(self.model)
        self.add_bos_token = add_bos_token
        self._max_gen_toks = int(max_gen_toks)
        self.world = mx.distributed.init()

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Stands in for an empty context: BOS, or EOS for tokenizers without one (as `hf`)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.model_name.replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int = 0
    ) -> list[int]:
        """As lm-eval's `hf`: the tokenizer's default special tokens unless told (or unless
        the text already starts with BOS)."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = list(self.tokenizer.encode(string, **kwargs))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return render_chat(
            self.tokenizer, chat_history, self.model.model_type,
            add_generation_prompt=add_generation_prompt,
        )  # fmt: skip

    # ------------------------------------------------------------------ requests
    @property
    def _quiet(self) -> bool:
        return self.world.rank() != 0

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        update, bar = _progress(len(requests), "loglikelihood", disable_tqdm or self._quiet)
        pairs = [(context, continuation) for _, context, continuation in requests]
        try:
            return loglikelihoods(
                self.model, pairs, self.max_length, self.batch_size, self.world, update
            )
        finally:
            bar.close()

    def _split(self, costs: list[int], work: Callable[[int], Any], desc: str, quiet: bool) -> list:
        """work(i) for each item this process owns; every process gets all results."""
        return self._split_batches(costs, lambda items: [work(i) for i in items], 1, desc, quiet)

    def _split_batches(
        self,
        costs: list[int],
        work: Callable[[list[int]], list[Any]],
        size: int,
        desc: str,
        quiet: bool,
    ) -> list:
        """work(items) for the items this process owns, `size` at a time; every process gets
        all results."""
        owner = owners(costs, self.world.size())
        mine = [i for i, rank in enumerate(owner) if rank == self.world.rank()]
        update, bar = _progress(len(costs), desc, quiet or self._quiet)
        local = {}
        for start in range(0, len(mine), size):
            items = mine[start : start + size]
            local.update(zip(items, work(items), strict=True))
            update(len(local) * self.world.size(), len(costs))
        bar.close()
        merged = share(local, self.world)
        return [merged[i] for i in range(len(costs))]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text in windows of `max_length` after the prefix token, every token predicted
        once and the last window with a full context (lm-eval's rolling windows)."""
        docs = [[self.prefix_token_id, *self.tok_encode(req.args[0])] for req in requests]

        def work(i: int) -> float:
            return -score_tokens(self.model, docs[i], self.max_length, self.max_length)[0]

        costs = [len(d) for d in docs]
        return self._split(costs, work, "loglikelihood_rolling", disable_tqdm)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy unless the task samples; stops at the task's `until` strings, EOS or
        `max_gen_toks`; the context keeps its last `max_length - max_gen_toks` tokens."""
        eos = self.tok_decode([self.eot_token_id])
        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise EvaluationError(
                    f"max_gen_toks {max_new} leaves no room for a prompt in the model's "
                    f"context of {self.max_length}"
                )
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            sampling = {k: kwargs[k] for k in ("temperature", "top_p", "top_k") if kwargs.get(k)}
            jobs.append((ids, GenerationConfig(max_tokens=max_new, stop=tuple(until), **sampling)))

        def work(items: list[int]) -> list[str]:
            prompts, configs = zip(*(jobs[i] for i in items), strict=True)
            return batch_generate(
                self.model, self.tokenizer, prompts, configs, max_batch=self.batch_size
            )

        costs = [len(ids) + config.max_tokens for ids, config in jobs]
        size = self.batch_size * 4  # several batches' worth between progress updates
        return self._split_batches(costs, work, size, "generate_until", disable_tqdm)


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes batch sizes as text too; "auto" means our default."""
    if value is None or str(value).startswith("auto"):
        return DEFAULTS.batch_size
    try:
        size = int(value)
    except ValueError as e:
        raise EvaluationError(f"batch_size must be a whole number, got {value!r}") from e
    if size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {size}")
    return size


def task_manager(include_path: Path | None = None, names: Sequence[str] = ()) -> Any:
    """lm-eval's index of tasks: its own plus the YAMLs under `include_path`. When `names` are
    all local tasks, only the local folder is indexed (lm-eval's own index takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    if not Path(include_path).is_dir():
        raise EvaluationError(f"--include-path {include_path} is not a folder of task YAMLs")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if names and all(name in local.all_tasks for name in names):
        return local
    return TaskManager(include_path=str(include_path))


def check_tasks(manager: Any, tasks: Sequence[str]) -> None:
    """Every name must be a task, group or tag lm-eval knows; say which ones come close."""
    known = manager.all_tasks
    for name in tasks:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "see `lm_eval ls tasks`"
        raise EvaluationError(f"unknown task {name!r}; {hint}")


def run_tasks(
    lm: ElmLM,
    tasks: Sequence[str],
    manager: Any = None,
    limit: float | None = DEFAULTS.limit,
    num_fewshot: int | None = DEFAULTS.num_fewshot,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on `tasks` with this model; its result dictionary.
    `manager`: a `task_manager(...)` whose names were checked (default: lm-eval's tasks)."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise EvaluationError("give at least one task name")
    if manager is None:
        manager = task_manager()
        check_tasks(manager, tasks)
    return simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )
