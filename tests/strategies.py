"""Hypothesis strategies the fuzz tests share: any JSON value, and JSON nested deeper than a
decoder's recursion limit (closed or not), within a frame or body of MAX_BYTES."""

from __future__ import annotations

from hypothesis import strategies as st

MAX_BYTES = 8192

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
deep = st.builds(
    lambda depth, kind, closed: kind[0] * depth + (kind[1] * depth if closed else ""),
    st.integers(min_value=1000, max_value=MAX_BYTES // 2 - 100),
    st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"a":', "}]")]),
    st.booleans(),
).filter(lambda text: len(text) < MAX_BYTES - 100)
