"""A support desk: customers and agents chat in ticket rooms, authorized by roomcast hooks."""
