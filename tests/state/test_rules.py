"""Unit and property tests of the pure core: merge rules, validation and the flat codec."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from chatstate import StateData
from chatstate.exceptions import PreservedFieldError, SerializationError
from chatstate.state import merge, stored_size
from chatstate.state._codec import (
    decode_path,
    encode_path,
    encode_value,
    flatten,
    unflatten,
    utf8_len,
)
from chatstate.state._rules import apply_edits, format_path, keep_preserved
from strategies import canonical, documents, json_values, keys, patches, rfc7396

PRESERVING = StateData(preserved=["jwt_token", "profile.id"])


def test_merge_follows_the_rfc_examples() -> None:
    """The worked example of RFC 7396 section 3 comes out as the RFC says."""
    target = {
        "title": "Goodbye!",
        "author": {"givenName": "John", "familyName": "Doe"},
        "tags": ["example", "sample"],
        "content": "This will be unchanged",
    }
    patch = {
        "title": "Hello!",
        "phoneNumber": "+01-123-456-7890",
        "author": {"familyName": None},
        "tags": ["example"],
    }
    assert merge(target, patch) == {
        "title": "Hello!",
        "author": {"givenName": "John"},
        "tags": ["example"],
        "content": "This will be unchanged",
        "phoneNumber": "+01-123-456-7890",
    }


def test_merge_does_not_change_its_inputs() -> None:
    """merge() returns a new document and shares no list with the patch."""
    doc = {"a": {"b": 1}}
    patch = {"a": {"c": [1]}}
    out = merge(doc, patch)
    out["a"]["c"].append(2)
    assert doc == {"a": {"b": 1}}
    assert patch == {"a": {"c": [1]}}


@given(documents(), patches())
def test_merge_agrees_with_the_rfc_reference(doc, patch) -> None:
    """Compiled edits give exactly what RFC 7396's pseudocode gives."""
    assert canonical(merge(doc, patch)) == canonical(rfc7396(doc, patch))


@given(documents())
def test_empty_patch_changes_nothing(doc) -> None:
    """merge(s, {}) == s."""
    assert canonical(merge(doc, {})) == canonical(doc)


@given(documents(), patches())
def test_a_patch_is_idempotent(doc, patch) -> None:
    """Applying the same patch twice gives what applying it once gives."""
    once = merge(doc, patch)
    assert canonical(merge(once, patch)) == canonical(once)


@given(documents(), patches(), patches())
def test_patches_without_nulls_compose(doc, p1, p2) -> None:
    """For patches with objects only where both agree, merge(merge(s,a),b) == merge(s, merge(a,b)).

    RFC 7396 composition holds when the second patch's nulls and the first
    patch's nulls do not need to survive as deletions; we check the case the RFC
    guarantees: patches without nulls.
    """

    def no_nulls(v):
        if isinstance(v, dict):
            return {k: no_nulls(x) for k, x in v.items() if x is not None}
        return v

    def objects_agree(x, y) -> bool:
        # Where the first patch puts a non-object, an object in the second one
        # starts from nothing in the sequence but merges into the document in
        # the composition: RFC 7396 composes only where both patches agree.
        if not (isinstance(x, dict) and isinstance(y, dict)):
            return not isinstance(y, dict) or isinstance(x, dict) or x is None
        return all(objects_agree(x.get(k), v) for k, v in y.items())

    a, b = no_nulls(p1), no_nulls(p2)
    assume(objects_agree(a, b))
    assert canonical(merge(merge(doc, a), b)) == canonical(merge(doc, rfc7396(a, b)))


def test_preserved_fields_survive_any_patch_sequence_and_reset() -> None:
    """Every patch either leaves preserved fields alone or is refused; reset keeps them."""
    seen: Counter[str] = Counter()

    @given(documents(), st.lists(patches(), max_size=6), st.text(max_size=20), st.integers())
    def check(doc, seq, token, pid) -> None:
        doc = {**doc, "jwt_token": token, "profile": {"id": pid}}
        for patch in seq:
            try:
                doc = merge(doc, patch, PRESERVING)
            except PreservedFieldError:
                seen["refused"] += 1
                continue
            seen["applied"] += 1
            assert doc["jwt_token"] == token
            assert doc["profile"]["id"] == pid
        kept = keep_preserved(doc, PRESERVING.preserved)
        assert kept == {"jwt_token": token, "profile": {"id": pid}}

    check()
    # The strategies must reach the preserved fields, or this test proves nothing.
    assert seen["refused"] >= 10, seen
    assert seen["applied"] >= 10, seen


@given(documents(), patches())
def test_result_is_valid_json_within_limits(doc, patch) -> None:
    """A merged document always encodes as JSON and decodes back equal."""
    out = merge(doc, patch)
    text = json.dumps(out, allow_nan=False)
    assert canonical(json.loads(text)) == canonical(out)
    StateData().check_document(out)


