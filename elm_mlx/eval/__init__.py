"""Evaluation: perplexity, log-likelihoods of continuations, lm-evaluation-harness's model, and
the split of work over ranks."""
