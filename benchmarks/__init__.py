"""Benchmarks and studies of torch_fadjoint (run as ``python -m benchmarks.<name>``)."""
