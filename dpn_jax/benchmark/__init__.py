"""The benchmark harness (``dpn-jax bench``, ``experiments/bench.py``): training throughput,
input-pipeline throughput, compile time, memory and inference latency of registry models on
fixed workload shapes, optionally beside the same models built from FuxiCTR's PyTorch layers."""
