"""Flax Linen modules that own parameters: embeddings, the MLP tower, DPO layers and interaction layers."""
