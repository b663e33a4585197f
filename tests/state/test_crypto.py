"""Secret fields encrypted at rest: tokens, the key ring, rotation and the document helpers."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatstate.exceptions import (
    ConfigurationError,
    InvalidUserIdError,
    SerializationError,
    StateError,
    ValidationError,
)
from chatstate.state._crypto import (
    DecryptionError,
    FieldEncryption,
    is_encrypted,
    key_id_of,
    secret_paths,
)
from chatstate.state._rules import StateData, merge
from conftest import register_secret
from strategies import canonical, documents, json_values, patches

KEY_A = base64.urlsafe_b64encode(bytes(range(32))).decode()
KEY_B = base64.urlsafe_b64encode(bytes(range(100, 132))).decode()
KEY_C = base64.urlsafe_b64encode(bytes(range(200, 232))).decode()
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbmEifQ.c2lnbmF0dXJlLW9mLWFuYQ"
SECRET = secret_paths(["jwt_token", "profile.pin"])

user_ids = st.text(min_size=1, max_size=20)
paths = st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3).map(tuple)


def ring(*ids: str, current: str | None = None) -> FieldEncryption:
    keys = {"a": KEY_A, "b": KEY_B, "c": KEY_C}
    return FieldEncryption({i: keys[i] for i in ids}, current=current)


def body(token: str) -> bytes:
    text = token.rsplit(":", 1)[1]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def with_body(token: str, blob: bytes) -> str:
    head = token.rsplit(":", 1)[0]
    return head + ":" + base64.urlsafe_b64encode(blob).rstrip(b"=").decode()


# -- one value ---------------------------------------------------------------------


@given(value=json_values(), user_id=user_ids, path=paths)
def test_any_json_value_round_trips(value, user_id, path) -> None:
    """Every JSON value comes back equal (1 vs 1.0, -0.0, big ints) from its token."""
    enc = ring("a")
    token = enc.encrypt(user_id, path, value)
    assert token.isascii()
    assert is_encrypted(token)
    assert key_id_of(token) == "a"
    assert canonical(enc.decrypt(user_id, path, token)) == canonical(value)


def test_token_format_is_versioned_and_names_the_key() -> None:
    """A token reads csenc:1:<key id>:<unpadded urlsafe base64 of nonce, ciphertext, tag>."""
    token = ring("a").encrypt("ana", ("jwt_token",), TOKEN)
    prefix, version, key_id, text = token.split(":")
    assert (prefix, version, key_id) == ("csenc", "1", "a")
    assert "=" not in text
    assert len(body(token)) == 12 + len(json.dumps(TOKEN)) + 16
    assert TOKEN not in token


def test_each_encryption_uses_a_fresh_nonce() -> None:
    """The same value encrypted twice gives two different tokens with different nonces."""
    enc = ring("a")
    one = enc.encrypt("ana", "jwt_token", TOKEN)
    two = enc.encrypt("ana", "jwt_token", TOKEN)
    assert one != two
    assert body(one)[:12] != body(two)[:12]
    assert enc.decrypt("ana", "jwt_token", one) == enc.decrypt("ana", "jwt_token", two) == TOKEN


def test_a_dotted_path_and_its_tuple_are_the_same_field() -> None:
    """``"profile.pin"`` and ``("profile", "pin")`` bind the same associated data."""
    enc = ring("a")
    token = enc.encrypt("ana", "profile.pin", "1234")
    assert enc.decrypt("ana", ("profile", "pin"), token) == "1234"


def test_a_token_moved_to_another_user_is_refused() -> None:
    """A token copied into another user's document fails, naming that user and the field."""
    enc = ring("a")
    token = enc.encrypt("ana", ("jwt_token",), TOKEN)
    with pytest.raises(DecryptionError) as info:
        enc.decrypt("bob", ("jwt_token",), token)
    err = info.value
    assert (err.user_id, err.path, err.key_id, err.reason) == (
        "bob",
        "$.jwt_token",
        "a",
        "authentication",
    )
    assert "'bob'" in str(err)
    assert "$.jwt_token" in str(err)
    assert str(err).startswith("Failed to decrypt state: ")
    assert isinstance(err, StateError)


