"""The merge rules at their edges: refusals, exact limits, size bookkeeping, no aliasing.

Each test asserts behaviour a caller can see: what is refused (and the ``path``
the error names), limits at their exact boundaries, the size bookkeeping, that
stored data never aliases the caller's, ``diff`` round-tripping through ``merge``.
``tests/state/test_rules.py`` holds the rules' main cases and properties.
"""

from __future__ import annotations

import sys
from types import MappingProxyType

import pytest
from hypothesis import given

from chatstate import StateData
from chatstate.exceptions import (
    ConfigurationError,
    PreservedFieldError,
    SerializationError,
    StateTooLargeError,
)
from chatstate.state import merge, stored_size
from chatstate.state._rules import (
    DELETE,
    SET,
    apply_edits,
    apply_edits_shared,
    apply_edits_sized,
    copy_json,
    diff,
    keep_preserved,
    parse_path,
)
from strategies import documents, patches

HUGE = 10 ** (sys.get_int_max_str_digits() + 10)
SURROGATE = "\ud800"


def nested(depth: int, leaf: object = 1) -> object:
    """An object nested ``depth`` deep, counting the outer one (1 is ``{"k": leaf}``)."""
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


def nested_list(depth: int) -> object:
    """A document whose top-level object holds lists nested to ``depth`` in total."""
    value: object = 1
    for _ in range(depth - 1):
        value = [value]
    return {"k": value}


# --- StateData construction ---------------------------------------------------------


def test_fields_are_given_as_a_str_a_dotted_str_or_tuples() -> None:
    assert StateData(preserved="jwt_token").preserved == {("jwt_token",)}
    assert StateData(preserved=[("a", "b")]).preserved == {("a", "b")}
    assert parse_path(["a", "b"]) == ("a", "b")
    with pytest.raises(ConfigurationError, match="non-empty keys"):
        parse_path("a..b")


def test_a_replaced_field_inside_a_preserved_one_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"\$\.a\.b.*\$\.a\b"):
        StateData(preserved=["a"], replaced=["a.b"])
    with pytest.raises(ConfigurationError, match=r"\$\.a\b.*\$\.a\.b"):
        StateData(preserved=["a.b"], replaced=["a"])


def test_the_smallest_limits_are_accepted_and_below_them_refused() -> None:
    StateData(max_depth=1, max_bytes=2, max_user_id_length=1)
    for bad in ({"max_depth": 0}, {"max_bytes": 1}, {"max_user_id_length": 0}):
        with pytest.raises(ConfigurationError, match="must be positive"):
            StateData(**bad)


def test_max_entries_is_a_third_of_max_bytes_but_at_least_16() -> None:
    assert StateData(max_bytes=100).max_entries == 33
    assert type(StateData(max_bytes=100).max_entries) is int
    assert StateData(max_bytes=48).max_entries == 16
    assert StateData(max_bytes=30).max_entries == 16


# --- compile ------------------------------------------------------------------------


def test_compile_takes_any_mapping_and_refuses_anything_else() -> None:
    rules = StateData()
    assert merge({}, MappingProxyType({"a": 1})) == {"a": 1}
    with pytest.raises(SerializationError, match="not list") as info:
        rules.compile([("a", 1)])  # type: ignore[arg-type]
    assert info.value.path == "$"


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_patch_depth_limit_is_exact(depth: int) -> None:
    rules = StateData(max_depth=depth)
    merge({}, nested(depth), rules)  # type: ignore[arg-type]
    merge({}, nested_list(depth), rules)  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match=f"deeper than {depth}") as info:
        merge({}, nested(depth + 1), rules)  # type: ignore[arg-type]
    assert info.value.path == "$" + ".k" * depth
    with pytest.raises(SerializationError, match=f"deeper than {depth}") as info:
        merge({}, nested_list(depth + 1), rules)  # type: ignore[arg-type]
    assert info.value.path.startswith("$.k")


def test_a_replaced_field_has_the_same_depth_limit() -> None:
    rules = StateData(replaced=["k"], max_depth=3)
    assert merge({"k": {"old": 1}}, nested(3), rules) == nested(3)  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="deeper than 3"):
        merge({}, nested(4), rules)  # type: ignore[arg-type]


