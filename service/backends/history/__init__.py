"""History stores: offsets, epochs and retention per room."""