def test_a_token_moved_to_another_field_is_refused() -> None:
    """A token copied to another path of the same user fails, naming the new path."""
    enc = ring("a")
    token = enc.encrypt("ana", ("profile", "pin"), "1234")
    with pytest.raises(DecryptionError, match=r"\$\.profile\.pw of user 'ana'") as info:
        enc.decrypt("ana", ("profile", "pw"), token)
    assert info.value.path == "$.profile.pw"
    with pytest.raises(DecryptionError):
        enc.decrypt("ana", ("profile",), token)


@given(user_id=user_ids, path=paths, other=user_ids, other_path=paths)
def test_user_and_path_are_bound_unambiguously(user_id, path, other, other_path) -> None:
    """No other (user, path) pair decrypts a token, however the keys are split."""
    enc = ring("a")
    token = enc.encrypt(user_id, path, 1)
    if (other, other_path) == (user_id, path):
        assert enc.decrypt(other, other_path, token) == 1
    else:
        with pytest.raises(DecryptionError):
            enc.decrypt(other, other_path, token)


def test_path_splits_that_join_to_the_same_text_differ() -> None:
    """``("a.b",)`` and ``("a", "b")`` are different fields (no joined-string AAD)."""
    enc = ring("a")
    token = enc.encrypt("ana", ("a.b",), "x")
    with pytest.raises(DecryptionError):
        enc.decrypt("ana", ("a", "b"), token)


def test_a_token_relabelled_with_another_key_id_is_refused() -> None:
    """Changing the key id in a token fails even when the new id names a configured key."""
    enc = ring("a", "b", current="a")
    token = enc.encrypt("ana", ("jwt_token",), TOKEN)
    relabelled = token.replace("csenc:1:a:", "csenc:1:b:")
    with pytest.raises(DecryptionError) as info:
        enc.decrypt("ana", ("jwt_token",), relabelled)
    assert info.value.reason == "authentication"


def test_every_flipped_byte_is_detected() -> None:
    """Flipping any bit of the nonce, ciphertext or tag gives the typed error, never data."""
    enc = ring("a")
    token = enc.encrypt("ana", ("profile", "pin"), {"pin": "1234", "tries": 2})
    blob = body(token)
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            with pytest.raises(DecryptionError) as info:
                enc.decrypt("ana", ("profile", "pin"), with_body(token, bytes(bad)))
            assert info.value.reason == "authentication"


@given(data=st.data())
def test_truncated_or_extended_bodies_are_refused(data) -> None:
    """A body cut short or with bytes added fails with the typed error."""
    enc = ring("a")
    token = enc.encrypt("ana", ("jwt_token",), TOKEN)
    blob = body(token)
    cut = data.draw(st.integers(0, len(blob) - 1))
    extra = data.draw(st.binary(min_size=1, max_size=8))
    for bad in (blob[:cut], blob + extra):
        with pytest.raises(DecryptionError) as info:
            enc.decrypt("ana", ("jwt_token",), with_body(token, bad))
        assert info.value.reason in {"authentication", "malformed"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("csenc:", "malformed"),
        ("csenc:1:a", "malformed"),
        ("csenc:1:a:", "malformed"),
        ("csenc:1::AAAA", "malformed"),
        ("csenc:1:a:not base64!", "malformed"),
        ("csenc:1:a:AAAA", "malformed"),
        ("csenc:1:-a:" + "A" * 40, "malformed"),
        ("csenc:2:a:" + "A" * 40, "unsupported_version"),
        ("csenc:x:a:" + "A" * 40, "malformed"),
    ],
)
def test_malformed_tokens_are_refused(value, reason) -> None:
    """A str that starts with csenc: but is not a valid token is an error, not plaintext."""
    with pytest.raises(DecryptionError) as info:
        ring("a").decrypt("ana", ("jwt_token",), value)
    assert info.value.reason == reason
    assert info.value.user_id == "ana"
    assert info.value.path == "$.jwt_token"


def test_a_wrong_key_under_the_same_id_is_refused() -> None:
    """A token read with another key of the same id fails authentication."""
    token = FieldEncryption({"k": KEY_A}).encrypt("ana", ("jwt_token",), TOKEN)
    with pytest.raises(DecryptionError) as info:
        FieldEncryption({"k": KEY_B}).decrypt("ana", ("jwt_token",), token)
    assert (info.value.reason, info.value.key_id) == ("authentication", "k")