def test_a_replaced_object_drops_nested_nones() -> None:
    rules = StateData(replaced=["cart"])
    patch = {"cart": {"x": {"y": None, "z": 1}, "w": None}}
    assert merge({"cart": {"old": 1}}, patch, rules) == {"cart": {"x": {"z": 1}}}


def test_a_patch_names_at_most_max_entries_entries() -> None:
    rules = StateData(max_bytes=60)
    assert rules.max_entries == 20
    flat = {f"k{i}": i for i in range(20)}
    assert merge({}, flat, rules) == flat
    with pytest.raises(StateTooLargeError, match="over 20 entries") as info:
        rules.compile({f"k{i}": i for i in range(21)})
    assert info.value.size == 63
    assert info.value.limit == 60
    deep = {"o": {f"k{i}": i for i in range(19)}}  # 20 entries with the object
    assert merge({}, deep, rules) == deep
    with pytest.raises(StateTooLargeError):
        rules.compile({"o": {f"k{i}": i for i in range(20)}})


@pytest.mark.parametrize("where", ["value", "nested", "listed"])
def test_a_lone_surrogate_in_a_string_is_refused_with_its_path(where: str) -> None:
    patch = {
        "value": {"s": SURROGATE},
        "nested": {"o": {"s": "é" + SURROGATE}},
        "listed": {"l": ["ok", SURROGATE]},
    }[where]
    with pytest.raises(SerializationError, match=r"the string at \$\.") as info:
        StateData().compile(patch)
    assert info.value.path == {"value": "$.s", "nested": "$.o.s", "listed": "$.l[1]"}[where]
    assert merge({}, {"s": "é\U0001f600"}) == {"s": "é\U0001f600"}


@pytest.mark.parametrize("where", ["top", "nested", "listed"])
def test_a_lone_surrogate_in_a_key_is_refused_with_its_path(where: str) -> None:
    patch = {
        "top": {SURROGATE: 1},
        "nested": {"o": {"é" + SURROGATE: 1}},
        "listed": {"l": [{SURROGATE: 1}]},
    }[where]
    with pytest.raises(SerializationError, match="a key at") as info:
        StateData().compile(patch)
    assert info.value.path == {"top": "$", "nested": "$.o", "listed": "$.l[0]"}[where]


def test_a_non_str_key_is_refused_with_its_path_and_type() -> None:
    with pytest.raises(SerializationError, match="key of type int") as info:
        StateData().compile({"o": {1: 2}})
    assert info.value.path == "$.o"
    with pytest.raises(SerializationError, match="key of type int") as info:
        StateData().compile({"l": [{1: 2}]})
    assert info.value.path == "$.l[0]"


@pytest.mark.parametrize("sign", [1, -1])
def test_an_integer_python_cannot_write_is_refused(sign: int) -> None:
    limit = sys.get_int_max_str_digits()
    for patch, path in (({"n": sign * HUGE}, "$.n"), ({"l": [sign * HUGE]}, "$.l[0]")):
        with pytest.raises(SerializationError, match=f"more than {limit} digits") as info:
            StateData().compile(patch)
        assert info.value.path == path
        assert "$." in str(info.value)
    big = sign * 10**600
    assert merge({}, {"n": big, "l": [big]}) == {"n": big, "l": [big]}


def test_non_finite_floats_and_non_json_values_are_refused() -> None:
    with pytest.raises(SerializationError, match=r"\$\.l\[0\] is inf") as info:
        StateData().compile({"l": [float("inf")]})
    assert info.value.path == "$.l[0]"
    with pytest.raises(SerializationError, match=r"\$\.l\[0\] is a set") as info:
        StateData().compile({"l": [set()]})
    assert info.value.path == "$.l[0]"


