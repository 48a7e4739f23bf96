"""The package version (bottom layer: what records a run reads without importing the API)."""

__version__ = "0.1.0"
