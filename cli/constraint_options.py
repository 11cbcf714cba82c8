"""The flags of `elm generate` and `elm chat` that constrain the output: a JSON schema, any JSON
object, a regular expression or a grammar (one at most)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine.constraint import ConstraintSpec
from ..errors import OptionError

JsonSchema = Annotated[
    Path | None,
    typer.Option(help="The output is JSON valid against this JSON-schema file (constrained)."),
]
JsonObject = Annotated[
    bool, typer.Option("--json", help="The output is a JSON object (constrained).")
]
Regex = Annotated[
    str | None,
    typer.Option(help="The output matches this regular expression in full (Rust regex syntax)."),
]
Grammar = Annotated[
    Path | None,
    typer.Option(
        help="The output follows this grammar file (Lark syntax, as llguidance reads it)."
    ),
]


def read_source(path: Path, field: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "is not UTF-8 text"
        raise OptionError(field, f"cannot read {path}: {reason}") from e


def schema_spec(path: str | Path) -> ConstraintSpec:
    """The checked constraint of a JSON-schema file (`elm chat`'s `/set json_schema FILE`)."""
    spec = ConstraintSpec("json_schema", read_source(Path(path), "json_schema"), "json_schema")
    spec.validate()
    return spec


def constraint_spec(
    json_schema: Path | None = None,
    json_object: bool = False,
    regex: str | None = None,
    grammar: Path | None = None,
) -> ConstraintSpec | None:
    """The constraint the flags ask for, checked (before any model is loaded)."""
    given = [
        name
        for name, value in (
            ("json_schema", json_schema),
            ("json", json_object),
            ("regex", regex),
            ("grammar", grammar),
        )
        if value
    ]
    if len(given) > 1:
        raise OptionError(given[1], f"cannot be combined with --{given[0].replace('_', '-')}")
    if json_schema is not None:
        return schema_spec(json_schema)
    if json_object:
        spec = ConstraintSpec("json_object", field="json")
    elif regex is not None:
        spec = ConstraintSpec("regex", regex, "regex")
    elif grammar is not None:
        spec = ConstraintSpec("grammar", read_source(grammar, "grammar"), "grammar")
    else:
        return None
    spec.validate()
    return spec