def test_preserved_field_errors_name_the_field() -> None:
    rules = StateData(preserved=["profile.id"])
    with pytest.raises(PreservedFieldError, match=r"\$\.profile\.id is preserved") as info:
        rules.compile({"profile": {"id": 2}})
    assert info.value.path == "$.profile.id"
    with pytest.raises(PreservedFieldError, match=r"\$\.profile holds a preserved") as info:
        rules.compile({"profile": None})
    assert info.value.path == "$.profile"


# --- check_document, check_replacement, set_preserved ---------------------------------


def test_check_document_refuses_non_objects_and_bad_values() -> None:
    rules = StateData(max_depth=2)
    with pytest.raises(SerializationError, match="not list") as info:
        rules.check_document([])  # type: ignore[arg-type]
    assert info.value.path == "$"
    with pytest.raises(SerializationError, match="is a set"):
        rules.check_document({"a": set()})
    assert rules.check_document(MappingProxyType({"a": {"b": 1}})) == {"a": {"b": 1}}
    assert type(rules.check_document(MappingProxyType({}))) is dict
    with pytest.raises(SerializationError, match="deeper than 2") as info:
        rules.check_document({"a": {"b": {"c": 1}}})
    assert info.value.path == "$.a.b"


def test_check_replacement_allows_an_unchanged_preserved_field() -> None:
    rules = StateData(preserved=["profile.id"])
    rules.check_replacement({"profile": {"id": 1}}, {"profile": {"id": 1}, "x": 2})
    with pytest.raises(PreservedFieldError, match=r"\$\.profile\.id is preserved") as info:
        rules.check_replacement({"profile": {"id": 1}}, {"profile": {}})
    assert info.value.path == "$.profile.id"


def test_set_preserved_refuses_an_undeclared_field() -> None:
    with pytest.raises(PreservedFieldError, match=r"\$\.other is not declared") as info:
        StateData(preserved=["a"]).set_preserved_edits(("other",), 1)
    assert info.value.path == "$.other"


# --- assign and increment -------------------------------------------------------------


def test_assign_refuses_non_mappings_empty_and_bad_paths() -> None:
    rules = StateData()
    with pytest.raises(SerializationError, match="not list") as info:
        rules.assign_edits([])  # type: ignore[arg-type]
    assert info.value.path == "$"
    with pytest.raises(SerializationError, match="empty path") as info:
        rules.assign_edits({(): 1})
    assert info.value.path == "$"
    with pytest.raises(SerializationError, match="key of type int") as info:
        rules.assign_edits({("a", 1): 1})
    assert info.value.path == "$.a"
    with pytest.raises(SerializationError, match="inf"):
        rules.assign_edits({"a": float("inf")})


def test_assign_entry_limit_is_exact() -> None:
    rules = StateData(max_bytes=48)
    assert rules.max_entries == 16
    eight = {f"k{i}": i for i in range(8)}  # two edits each: 16
    assert apply_edits({}, rules.assign_edits(eight)) == eight
    with pytest.raises(StateTooLargeError):
        rules.assign_edits({f"k{i}": i for i in range(9)})
    with pytest.raises(StateTooLargeError):
        rules.assign_edits({f"k{i}": i for i in range(17)})


def test_assigned_values_never_alias_the_callers() -> None:
    value = {"o": {"p": {"q": 1}, "l": [1, [2]]}, "s": "x"}
    values = {"top": value, "list": [[1], {"a": [2]}]}
    doc = apply_edits({}, StateData().assign_edits(values))
    assert doc == values
    value["o"]["p"]["q"] = 9  # type: ignore[index]
    value["o"]["l"][1].append(3)  # type: ignore[index]
    values["list"][0].append(4)  # type: ignore[union-attr]
    assert doc == {
        "top": {"o": {"p": {"q": 1}, "l": [1, [2]]}, "s": "x"},
        "list": [[1], {"a": [2]}],
    }
    rules = StateData(preserved=["tags"])
    tags = [1, 2]
    doc = apply_edits({}, rules.set_preserved_edits(("tags",), tags))
    tags.append(3)
    assert doc == {"tags": [1, 2]}


