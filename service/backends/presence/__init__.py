"""Presence stores: who is in which room, across workers."""
