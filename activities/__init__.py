"""Temporal activities: thin adapters from the saga to the store, the processor and the AMS."""
