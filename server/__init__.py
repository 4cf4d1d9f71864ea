"""Server role: the Flower ServerApp, strategies, checkpoints, the model registry."""
