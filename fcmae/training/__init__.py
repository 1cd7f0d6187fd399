"""The training engine shared by pretraining and fine-tuning: optimiser set-up, learning-rate
schedule, atomic checkpoints and run logs."""
