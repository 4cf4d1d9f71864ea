"""Server role: the Flower ServerApp, strategies, checkpoints."""
