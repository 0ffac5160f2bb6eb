"""The Jinja templates and page assets, shipped as the package data `roomcast.templates`."""
