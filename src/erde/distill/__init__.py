"""Distillation: the per-exit losses, the frozen teacher and its exact output cache."""