@given(documents())
def test_flat_form_round_trips(doc) -> None:
    """unflatten(flatten(d)) == d, and the stored size is the flat form's byte count."""
    flat = flatten(doc)
    assert canonical(unflatten(flat)) == canonical(doc)
    assert stored_size(doc) == sum(utf8_len(k) + utf8_len(v) for k, v in flat.items())


@given(st.lists(keys, min_size=1, max_size=4), st.lists(keys, min_size=1, max_size=4))
def test_path_prefixes_are_ancestors(p, q) -> None:
    """A path's text is a prefix of another's exactly when the path is an ancestor."""
    ep, eq = encode_path(tuple(p)), encode_path(tuple(q))
    assert decode_path(ep) == tuple(p)
    is_ancestor = len(p) <= len(q) and tuple(q[: len(p)]) == tuple(p)
    assert eq.startswith(ep) == is_ancestor


@given(json_values())
def test_values_are_written_as_exact_json(value) -> None:
    """encode_value writes compact JSON that decodes to the same value."""
    assert canonical(json.loads(encode_value(value))) == canonical(value)


def test_unflatten_refuses_broken_layouts() -> None:
    """A child without its parent, a bad path or a bad value is reported, not guessed."""
    with pytest.raises(ValueError):
        unflatten({'"a""b"': "1"})
    with pytest.raises(ValueError):
        unflatten({"a": "1"})
    with pytest.raises(ValueError):
        unflatten({'"a"': "{bad"})
    with pytest.raises(ValueError):
        decode_path('"a"x"b"')
    # An object stored whole where only the empty-object marker may be, with and without
    # nested fields beside it (a flat document is built by a shorter path).
    for broken in ({'"a"': '{"x":1}'}, {'"a"': '{"x":1}', '"b"': "{}", '"b""c"': "1"}):
        with pytest.raises(ValueError, match="not the marker"):
            unflatten(broken)
    assert unflatten({'"a"': "{}", '"b"': "[1]", "#v": "3"}) == {"a": {}, "b": [1]}


def test_preserved_rules() -> None:
    """Naming, nulling or replacing a preserved field (or its parent) is refused."""
    rules = StateData(preserved=["auth.jwt"])
    for patch in ({"auth": {"jwt": "x"}}, {"auth": None}, {"auth": 1}, {"auth": []}):
        with pytest.raises(PreservedFieldError) as info:
            rules.compile(patch)
        assert info.value.path in ("$.auth.jwt", "$.auth")
    assert merge({"auth": {"jwt": "t"}}, {"auth": {"other": 1}}, rules) == {
        "auth": {"jwt": "t", "other": 1}
    }


def test_state_data_refuses_overlapping_policies() -> None:
    """A field cannot be both replaced and preserved, or hold a preserved one."""
    with pytest.raises(ValueError):
        StateData(preserved=["a.b"], replaced=["a"])
    with pytest.raises(ValueError):
        StateData(preserved=[""])
    with pytest.raises(ValueError):
        StateData(max_bytes=0)


def test_serialization_errors_name_the_path() -> None:
    """The error names the bad value's path, never its content."""
    with pytest.raises(SerializationError) as info:
        StateData().compile({"a": [{"b": {1, 2}}]})
    assert info.value.path == "$.a[0].b"
    with pytest.raises(SerializationError) as info:
        StateData().compile({"we ird": float("nan")})
    assert info.value.path == "$['we ird']"


def test_format_path() -> None:
    """Paths print like JSONPath, quoting keys that are not identifiers."""
    assert format_path(("a", 0, "b c")) == "$.a[0]['b c']"  # type: ignore[arg-type]
    assert format_path(()) == "$"


def test_apply_edits_replaces_leaves_with_objects() -> None:
    """A MAKE_OBJECT edit over a scalar replaces it; over an object keeps it."""
    doc = {"a": 1, "b": {"c": 2}}
    apply_edits(doc, [("o", ("a",), None), ("o", ("b",), None)])
    assert doc == {"a": {}, "b": {"c": 2}}


@pytest.mark.parametrize(
    "parts",
    [
        ["#v", "1", "#s", "3", '"a"', "[1", '"b"', "2]", '"c"', "3,4"],  # values that pair up
        ['"a"', "{}", '"a"', "{}", '"a""y"', "2"],  # a field twice
        ['"a"', "1", '"b"', ""],  # an empty value
        ['"a"', "5", '"a""b"', "1"],  # a child of a value
        ['"a"', '{"x":1}'],  # an object instead of the marker
    ],
)
def test_corrupt_flat_forms_are_refused(parts: list[str]) -> None:
    """Stored values that are not one JSON value each, or do not nest, never make a document."""
    from chatstate.state._codec import unflatten_parts

    with pytest.raises(ValueError):
        unflatten_parts(parts)


def test_time_options_are_bounded() -> None:
    """Ttl and dedupe_window beyond ten years are refused (Lua would print them as 1e+14)."""
    from chatstate import StateService
    from chatstate.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError):
        StateService(ttl=20 * 365 * 86400)
    with pytest.raises(ConfigurationError):
        StateService(dedupe_window=20 * 365 * 86400)
