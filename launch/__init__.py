"""Launching ranks: locally (torchrun), multi-node (torchrun, DeepSpeed hostfile, SLURM)."""
