"""Entry point of the `elm` command; domain errors become one message and exit code 1."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from ..errors import ElmError, OptionError
from . import chat, convert, eval, finetune, fuse, generate, serve
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


app.command("convert")(translate_errors(convert.command))
app.command("generate")(translate_errors(generate.command))
app.command("chat")(translate_errors(chat.command))
app.command("finetune")(translate_errors(finetune.command))
app.command("fuse")(translate_errors(fuse.command))
app.command("eval")(translate_errors(eval.command))
app.command("serve")(translate_errors(serve.command))


def main() -> None:
    app(prog_name="elm")


if __name__ == "__main__":
    sys.exit(main())
