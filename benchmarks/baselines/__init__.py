"""Baseline servers for the fan-out benchmark, each the idiomatic version of its kind.

Each speaks the minimal framing the load generator expects: a text frame a
client sends is broadcast, as text, to every connection in the room.
"""
