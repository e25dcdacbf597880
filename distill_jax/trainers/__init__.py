"""Trainers: the jitted steps and the loops that run them (training and distillation,
DARTS search), with their bookkeeping, checkpoints, optimisers and frozen teachers."""