def test_an_unknown_key_id_is_refused_and_named() -> None:
    """A token of a key that is not configured names that key id and the configured ones."""
    token = ring("c").encrypt("ana", ("jwt_token",), TOKEN)
    with pytest.raises(DecryptionError, match=r"key 'c', which is not configured") as info:
        ring("a", "b", current="b").decrypt("ana", ("jwt_token",), token)
    assert (info.value.reason, info.value.key_id) == ("unknown_key", "c")
    assert "'b', 'a'" in str(info.value)


@pytest.mark.parametrize("value", [TOKEN, "", "1234", 42, 1.5, True, [1, "x"], {"pin": "1"}])
def test_plaintext_legacy_values_pass_through(value) -> None:
    """A value that is not a token (written before encryption) is returned as it is."""
    assert ring("a").decrypt("ana", ("jwt_token",), value) is value
    assert key_id_of(value) is None
    assert not is_encrypted(value)


def test_values_that_are_not_json_are_refused() -> None:
    """A set, NaN or an object key that is not a str gives SerializationError naming the path."""
    enc = ring("a")
    for bad in ({1, 2}, float("nan"), {"a": object()}):
        with pytest.raises(SerializationError, match=r"\$\.profile\.pin") as info:
            enc.encrypt("ana", ("profile", "pin"), bad)  # type: ignore[arg-type]
        assert info.value.path == "$.profile.pin"


def test_a_user_id_must_be_a_str() -> None:
    """The user id is bound into the token, so it must be text."""
    with pytest.raises(InvalidUserIdError):
        ring("a").encrypt(42, ("jwt_token",), TOKEN)  # type: ignore[arg-type]


# -- documents and patches -----------------------------------------------------------


def test_a_document_is_encrypted_at_secret_paths_only() -> None:
    """Only present secret paths are encrypted; everything else, and the input, is unchanged."""
    enc = ring("a")
    doc = {"jwt_token": TOKEN, "profile": {"pin": "1234", "name": "Ana"}, "step": 2}
    before = copy.deepcopy(doc)
    out = enc.encrypt_document(doc, "ana", SECRET)
    assert doc == before
    assert is_encrypted(out["jwt_token"])
    assert is_encrypted(out["profile"]["pin"])
    assert out["profile"]["name"] == "Ana"
    assert out["step"] == 2
    assert enc.decrypt_document(out, "ana", SECRET) == doc


def test_absent_and_none_secret_values_are_left_alone() -> None:
    """Missing paths, paths through a non-object and None values are not encrypted."""
    enc = ring("a")
    for doc in ({}, {"profile": "gone"}, {"profile": [1]}, {"jwt_token": None}, {"profile": {}}):
        assert enc.encrypt_document(doc, "ana", SECRET) == doc


@given(doc=documents(), user_id=user_ids)
def test_documents_round_trip_without_touching_the_input(doc, user_id) -> None:
    """encrypt_document then decrypt_document gives the document back; the input never changes."""
    enc = ring("a")
    secret = secret_paths(["a", "jwt_token", "profile.id", "b.c"])
    before = canonical(doc)
    out = enc.encrypt_document(doc, user_id, secret)
    assert canonical(doc) == before
    back = enc.decrypt_document(out, user_id, secret)
    assert canonical(back) == before
    for path in secret:
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(path[-1]) is not None:
            assert is_encrypted(node[path[-1]])


@given(doc=documents(), patch=patches(), user_id=user_ids)
def test_merging_encrypted_equals_merging_plaintext_with_replaced_secrets(
    doc, patch, user_id
) -> None:
    """Decrypting merge(encrypted doc, encrypted patch) gives merge(doc, patch) with secrets replaced."""
    secret = secret_paths(["jwt_token", "profile.id", "a"])
    rules = StateData(replaced=secret)
    enc = ring("a")
    expected = merge(doc, patch, rules)
    before = canonical(patch)
    sealed = enc.encrypt_patch(patch, user_id, secret)
    assert canonical(patch) == before
    stored = merge(enc.encrypt_document(doc, user_id, secret), sealed, rules)
    stored_text = canonical(stored)
    assert canonical(enc.decrypt_document(stored, user_id, secret)) == canonical(expected)
    assert canonical(stored) == stored_text
    for path in secret:
        node = stored
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(path[-1]) is not None:
            assert key_id_of(node[path[-1]]) == "a"


