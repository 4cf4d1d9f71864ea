"""Client role: the Flower ClientApp, local adapter training, update encoding."""
