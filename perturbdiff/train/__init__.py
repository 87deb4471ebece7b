"""The training runtime: optimiser pieces, engines over torch.distributed / DeepSpeed, checkpoints."""
