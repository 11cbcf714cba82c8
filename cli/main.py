"""Entry point of the `elm` command; domain errors become one message and exit code 1."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any

import typer

from ..errors import ElmError, OptionError
from . import cache_prompt, chat, convert, eval, finetune, fuse, generate, serve
from .options import flag

app = typer.Typer(
    name="elm",
    help="Run and fine-tune small open language models (OpenELM, OLMo, Llama) with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def translate_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where library exceptions turn into user-facing messages."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OptionError as e:  # the library names the field; the user typed a flag
            typer.echo(f"error: {flag(e.option)} {e.problem}", err=True)
            raise typer.Exit(1) from e
        except ElmError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from e

    return wrapper


def summary(doc: str | None) -> str:
    """A docstring's first sentence on one line: the command's line in `elm --help` (its whole
    docstring is `elm COMMAND --help`)."""
    text = " ".join((doc or "").split())
    first = re.match(r".+?[.!?](?=\s|$)", text)
    return first.group(0) if first else text


for name, module in [
    ("convert", convert),
    ("generate", generate),
    ("chat", chat),
    ("finetune", finetune),
    ("fuse", fuse),
    ("eval", eval),
    ("serve", serve),
    ("cache-prompt", cache_prompt),
]:
    app.command(name, short_help=summary(module.command.__doc__))(translate_errors(module.command))


def main() -> None:
    app(prog_name="elm")


if __name__ == "__main__":
    sys.exit(main())
