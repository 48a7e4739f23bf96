"""Training: losses, metrics and the fit loop."""
