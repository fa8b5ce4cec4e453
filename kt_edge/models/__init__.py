"""Backbones, heads and checkpoints."""
