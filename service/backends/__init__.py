"""What talks to other servers: brokers, history stores and presence stores.

Each kind has a folder with `base.py` (the contract, a Protocol), one module
per backend and a factory that picks one by URL scheme, importing its driver
only then. Backends know the protocol and nothing above it.
"""
