"""dpn-jax: Dynamic Parameterized Networks for CTR prediction in JAX/Flax."""
__version__ = "0.1.0"
