"""The bench's library: its own stack, what it measures, and how it reports; no scenarios."""
