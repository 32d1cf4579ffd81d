"""Training: the `Trainer` and its loop (its layout is the `parallel.engine.Engine` it drives; the
microbatch objective is `stars.objective`, checkpoints are `stars_scale.checkpoint`)."""
