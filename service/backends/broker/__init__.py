"""Brokers: what carries a room's frames from the worker that publishes to every worker."""
