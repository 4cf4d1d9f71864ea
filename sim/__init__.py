"""Simulation role: scenarios (data, partitions, device profiles), network model, benchmarks."""
