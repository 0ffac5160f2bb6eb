"""Example applications built on roomcast: `uvicorn examples.<name>.app:app`."""
