"""Training: loop, optimizers, schedules, checkpoints."""
