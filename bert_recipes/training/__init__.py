"""Training machinery shared by pretraining and fine-tuning: optimiser, loop steps,
checkpoints and reporting."""
