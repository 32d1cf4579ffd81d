"""Training: the loop, checkpoints, optimizer and schedules."""