def test_none_members_of_an_object_patch_are_dropped_before_encryption() -> None:
    """{"pin": {"old": None, "new": "1"}} stores {"new": "1"}, as a replaced field would."""
    enc = ring("a")
    out = enc.encrypt_patch(
        {"profile": {"pin": {"old": None, "new": "1", "l": [None]}}}, "ana", SECRET
    )
    assert enc.decrypt("ana", "profile.pin", out["profile"]["pin"]) == {"new": "1", "l": [None]}


def test_a_nested_patch_reaches_a_dotted_secret_path() -> None:
    """{"profile": {"pin": "1234"}} has profile.pin encrypted; its siblings stay plain."""
    enc = ring("a")
    patch = {"profile": {"pin": "1234", "name": "Ana"}, "step": 3}
    out = enc.encrypt_patch(patch, "ana", SECRET)
    assert patch == {"profile": {"pin": "1234", "name": "Ana"}, "step": 3}
    assert out["profile"]["name"] == "Ana"
    assert out["step"] == 3
    assert enc.decrypt("ana", ("profile", "pin"), out["profile"]["pin"]) == "1234"


def test_an_object_sent_to_a_secret_path_is_encrypted_whole() -> None:
    """A dict or list at a secret path becomes one token (secret fields are never deep-merged)."""
    enc = ring("a")
    out = enc.encrypt_patch({"profile": {"pin": {"new": "1234", "old": [1, 2]}}}, "ana", SECRET)
    token = out["profile"]["pin"]
    assert isinstance(token, str)
    assert enc.decrypt("ana", ("profile", "pin"), token) == {"new": "1234", "old": [1, 2]}
    out = enc.encrypt_patch({"jwt_token": [TOKEN]}, "ana", SECRET)
    assert enc.decrypt("ana", "jwt_token", out["jwt_token"]) == [TOKEN]


def test_deletions_in_a_patch_pass_through() -> None:
    """None at a secret path or at an ancestor (a deletion) is not encrypted."""
    enc = ring("a")
    for patch in ({"jwt_token": None}, {"profile": None}, {"profile": {"pin": None}}):
        assert enc.encrypt_patch(patch, "ana", SECRET) == patch


def test_a_patch_replacing_an_ancestor_by_a_scalar_holds_no_secret() -> None:
    """{"profile": 5} replaces the object that held profile.pin: nothing to encrypt."""
    assert ring("a").encrypt_patch({"profile": 5}, "ana", SECRET) == {"profile": 5}


def test_encrypt_value_handles_a_field_an_ancestor_and_an_unrelated_path() -> None:
    """Writing one field (set_preserved) encrypts what lies at or below secret paths."""
    enc = ring("a")
    token = enc.encrypt_value(("jwt_token",), TOKEN, "ana", SECRET)
    assert enc.decrypt("ana", "jwt_token", token) == TOKEN
    profile = enc.encrypt_value(("profile",), {"pin": "1", "name": "Ana"}, "ana", SECRET)
    assert isinstance(profile, dict)
    assert profile["name"] == "Ana"
    assert enc.decrypt("ana", "profile.pin", profile["pin"]) == "1"
    assert enc.encrypt_value(("step",), 3, "ana", SECRET) == 3
    assert enc.encrypt_value(("jwt_token",), None, "ana", SECRET) is None
    whole = enc.encrypt_value((), {"jwt_token": TOKEN}, "ana", SECRET)
    assert isinstance(whole, dict)
    assert is_encrypted(whole["jwt_token"])


def test_encrypt_value_refuses_a_write_inside_a_secret_field() -> None:
    """A secret field can only be written whole: a path inside it is refused."""
    with pytest.raises(ValidationError, match=r"\$\.profile\.pin\.x lies inside"):
        ring("a").encrypt_value(("profile", "pin", "x"), 1, "ana", SECRET)


