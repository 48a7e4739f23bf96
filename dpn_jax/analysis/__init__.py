"""Analyses of trained models and bundles (above serving): AUC by training frequency, the DPO
knock-out, seed-paired comparisons of two models."""
