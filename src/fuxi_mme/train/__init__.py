"""Training: loss, loop, checkpoints, run orchestration."""