def test_decrypting_a_document_names_the_user_and_field_that_failed() -> None:
    """A bad token inside a document raises with its user and path."""
    enc = ring("a")
    doc = enc.encrypt_document({"profile": {"pin": "1"}}, "ana", SECRET)
    with pytest.raises(DecryptionError) as info:
        enc.decrypt_document(doc, "bob", SECRET)
    assert (info.value.user_id, info.value.path) == ("bob", "$.profile.pin")


def test_secret_paths_parse_and_refuse_nesting() -> None:
    """Dotted strings and tuples are accepted; a secret inside another secret is refused."""
    assert secret_paths("jwt_token") == {("jwt_token",)}
    assert secret_paths(["a.b", ("c", "d")]) == {("a", "b"), ("c", "d")}
    with pytest.raises(ConfigurationError, match=r"\$\.profile\.pin lies inside"):
        secret_paths(["profile", "profile.pin"])
    with pytest.raises(ConfigurationError):
        secret_paths(["a..b"])


# -- rotation ------------------------------------------------------------------------


def test_rotation_reads_old_keys_and_writes_the_current_one() -> None:
    """After adding a newer key, old tokens still decrypt and new ones use the newest key."""
    old = ring("a")
    stored = old.encrypt_document({"jwt_token": TOKEN, "profile": {"pin": "1"}}, "ana", SECRET)
    new = ring("b", "a", current="b")
    assert new.decrypt_document(stored, "ana", SECRET) == {
        "jwt_token": TOKEN,
        "profile": {"pin": "1"},
    }
    assert key_id_of(new.encrypt("ana", "jwt_token", TOKEN)) == "b"
    assert new.needs_reencryption(stored, SECRET)
    assert not old.needs_reencryption(stored, SECRET)


def test_reencryption_moves_every_value_to_the_current_key() -> None:
    """reencrypt_document encrypts plaintext and old-key values, keeps current ones, then the old key can go."""
    new = ring("b", "a", current="b")
    old_token = ring("a").encrypt("ana", ("profile", "pin"), "1")
    current = new.encrypt("ana", ("other",), "x")
    doc = {"jwt_token": TOKEN, "profile": {"pin": old_token}, "other": current}
    secret = SECRET | {("other",)}
    out = new.reencrypt_document(doc, "ana", secret)
    assert doc["jwt_token"] == TOKEN
    assert doc["profile"]["pin"] == old_token
    assert out["other"] == current
    assert key_id_of(out["jwt_token"]) == key_id_of(out["profile"]["pin"]) == "b"
    assert not new.needs_reencryption(out, secret)
    assert new.reencrypt_document(out, "ana", secret) is out
    only_new = ring("b")
    assert only_new.decrypt_document(out, "ana", secret) == {
        "jwt_token": TOKEN,
        "profile": {"pin": "1"},
        "other": "x",
    }


def test_needs_reencryption_ignores_absent_and_none_values() -> None:
    """A document without secrets, or with None at them, needs nothing."""
    enc = ring("a")
    assert not enc.needs_reencryption({}, SECRET)
    assert not enc.needs_reencryption({"jwt_token": None, "profile": 3}, SECRET)
    assert enc.needs_reencryption({"profile": {"pin": 1234}}, SECRET)
    assert enc.needs_reencryption({"jwt_token": "csenc:1:-x:broken"}, SECRET)
    # only key ids are read: a broken body of the current key is found when it is decrypted
    assert not enc.needs_reencryption({"jwt_token": "csenc:1:a:broken"}, SECRET)


def test_reencryption_of_an_unreadable_token_raises() -> None:
    """A token of a key no longer configured stops the re-encryption with the typed error."""
    doc = {"jwt_token": ring("c").encrypt("ana", ("jwt_token",), TOKEN)}
    with pytest.raises(DecryptionError) as info:
        ring("a").reencrypt_document(doc, "ana", SECRET)
    assert info.value.reason == "unknown_key"


# -- configuration -------------------------------------------------------------------


def test_keys_are_accepted_as_bytes_and_as_either_base64_alphabet() -> None:
    """Raw bytes, standard and URL-safe base64, padded or not, are the same key."""
    raw = bytes(range(220, 252))
    token = FieldEncryption({"k": raw}).encrypt("ana", ("jwt_token",), TOKEN)
    forms = [
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        " " + base64.b64encode(raw).decode() + "\n",
        bytearray(raw),
    ]
    assert "+" in forms[0]
    assert "/" in forms[0]
    for form in forms:
        assert FieldEncryption({"k": form}).decrypt("ana", ("jwt_token",), token) == TOKEN


