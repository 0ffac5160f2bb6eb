"""The wire protocol: envelopes, codes, the codec and the published schemas. Imports nothing
else of roomcast."""
