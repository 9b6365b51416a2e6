"""Training machinery shared by pretraining, fine-tuning and the benchmarks: the one loop
(:mod:`.loop`), the resolved plan (:mod:`.plan`), the Accelerate setup and launch checks,
the run directory, checkpoints, signals, optimizer and schedule, and reporting."""
