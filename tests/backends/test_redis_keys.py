"""The Redis key scheme: every key it builds parses back to what built it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatstate.exceptions import ConfigurationError
from chatstate.state import RedisBackend
from chatstate.state.redis import KeyScheme, ParsedKey

SECRET = "a key secret of the bot, 32 bytes"
ids = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)


@given(ids)
def test_every_key_of_a_user_parses_back_to_the_user(user_id: str) -> None:
    scheme = KeyScheme("bot:1")
    doc, ops, claim = scheme.keys(user_id)
    tag = scheme.tag(user_id)
    assert scheme.parse(doc) == ParsedKey("doc", tag, user_id)
    assert scheme.parse(ops) == ParsedKey("ops", tag, user_id)
    assert scheme.parse(claim) == ParsedKey("claim", tag, user_id)
    assert scheme.parse(scheme.lock(user_id, "aiogram")) == ParsedKey(
        "lock", tag, user_id, "aiogram"
    )
    assert scheme.parse(doc.encode()) == ParsedKey("doc", tag, user_id)
    assert not {"{", "}"} & set(tag), "an id must not open or close a hash tag"


@given(ids, ids)
def test_distinct_ids_name_distinct_keys(a: str, b: str) -> None:
    scheme = KeyScheme("ns")
    assert (scheme.keys(a) == scheme.keys(b)) is (a == b)


def test_keys_of_other_namespaces_and_foreign_keys_do_not_parse() -> None:
    scheme = KeyScheme("ns")
    for key in (
        "other:{ann}",
        "ns:{ann}:other",
        "ns:ann",
        "ns:{}",
        "ns:{ann}:lock:",
        "ns:{%ZZ}",  # not percent-encoding
        "ns:{a%62}",  # encodes "ab", which chatstate writes as "ab"
        "ns:deadlines:{3}",
        b"ns:{\xff}",
    ):
        assert scheme.parse(key) is None, key


def test_a_secret_hides_the_id_and_never_shows_itself() -> None:
    scheme = KeyScheme("ns", SECRET)
    doc = scheme.keys("+34600123456")[0]
    assert "34600123456" not in doc
    parsed = scheme.parse(doc)
    assert parsed is not None
    assert parsed.user_id is None
    assert parsed.kind == "doc"
    assert SECRET not in repr(scheme)
    assert "hashed" in repr(scheme)
    assert scheme.pseudonymous
    assert KeyScheme("ns", SECRET.encode()).keys("a") == scheme.keys("a")
    with pytest.raises(ConfigurationError, match="16 bytes"):
        KeyScheme("ns", "short")
    with pytest.raises(ConfigurationError, match="no prefix"):
        scheme.pattern("a")


def test_by_tag_addresses_users_by_the_tags_a_scan_found() -> None:
    readable, hashed = KeyScheme("ns"), KeyScheme("ns", SECRET)
    for scheme in (readable, hashed):
        doc = scheme.keys("ann b")[0]
        tag = scheme.parse(doc).tag  # type: ignore[union-attr]
        assert KeyScheme("ns", by_tag=True).keys(tag)[0] == doc


def test_bad_namespaces_are_refused() -> None:
    for bad in ("", "a{b", "a}b", "tab\there", 7):
        with pytest.raises(ConfigurationError, match="namespace"):
            KeyScheme(bad)  # type: ignore[arg-type]


def test_patterns_escape_glob_characters() -> None:
    scheme = KeyScheme("n*s")
    assert scheme.pattern() == "n\\*s:{*}"
    assert scheme.pattern("x*") == "n\\*s:{x%2A*}"
    assert scheme.pattern(kind="ops") == "n\\*s:{*}:ops"
    assert scheme.pattern(kind=None) == "n\\*s:{*"


def test_a_backend_takes_a_scheme_or_a_namespace_not_both() -> None:
    import redis

    client = redis.Redis()  # never connected: construction sends nothing
    scheme = KeyScheme("ns", SECRET)
    backend = RedisBackend(client, keys=scheme)
    assert backend.key_scheme is scheme
    assert backend.keys("ann") == list(scheme.keys("ann"))
    with pytest.raises(ConfigurationError, match="not beside it"):
        RedisBackend(client, keys=scheme, namespace="other")
    with pytest.raises(ConfigurationError, match="KeyScheme"):
        RedisBackend(client, keys="ns")  # type: ignore[arg-type]
    client.close()
