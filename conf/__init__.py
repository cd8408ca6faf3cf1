"""Hydra configs, shipped as package data so ``python -m svi_infer`` composes from any install."""
