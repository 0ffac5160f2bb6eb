"""The Starlette edges: WebSockets, the HTTP API, pages, and who may connect."""
