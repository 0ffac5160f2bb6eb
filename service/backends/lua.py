"""Lua scripts of the Redis backends, shipped as package data beside their module."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def script(module: str, *names: str) -> str:
    """The Lua files `names` beside `module` (a library first, then a script), as one script."""
    folder = files(module.rpartition(".")[0])
    return "\n".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)
