"""The training engine shared by pretrain.py and finetune.py: the accelerator, output folder,
logs and trackers, atomic checkpoints and exact resume, and the optimiser-step loop."""
