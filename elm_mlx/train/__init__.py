"""Fine-tuning: data, losses, the training loop and its saved state, logs and plots, and the
`finetune` and `fuse` entry points."""
