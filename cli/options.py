"""Sampling options shared by `elm generate` and `elm chat` (defaults stay in GenerationConfig)."""

from __future__ import annotations

from typing import Annotated

import typer

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
