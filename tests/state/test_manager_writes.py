"""The writes the state manager builds: op keys, nonces, digests and claims, at their edges.

The op key, nonce and digest of a write are a stored format: every process of a
deployment (and every backend, the Redis scripts included) must derive the same
key and digest from the same request, so these tests pin their exact values, not
only their consistency within one process.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta

import pytest

from chatstate import AsyncMemoryBackend, MemoryBackend, StateData, StateService
from chatstate._durations import _to_ms, to_ms
from chatstate.exceptions import (
    ConfigurationError,
    InvalidOpIdError,
    InvalidUserIdError,
    OpIdReusedError,
    PreservedFieldError,
    UsageError,
)
from chatstate.state import AsyncStateManager, StateManager
from chatstate.state._backend import Acquire, Delete, Release, Reset, new_op_id
from chatstate.state._manager import digest_text


def _manager(**options: object) -> StateManager:
    return StateManager(MemoryBackend(), StateData(preserved=["token"]), **options)  # type: ignore[arg-type]


def _key(purpose: str, op_id: str) -> str:
    material = f"{purpose}\x1f{op_id}".encode()
    return base64.urlsafe_b64encode(hashlib.blake2b(material, digest_size=9).digest()).decode()


# -- op keys, nonces, digests --------------------------------------------------------


def test_an_anonymous_write_has_a_fresh_8_char_nonce_and_12_char_key_and_no_digest() -> None:
    write = _manager().update_write({"a": 1}, None)
    assert len(write.nonce) == 8
    assert len(write.op_key) == 12
    assert "=" not in write.nonce + write.op_key
    assert write.digest == ""
    assert write.op_id is None


def test_an_op_id_is_keyed_by_purpose_and_id() -> None:
    manager = _manager()
    write = manager.update_write({"a": 1}, "op1")
    assert write.op_key == _key("app", "op1") == "tw77jU8Akufg"
    assert write.op_id == "op1"
    claim = manager.acquire_write("m1", purpose="router", fingerprint=None, lease_ms=1000)
    assert claim.op_key == _key("router", "m1") == "E150UbidLBkw"
    assert claim.digest == ""  # a claim without a fingerprint carries no digest


def test_digests_are_pinned() -> None:
    manager = _manager()
    assert digest_text("x") == "CnZR-CsW"
    assert digest_text("\ud800") == "W52NeqNF"  # a lone surrogate from a JSON payload
    assert manager.update_write({"a": 1, "b": None}, "op1").digest == "DcTAxNWZ"
    assert manager.increment_write("n", 2, "op1").digest == "k_hGv5Kw"
    assert manager.delete_write("op1").digest == "TN1d0AY7"
    assert manager.reset_write("op1").digest == "vABe3WIn"
    fingerprinted = manager.update_write({"a": 1}, "op1", None, "fp")
    assert fingerprinted.digest == ""  # what was said is never digested without a key
    assert manager.update_write({"a": 1}, None, None, "fp").digest == ""


def test_a_digest_key_keys_every_digest() -> None:
    """With digest_key, request and content digests are HMAC-SHA256 under it (pinned)."""
    key = b"k" * 16
    manager = StateManager(MemoryBackend(), StateData(preserved=["token"], digest_key=key))
    assert digest_text("fp", key) == "yXZsX6no30GMlqgW"
    assert manager.update_write({"a": 1}, "op1", None, "fp").digest == digest_text("fp", key)
    assert manager.delete_write("op1").digest == digest_text("D", key)
    assert (
        manager.update_write({"a": 1}, "op1").digest
        != _manager().update_write({"a": 1}, "op1").digest
    )
    other = StateManager(MemoryBackend(), StateData(digest_key=b"o" * 16))
    assert other.update_write({"a": 1}, "op1", None, "fp").digest != digest_text("fp", key)


def test_every_write_method_keeps_its_op_id() -> None:
    manager = _manager()
    key = _key("app", "op1")
    assert manager.assign_write({"a": 1}, "op1").op_key == key
    assert manager.preserved_write("token", "t", "op1").op_key == key
    assert manager.reset_write("op1").op_key == key
    assert manager.delete_write("op1").op_key == key
    assert manager.reset_write("op1").operation == Reset((("token",),))
    assert manager.delete_write(None).operation == Delete(False)
    assert manager.delete_write(None, force=True).operation == Delete(True)


def test_if_version_and_increment_arguments_are_checked() -> None:
    manager = _manager()
    for bad in (1.5, "1", -1):
        with pytest.raises(UsageError, match="if_version"):
            manager.update_write({"a": 1}, None, bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not str"):
        manager.increment_write("n", "1", None)  # type: ignore[arg-type]


def test_manager_options_are_named_in_errors() -> None:
    with pytest.raises(ConfigurationError, match="not int"):
        StateManager(MemoryBackend(), 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^ttl "):
        _manager(ttl=-1)
    with pytest.raises(ConfigurationError, match=r"^dedupe_window "):
        _manager(dedupe_window=0)
    with pytest.raises(UsageError, match=r"^object is not a chatstate backend"):
        StateManager(object())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^AsyncMemoryBackend is asynchronous"):
        StateManager(AsyncMemoryBackend())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^object is synchronous"):
        AsyncStateManager(object())  # type: ignore[arg-type]


def test_a_transaction_may_not_change_a_preserved_field() -> None:
    service = StateService(rules=StateData(preserved=["token"]))
    service.set_preserved("ana", "token", "t")

    def steal(doc: dict) -> None:
        doc["token"] = "other"

    with pytest.raises(PreservedFieldError):
        service.transaction("ana", steal)

    def other(doc: dict) -> None:
        doc["other"] = 1

    service.transaction("ana", other)
    assert service.get("ana") == {"token": "t", "other": 1}


def test_an_op_id_may_be_200_characters() -> None:
    manager = _manager()
    assert manager.update_write({"a": 1}, "x" * 200).op_id == "x" * 200
    with pytest.raises(InvalidOpIdError, match="at most 200 characters"):
        manager.update_write({"a": 1}, "x" * 201)


# -- claims ----------------------------------------------------------------------------


def test_commit_and_release_writes_carry_the_claims_identity() -> None:
    key = b"k" * 16
    manager = StateManager(MemoryBackend(), StateData(preserved=["token"], digest_key=key), ttl=60)
    claim = manager.claim("ana", "m1", purpose="router", fingerprint="fp", lease=30, wait=0)
    claim.stage_update({"a": 1})
    commit = manager.commit_write(claim)
    release = manager.release_write(claim)
    for write in (commit, release):
        assert write.op_key == _key("router", "m1")
        assert write.nonce == claim.nonce
        assert write.digest == digest_text("fp", key)
        assert write.op_id == "m1"
        assert write.ttl_ms == 60_000
        assert write.want_document is False
    assert commit.completes_claim is True
    assert release.completes_claim is False
    assert isinstance(release.operation, Release)
    acquire = manager.acquire_write("m1", purpose="router", fingerprint="fp", lease_ms=5)
    assert acquire.operation == Acquire(5)


def test_a_released_claim_runs_again_and_a_committed_one_is_a_duplicate() -> None:
    service = StateService(rules=StateData(digest_key=b"k" * 16))
    service.claim("ana", "m1", fingerprint="fp").release()
    again = service.claim("ana", "m1", fingerprint="fp")
    assert not again.duplicate
    again.update({"a": 1})
    again.commit()
    third = service.claim("ana", "m1", fingerprint="fp")
    assert third.duplicate
    with pytest.raises(UsageError, match="not open"):
        third.update({"a": 2})
    with pytest.raises(OpIdReusedError):
        service.claim("ana", "m1", fingerprint="other")


# -- checks of user ids and options ------------------------------------------------------


def test_user_ids_are_checked_with_errors_that_say_why() -> None:
    manager = StateManager(MemoryBackend(), StateData(max_user_id_length=5))
    assert manager.user_id("abcde") == "abcde"
    assert manager.user_id("cafe\u0301") == "caf\u00e9"  # NFC
    for bad, why in (
        (3, "must be a str, not int"),
        ("", "must not be empty"),
        ("\ud800", "valid unicode text"),
        ("abcdef", "at most 5 characters, got 6"),
    ):
        with pytest.raises(InvalidUserIdError, match=why):
            manager.user_id(bad)


def test_max_attempts_is_a_whole_number_of_at_least_1() -> None:
    assert _manager(max_attempts=1).max_attempts == 1
    for bad in (0, True, "2", 1.5):
        with pytest.raises(ConfigurationError, match=r"^max_attempts must be a whole number"):
            _manager(max_attempts=bad)


def test_durations_become_whole_milliseconds_within_ten_years() -> None:
    assert _to_ms(0.5, "ttl") == 500
    assert _to_ms(0.0001, "ttl") == 1
    assert _to_ms(timedelta(seconds=2), "ttl") == 2000
    assert _to_ms(10 * 365 * 24 * 3600, "ttl") == 10 * 365 * 24 * 3600 * 1000
    for bad in ("1", True, None):
        with pytest.raises(ConfigurationError, match=r"^ttl must be seconds or a timedelta"):
            _to_ms(bad, "ttl")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^ttl must be seconds or a timedelta, got \[1\]"):
        to_ms([1], "ttl")  # type: ignore[arg-type]  # unhashable: not through the cache


def test_a_claim_stages_assignments_and_op_ids_are_fresh() -> None:
    service = StateService()
    claim = service.claim("ana", "m1")
    claim.assign({"a": 1})
    claim.commit()
    assert service.get("ana") == {"a": 1}
    with pytest.raises(UsageError, match="not open"):
        claim.assign({"c": 1})
    first, second = new_op_id(), new_op_id()
    assert len(first) == 16
    assert first != second
