"""Hypothesis strategies for JSON documents and patches, kept in one place."""

from __future__ import annotations

import json
from collections.abc import Mapping

from hypothesis import strategies as st

EDGE_INTS = [0, -1, 2**53, 2**53 + 1, -(2**53) - 1, 2**63, -(2**63) - 1, 2**64, 123456789012345]
EDGE_FLOATS = [0.1 + 0.2, 5e-324, 1.7976931348623157e308, -0.0, 0.0, 1e-7, 1e21, -1.5]
EDGE_STRINGS = ["", "a/b", '"', "\\", "\x00", "\u00e9", "\U0001f600", "{}", "[]", '""']

keys = st.one_of(
    st.sampled_from(["a", "b", "c", "step", "cart", "", "a.b", '"', "\\", "\U0001f600"]),
    # the preserved fields the tests declare (jwt_token, profile.id), so patches hit them
    st.sampled_from(["jwt_token", "profile", "id"]),
    st.text(max_size=6),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(EDGE_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(EDGE_FLOATS),
    st.text(max_size=10),
    st.sampled_from(EDGE_STRINGS),
)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[object]:
    """Any JSON value, with empty containers and edge numbers likely."""
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(keys, children, max_size=3),
        ),
        max_leaves=max_leaves,
    )


def documents(max_leaves: int = 12) -> st.SearchStrategy[dict[str, object]]:
    """A stored document: a JSON object with no None values inside objects."""
    return st.dictionaries(keys, json_values(max_leaves), max_size=4).map(_drop_nones)


def patches(max_leaves: int = 12) -> st.SearchStrategy[dict[str, object]]:
    """A merge patch: a JSON object whose None values delete."""
    return st.dictionaries(keys, json_values(max_leaves), max_size=4)


def _drop_nones(value: object) -> object:
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    # Lists are stored whole (RFC 7396 never merges into them), nulls included.
    return value


def canonical(value: object) -> str:
    """JSON text that tells 1 from 1.0 from True and 0.0 from -0.0 (a Document as its dict)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=_as_dict)


def _as_dict(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def rfc7396(target: object, patch: object) -> object:
    """The reference algorithm of RFC 7396, section 2, written from the RFC's pseudocode."""
    if isinstance(patch, dict):
        result = dict(target) if isinstance(target, dict) else {}
        for name, value in patch.items():
            if value is None:
                result.pop(name, None)
            else:
                result[name] = rfc7396(result.get(name), value)
        return result
    return patch
