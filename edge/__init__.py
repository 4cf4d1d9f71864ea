"""Edge role: export, runtimes, the edge agent, forward-only sample selection."""
