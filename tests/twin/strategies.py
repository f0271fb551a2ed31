"""Hypothesis strategies for JSON values, shared by the twin-core tests."""

from __future__ import annotations

from hypothesis import strategies as st

from twin_service.types import JSON, JSONObject

#: A small key alphabet so that generated objects share keys and paths often.
keys = st.text(alphabet="abc~/", min_size=1, max_size=2)
#: Numbers that collide across types: 1 and 1.0, True and 1, False and 0.
numbers = st.sampled_from([0, 1, 2, 0.0, 1.0, 2.5, -1])
non_null_scalars = st.one_of(st.booleans(), numbers, st.sampled_from(["", "x", "1"]))
scalars = st.one_of(st.none(), non_null_scalars)


def values(
    leaves: st.SearchStrategy[JSON] = scalars, *, empty_objects: bool = True
) -> st.SearchStrategy[JSON]:
    """Nested JSON values over ``leaves``; objects may be empty only if ``empty_objects``."""
    min_size = 0 if empty_objects else 1
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(keys, children, min_size=min_size, max_size=3)
        ),
        max_leaves=8,
    )


def objects(
    leaves: st.SearchStrategy[JSON] = scalars, *, empty_objects: bool = True
) -> st.SearchStrategy[JSONObject]:
    return st.dictionaries(keys, values(leaves, empty_objects=empty_objects), max_size=4)


#: Any JSON value over the full ranges (finite floats, any text), for round trips.
any_json: st.SearchStrategy[JSON] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
