from __future__ import annotations

from collections.abc import Iterator

import pytest

from .brokers import kafka_url, postgres_url, redis_url  # noqa: F401
from .servers import Server, start_server


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """One real server on the memory backend, shared by tests that do not change settings."""
    srv = start_server()
    yield srv
    srv.terminate()
