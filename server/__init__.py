"""Server role: the Flower ServerApp, the round loop, nodes, checkpoints, a local SuperLink/SuperNode launcher and
its credentials."""