def test_generated_keys_are_32_random_bytes_of_urlsafe_base64() -> None:
    """generate_key() gives URL-safe base64 of 32 bytes, different every time, usable as is."""
    one, two = FieldEncryption.generate_key(), FieldEncryption.generate_key()
    assert one != two
    assert len(base64.urlsafe_b64decode(one)) == 32
    assert set(one) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    assert FieldEncryption({"k": one}).current == "k"


def test_a_key_given_as_its_id_is_never_echoed() -> None:
    """A swapped 'key:id' pair gives an error that shows neither the key nor a part of it."""
    for spec in (f"{KEY_A}:2026-11", f"{KEY_A.rstrip('=')}:2026-11", f"2026-11:{KEY_A},{KEY_B}:x"):
        with pytest.raises(ConfigurationError) as info:
            FieldEncryption.from_string(spec)
        for key in (KEY_A, KEY_B):
            assert key.rstrip("=")[:12] not in str(info.value)
    with pytest.raises(ConfigurationError, match="looks like a key"):
        FieldEncryption({KEY_A.rstrip("="): KEY_B})


def test_user_ids_are_bound_in_their_nfc_form() -> None:
    """The NFD and NFC forms of one user id encrypt and decrypt alike, as the services name users."""
    ring = FieldEncryption({"a": KEY_A})
    nfc, nfd = "Jos\u00e9", "Jose\u0301"
    token = ring.encrypt(nfd, ("pin",), "1234")
    assert ring.decrypt(nfc, ("pin",), token) == "1234"


@pytest.mark.parametrize(
    ("keys", "current", "match"),
    [
        ({}, None, "at least one key"),
        ({"a:b": KEY_A}, None, "the id of key 1 of 1 must be"),
        ({"": KEY_A}, None, "the id of key 1 of 1 must be"),
        ({"-a": KEY_A}, None, "the id of key 1 of 1 must be"),
        ({"a" * 65: KEY_A}, None, "must be 1 to 64"),
        ({"a b": KEY_A}, None, "must be 1 to 64"),
        ({"k": base64.b64encode(bytes(16)).decode()}, None, "key 1 of 1 is 16 bytes"),
        ({"k": bytes(31)}, None, "key 1 of 1 is 31 bytes"),
        ({"k": "not base64 at all!"}, None, "key 1 of 1 is not base64"),
        ({"k": "A"}, None, "key 1 of 1 is not valid base64"),
        ({"k": 12345}, None, "key 1 of 1 must be bytes or base64 text, not int"),
        ({"a": KEY_A, "b": KEY_A}, "a", "keys 1 and 2 are the same key"),
        ({"a": KEY_A, "b": KEY_B}, None, "say which is current"),
        ({"a": KEY_A}, "b", "current= is not one of the key ids"),
    ],
)
def test_bad_configurations_are_refused(keys, current, match) -> None:
    """Each mistake in a key ring is a ConfigurationError (a ValueError) that says which."""
    with pytest.raises(ConfigurationError, match=match) as info:
        FieldEncryption(keys, current=current)
    assert isinstance(info.value, ValueError)
    assert KEY_A not in str(info.value)


def test_a_mapping_is_required() -> None:
    """A list of pairs is not taken for a key ring (order would decide the current key)."""
    with pytest.raises(ConfigurationError):
        FieldEncryption([("a", KEY_A)])  # type: ignore[arg-type]


def test_key_lists_from_text_put_the_newest_first() -> None:
    """``"id1:key1,id2:key2"`` makes id1 current; spaces around entries are ignored."""
    enc = FieldEncryption.from_string(f" b:{KEY_B} , a:{KEY_A}")
    assert enc.current == "b"
    assert enc.key_ids == ("b", "a")
    old = ring("a").encrypt("ana", "jwt_token", TOKEN)
    assert enc.decrypt("ana", "jwt_token", old) == TOKEN


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "entry 1 of \\$CHATSTATE_KEYS is not"),
        (f"a:{KEY_A},", "entry 2 of"),
        (f"a:{KEY_A},{KEY_B}", "entry 2 of"),
        (f"a:{KEY_A},b:", "entry 2 of"),
        (f"a:{KEY_A},a:{KEY_B}", "the key id of entry 2 of .* appears twice"),
        (f"a:{KEY_A}:x", "key 1 of 1 is not base64"),
    ],
)
def test_malformed_key_lists_never_echo_a_key(spec, match) -> None:
    """An error in the key list names the entry's position or id, never its text."""
    with pytest.raises(ConfigurationError, match=match) as info:
        FieldEncryption.from_string(spec, source="$CHATSTATE_KEYS")
    assert KEY_A not in str(info.value)
    assert KEY_B not in str(info.value)


