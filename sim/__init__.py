"""Simulation: Flower's simulation runner, the embedded scenarios (data, partitions, camera shifts, their models),
and the benchmark suite."""
