"""A live metrics chart fed through a roomcast room."""
