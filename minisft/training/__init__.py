"""Training: optimisers and schedules (optim), the declared range of every training option
(options), data parallelism (distributed), the progress line (progress) and the loop itself
(trainer)."""