def test_from_env_is_off_when_the_variable_is_unset_or_blank() -> None:
    """No variable (or an empty one) means no encryption: from_env() returns None."""
    assert FieldEncryption.from_env(environ={}) is None
    assert FieldEncryption.from_env(environ={"CHATSTATE_KEYS": "  "}) is None
    enc = FieldEncryption.from_env(environ={"CHATSTATE_KEYS": f"2026-11:{KEY_B},2026-01:{KEY_A}"})
    assert enc is not None
    assert enc.current == "2026-11"
    assert FieldEncryption.from_env("MY_KEYS", environ={"MY_KEYS": f"k:{KEY_C}"}) is not None


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without environ=, the process environment is read; errors name the variable."""
    monkeypatch.setenv("CHATSTATE_KEYS", "oops")
    with pytest.raises(ConfigurationError, match=r"entry 1 of \$CHATSTATE_KEYS"):
        FieldEncryption.from_env()
    monkeypatch.delenv("CHATSTATE_KEYS")
    assert FieldEncryption.from_env() is None


def test_no_key_material_in_repr_str_or_errors() -> None:
    """The repr and every error show key ids only: never a key, a plaintext or a token."""
    for key in (KEY_A, KEY_B):
        register_secret(key)
        register_secret(base64.urlsafe_b64decode(key).hex())
    register_secret(TOKEN)
    enc = ring("b", "a", current="b")
    shown = [repr(enc), str(enc)]
    token = enc.encrypt("ana", ("jwt_token",), TOKEN)
    for bad_user, bad_token in [
        ("bob", token),
        ("ana", token.replace(":b:", ":c:")),
        ("ana", token[:-3]),
        ("ana", token[:12]),
    ]:
        with pytest.raises(DecryptionError) as info:
            enc.decrypt(bad_user, ("jwt_token",), bad_token)
        shown += [str(info.value), repr(info.value), repr(info.value.args)]
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__
        assert token.rsplit(":", 1)[1][:20] not in str(info.value)
    assert repr(enc) == "FieldEncryption(current='b', key_ids=('b', 'a'))"
    for text in shown:
        for secret in (KEY_A, KEY_B, TOKEN, bytes(range(32)).hex()):
            assert secret not in text


def test_a_key_ring_has_no_attribute_dict_to_leak() -> None:
    """The ring keeps ciphers, not key bytes, in slots (no __dict__ for a debugger dump)."""
    enc = ring("a")
    assert not hasattr(enc, "__dict__")
    assert not any(isinstance(v, bytes | str) and v == KEY_A for v in vars(type(enc)).values())


# -- imports -------------------------------------------------------------------------


def test_cryptography_loads_only_with_a_key_ring() -> None:
    """Importing chatstate (or chatstate.state._crypto) leaves cryptography unimported."""
    code = (
        "import sys, chatstate, chatstate.state, chatstate.testing\n"
        "from chatstate.state._crypto import FieldEncryption, secret_paths\n"
        "key = FieldEncryption.generate_key()\n"
        "secret_paths(['jwt_token'])\n"
        "assert 'cryptography' not in sys.modules, 'cryptography was imported'\n"
        "FieldEncryption({'k': key})\n"
        "assert 'cryptography' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_missing_cryptography_names_the_extra() -> None:
    """Without cryptography, building a key ring says to install chatstate[crypto]."""
    code = (
        "import sys\n"
        "sys.modules['cryptography'] = None\n"
        "from chatstate.state._crypto import FieldEncryption\n"
        "from chatstate.exceptions import ConfigurationError\n"
        "key = FieldEncryption.generate_key()\n"
        "try:\n"
        "    FieldEncryption({'k': key})\n"
        "except ConfigurationError as exc:\n"
        "    assert \"pip install 'chatstate[crypto]'\" in str(exc), str(exc)\n"
        "    assert exc.__cause__ is None and exc.__suppress_context__\n"
        "    print('refused')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert run.stdout.strip() == "refused"


# -- strict mode and tampering with the text ------------------------------------------

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_:.="


def test_every_changed_character_of_a_token_is_caught_in_strict_mode() -> None:
    """With accept_plaintext=False, any one-character change anywhere in the token raises."""
    enc = FieldEncryption({"a": KEY_A, "b": KEY_B}, current="a", accept_plaintext=False)
    for value in ("1", TOKEN, {"pin": "1234"}):
        token = enc.encrypt("ana", ("jwt_token",), value)
        for i, char in enumerate(token):
            for other in {ALPHABET[(ALPHABET.index(char) + 1) % len(ALPHABET)], "A", "x", ":"}:
                if other == char:
                    continue
                with pytest.raises(DecryptionError) as info:
                    enc.decrypt("ana", ("jwt_token",), token[:i] + other + token[i + 1 :])
                assert (info.value.user_id, info.value.path) == ("ana", "$.jwt_token")


def test_a_changed_prefix_reads_as_plaintext_unless_strict() -> None:
    """A token whose csenc: prefix is broken is plaintext to a lenient ring, an error to a strict one."""
    lenient = ring("a")
    token = lenient.encrypt("ana", ("jwt_token",), TOKEN)
    broken = "X" + token[1:]
    assert lenient.decrypt("ana", ("jwt_token",), broken) == broken
    strict = FieldEncryption({"a": KEY_A}, accept_plaintext=False)
    with pytest.raises(DecryptionError) as info:
        strict.decrypt("ana", ("jwt_token",), broken)
    assert (info.value.reason, info.value.key_id) == ("plaintext", None)
    assert TOKEN not in str(info.value)


def test_non_canonical_base64_twins_are_refused() -> None:
    """A body whose last character differs only in unused bits is malformed, not accepted."""
    enc = ring("a")
    for value in ("", "12", "1234", TOKEN):
        token = enc.encrypt("ana", ("jwt_token",), value)
        text = token.rsplit(":", 1)[1]
        if len(text) % 4 == 0:
            continue
        last = ALPHABET.index(text[-1])
        twin = token[:-1] + ALPHABET[last ^ 1]
        with pytest.raises(DecryptionError) as info:
            enc.decrypt("ana", ("jwt_token",), twin)
        assert info.value.reason == "malformed"


def test_strict_mode_refuses_plaintext_but_not_none() -> None:
    """accept_plaintext=False: plaintext at a secret path raises naming user and field; None passes."""
    strict = FieldEncryption({"a": KEY_A}, accept_plaintext=False)
    assert not strict.accept_plaintext
    assert repr(strict) == "FieldEncryption(current='a', key_ids=('a',), accept_plaintext=False)"
    assert strict.decrypt("ana", ("jwt_token",), None) is None
    for value in ("1234", 1234, {"pin": "1"}):
        with pytest.raises(
            DecryptionError, match=r"\$\.profile\.pin of user 'ana' is not encrypted"
        ):
            strict.decrypt("ana", ("profile", "pin"), value)
    doc = {"profile": {"pin": "1234"}, "jwt_token": None}
    with pytest.raises(DecryptionError) as info:
        strict.decrypt_document(doc, "ana", SECRET)
    assert info.value.reason == "plaintext"
    moved = strict.reencrypt_document(doc, "ana", SECRET)
    assert strict.decrypt_document(moved, "ana", SECRET) == doc


def test_strict_mode_reaches_rings_built_from_text() -> None:
    """from_string and from_env pass accept_plaintext on."""
    assert not FieldEncryption.from_string(f"a:{KEY_A}", accept_plaintext=False).accept_plaintext
    env = {"CHATSTATE_KEYS": f"a:{KEY_A}"}
    strict = FieldEncryption.from_env(environ=env, accept_plaintext=False)
    assert strict is not None
    assert not strict.accept_plaintext
    lenient = FieldEncryption.from_env(environ=env)
    assert lenient is not None
    assert lenient.accept_plaintext
