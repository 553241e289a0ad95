"""The training engine shared by pretraining and fine-tuning: DeepSpeed config, the loop,
checkpoints (exact resume), signals, metrics."""
