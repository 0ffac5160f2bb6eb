"""The engine: rooms, ordering, fan-out and outboxes. It sees the backends' contracts only;
the app wires in the concrete backends."""