def test_increment_path_checks() -> None:
    rules = StateData(max_depth=3, preserved=["p.q"])
    assert rules.increment_path("a.b.c") == ("a", "b", "c")
    with pytest.raises(SerializationError, match="deeper than 3") as info:
        rules.increment_path("a.b.c.d")
    assert info.value.path == "$.a.b.c.d"
    with pytest.raises(SerializationError, match="empty path") as info:
        rules.increment_path(())
    assert info.value.path == "$"
    with pytest.raises(SerializationError, match="key of type int") as info:
        rules.increment_path(("a", 1))  # type: ignore[arg-type]
    assert info.value.path == "$.a"
    with pytest.raises(PreservedFieldError, match=r"\$\.p is or holds") as info:
        rules.increment_path("p")
    assert info.value.path == "$.p.q"


# --- applying edits -----------------------------------------------------------------


def test_deleting_under_a_missing_or_scalar_parent_does_nothing() -> None:
    doc = {"s": 1}
    edits = [
        (DELETE, ("x", "y", "z"), None),
        (DELETE, ("s", "y", "z"), None),
        (SET, ("after",), 2),
    ]
    assert apply_edits(doc, edits) == {"s": 1, "after": 2}  # type: ignore[arg-type]


def test_a_reset_keeps_the_preserved_fields_present() -> None:
    doc = {"b": 1, "c": {"d": 2}, "x": 3}
    assert keep_preserved(doc, [("a",), ("b",), ("c", "d")]) == {"b": 1, "c": {"d": 2}}


@given(documents(), patches())
def test_sized_apply_tracks_the_stored_size(doc: dict, patch: dict) -> None:
    rules = StateData()
    edits = rules.compile(patch)
    work = copy_json(doc)
    size = apply_edits_sized(work, edits, stored_size(doc))
    assert work == merge(doc, patch)
    assert size == stored_size(work)


@given(documents(), patches())
def test_shared_apply_leaves_the_original_untouched(doc: dict, patch: dict) -> None:
    rules = StateData()
    before = copy_json(doc)
    new, size = apply_edits_shared(doc, rules.compile(patch), stored_size(doc))
    assert doc == before
    assert new == merge(before, patch)
    assert size == stored_size(new)


def test_shared_apply_copies_nested_objects_on_write() -> None:
    doc = {"a": {"b": {"c": 1}, "keep": {"k": 1}}}
    edits = StateData().compile({"a": {"b": {"c": 2, "d": {"e": 3}}}})
    new, _ = apply_edits_shared(doc, edits, stored_size(doc))
    assert doc == {"a": {"b": {"c": 1}, "keep": {"k": 1}}}
    assert new == {"a": {"b": {"c": 2, "d": {"e": 3}}, "keep": {"k": 1}}}
    assert new["a"]["keep"] is doc["a"]["keep"]


# --- diff ---------------------------------------------------------------------------


def test_diff_examples() -> None:
    assert diff({"a": 1}, {"a": 1}) == {}
    assert diff({"a": 1}, {"a": True}) == {"a": True}
    assert diff({"a": True}, {"a": 1}) == {"a": 1}
    assert diff({"a": 1, "b": 2}, {"b": 2}) == {"a": None}
    assert diff({"a": 1}, {"a": None, "b": 2}) == {"a": None, "b": 2}
    assert diff({}, {"n": None, "b": 2}) == {"b": 2}
    assert diff({"a": 1, "c": 3}, {"a": 1, "b": 2}) == {"c": None, "b": 2}
    assert diff({"o": {"x": 1, "y": 2}}, {"o": {"x": 1, "y": 3}}) == {"o": {"y": 3}}
    assert diff({"o": {"x": 1}}, {"o": {"x": 1}, "z": 0}) == {"z": 0}
    assert diff({"o": 1}, {"o": {"x": 1}}) == {"o": {"x": 1}}
    assert diff({"o": {"x": 1}}, {"o": [1]}) == {"o": [1]}
    assert diff({"o": {"x": 1}}, {"o": {}}) == {"o": {"x": None}}


@given(documents(), documents())
def test_diff_merges_back_into_the_new_document(old: dict, new: dict) -> None:
    patch = diff(old, new)
    assert merge(old, patch) == new
    assert diff(new, new) == {}
