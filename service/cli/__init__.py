"""The `roomcast` command."""
