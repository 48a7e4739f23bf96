"""Analyses of trained models and bundles (above serving): AUC by training frequency."""
