"""Client role: the Flower ClientApp (each message to its method's handler), the node's job and data, fault drills."""
