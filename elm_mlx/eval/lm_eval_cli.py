"""`python -m elm_mlx.eval.lm_eval_cli ARGS`: lm-evaluation-harness's own command line (`lm_eval
ARGS`) with elm's model registered as `--model elm`, for lm-eval releases that do not read the
`lm_eval.models` entry point yet (0.4.13 and earlier)."""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

from . import lm_eval_model as harness  # noqa: F401  (registers `elm` with lm-eval)

if __name__ == "__main__":
    cli_evaluate()
