"""Arbitrary bodies, queries, paths and headers on every HTTP route never yield a 500.

In-process (the whole app, lifespan included) so that hypothesis can try
thousands of requests; the API's statuses are checked against real servers in
test_api.py.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Secret
from starlette.testclient import TestClient

from roomcast import Roomcast, Settings

from ..strategies import MAX_BYTES, deep, json_values

KEY = "fuzz-key-of-16-chars"
API_STATUSES = {200, 400, 401, 404, 405, 413, 422}

user_bodies = st.fixed_dictionaries({}, optional={"id": st.text(max_size=8), "name": json_values})
near_valid = st.fixed_dictionaries(
    {"type": st.sampled_from(["notification", "chat", "other"]) | json_values},
    optional={
        "title": st.text(max_size=30) | json_values,
        "body": st.text(max_size=30) | json_values,
        "level": st.sampled_from(["info", "success", "warning", "error", "fatal"]) | json_values,
        "data": json_values,
        "ref": st.text(max_size=70) | json_values,
        "text": st.text(max_size=30) | json_values,
        "user": user_bodies | json_values,
    },
)
deep_bodies = st.builds(
    lambda head, nested: (head + nested + ("}" if nested.endswith(("]", "}")) else "")).encode(),
    st.sampled_from(
        [
            '{"type": "notification", "title": "t", "body": "b", "data": ',
            '{"type": "chat", "text": "t", "user": {"id": "u", "name": ',
            '{"title": "t", "body": "b", "data": ',
            "",
        ]
    ),
    deep,
)
wide_bodies = st.builds(
    lambda width, base: json.dumps({**base, "data": list(range(width))}).encode(),
    st.integers(min_value=100, max_value=1500),
    st.sampled_from(
        [
            {"type": "notification", "title": "t", "body": "b"},
            {"title": "t", "body": "b"},
            {"type": "chat", "text": "t", "user": {"id": "u", "name": "n"}},
        ]
    ),
)
bodies = st.one_of(
    deep_bodies,
    wide_bodies,
    near_valid.map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=60),
    st.text(max_size=60).map(str.encode),
    st.just(b""),
)
segments = st.one_of(
    st.sampled_from(["lobby", "a.b:c-1", "", "x" * 65, "..", "%", "bad room"]),
    st.text(max_size=20),
)
queries = st.dictionaries(
    st.sampled_from(["since", "limit", "token", "room", "x"]) | st.text(max_size=5),
    st.text(max_size=12) | st.integers(min_value=-(10**25), max_value=10**25).map(str),
    max_size=3,
)
templates = st.sampled_from(
    [
        "/api/rooms/{}/publish",
        "/api/rooms/{}/history",
        "/api/rooms/{}/presence",
        "/api/users/{}/notify",
        "/api/users/{}/disconnect",
        "/api/{}",
        "/",
        "/healthz",
        "/readyz",
        "/schema.json",
        "/metrics",
        "/{}",
    ]
)
authorizations = st.sampled_from([f"Bearer {KEY}", f"Bearer {KEY}", None, "Bearer", "x"]) | st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20
)


@pytest.fixture(scope="module")
def app() -> Iterator[TestClient]:
    rc = Roomcast(
        Settings(api_key=Secret(KEY), max_message_bytes=MAX_BYTES, history_size=20, outbox_size=10)
    )
    with TestClient(rc, raise_server_exceptions=True) as client:
        yield client


@settings(max_examples=1500, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]),
    template=templates,
    segment=segments,
    query=queries,
    body=bodies,
    authorization=authorizations,
    content_type=st.sampled_from(["application/json", "text/plain", None]),
)
def test_no_request_gets_a_500(
    app: TestClient,
    method: str,
    template: str,
    segment: str,
    query: dict[str, str],
    body: bytes,
    authorization: str | None,
    content_type: str | None,
) -> None:
    path = template.format(urllib.parse.quote(segment, safe=""))
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = app.request(
        method, path, params=query, content=body if method != "GET" else None, headers=headers
    )
    assert response.status_code < 500, (method, path, query, body, response.text)
    if response.request.url.path.startswith("/api/"):  # ".." segments are resolved
        assert response.status_code in API_STATUSES, response.text
        if method == "HEAD":
            return
        answer: Any = response.json()
        if response.status_code >= 400:
            assert set(answer) == {"error", "detail"} and answer["detail"], answer
        if response.status_code == 200 and path.endswith("/publish"):
            assert isinstance(answer["offset"], int) and answer["offset"] >= 1
