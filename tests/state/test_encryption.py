"""Secret fields encrypted at rest, through the services on memory and a real Redis.

The pure cipher is tested in test_crypto.py; here the wiring: what reaches the
store (the hash, MONITOR, SLOWLOG, the AOF file, the CLI, logs) and what callers read.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

import servers
from chatstate import (
    AsyncMemoryBackend,
    AsyncStateService,
    CachedUser,
    FieldEncryption,
    MemoryBackend,
    RedisBackend,
    StateData,
    StateService,
)
from chatstate.__main__ import main
from chatstate.auth import get_valid_token, set_jwt_token
from chatstate.exceptions import ConfigurationError, DecryptionError, SecretFieldError
from conftest import register_secret

KEY_A = FieldEncryption.generate_key()
KEY_B = FieldEncryption.generate_key()
RING = FieldEncryption({"a": KEY_A})
SECRET_PATHS = ["jwt_token", "profile.pin", "card"]
RULES = StateData(preserved=["jwt_token"], encryption=RING, secret=SECRET_PATHS)


def _token(sub: str = "user-1", lifetime: int = 3600) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + lifetime, "n": time.monotonic_ns()}
    return register_secret(jwt.encode(payload, "k" * 32, algorithm="HS256"))


def _raw(svc: StateService, user: str) -> dict[str, Any]:
    """The document as the backend stores it (no decryption)."""
    stored = svc.manager.backend.load(user)
    assert stored is not None
    return stored.data


# -- configuration -----------------------------------------------------------------


def test_secret_defaults_to_the_token_field_with_encryption_only() -> None:
    """With a key ring the token field is secret by default; without one nothing is."""
    assert StateData(encryption=RING).secret == {("jwt_token",)}
    assert StateData(encryption=RING, token_field="tok").secret == {("tok",)}
    assert StateData().secret == frozenset()
    assert StateData(secret=["a.b"]).secret == {("a", "b")}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encryption": "not a ring"}, "encryption must be a FieldEncryption"),
        ({"secret": ["a", "a.b"]}, "lies inside secret field"),
        ({"secret": ["auth"], "preserved": ["auth.jwt"]}, "lies inside secret field"),
    ],
)
def test_bad_secret_configuration_is_refused(kwargs: dict[str, Any], message: str) -> None:
    """A wrong ring type, nested secrets or a preserved field inside a secret are refused."""
    with pytest.raises(ConfigurationError, match=message):
        StateData(**kwargs)


def test_the_ring_stays_out_of_the_rules_repr() -> None:
    """StateData's repr names the secret fields, never the key ring."""
    assert KEY_A not in repr(RULES)
    assert "encryption" not in repr(RULES)


# -- memory: what is stored, what is read ------------------------------------------


def test_secret_values_are_stored_encrypted_and_read_in_plaintext() -> None:
    """Patches, set_preserved and assign store tokens; every read decrypts them."""
    svc = StateService(MemoryBackend(), RULES)
    token = _token()
    doc = svc.set_preserved("u", "jwt_token", token)
    assert doc["jwt_token"] == token
    doc = svc.update("u", {"profile": {"pin": "1234", "name": "Ana"}, "card": {"n": "4111"}})
    assert doc["profile"] == {"pin": "1234", "name": "Ana"}
    raw = _raw(svc, "u")
    assert raw["jwt_token"].startswith("csenc:1:a:")
    assert raw["profile"]["pin"].startswith("csenc:1:a:")
    assert raw["profile"]["name"] == "Ana"
    assert raw["card"].startswith("csenc:1:a:")
    assert token not in json.dumps(raw)
    assert "1234" not in json.dumps(raw)
    assert svc.get("u") == {
        "jwt_token": token,
        "profile": {"pin": "1234", "name": "Ana"},
        "card": {"n": "4111"},
    }
    svc.assign("u", {("profile", "pin"): "9999"})
    assert svc.get("u")["profile"]["pin"] == "9999"
    assert _raw(svc, "u")["profile"]["pin"].startswith("csenc:")


def test_a_secret_object_is_replaced_whole_and_none_deletes_it() -> None:
    """An object patch to a secret field replaces it (its None members dropped); None deletes."""
    svc = StateService(MemoryBackend(), RULES)
    svc.update("u", {"card": {"n": "4111", "exp": "12/30"}})
    svc.update("u", {"card": {"n": "5500", "cvv": None}})
    assert svc.get("u")["card"] == {"n": "5500"}
    plain = StateService(MemoryBackend(), StateData(replaced=["card"]))
    plain.update("u", {"card": {"n": "4111", "exp": "12/30"}})
    plain.update("u", {"card": {"n": "5500", "cvv": None}})
    assert plain.get("u")["card"] == svc.get("u")["card"]  # the same rule as a replaced field
    svc.update("u", {"card": None})
    assert "card" not in svc.get("u")
    assert "card" not in _raw(svc, "u")


def test_a_parent_patch_reaches_the_secret_inside() -> None:
    """Replacing or deleting the object that holds a secret field keeps it encrypted or gone."""
    svc = StateService(MemoryBackend(), RULES)
    svc.assign("u", {"profile": {"pin": "1111", "x": 1}})
    assert _raw(svc, "u")["profile"]["pin"].startswith("csenc:")
    assert svc.get("u")["profile"] == {"pin": "1111", "x": 1}
    svc.update("u", {"profile": None})
    assert svc.get("u") == {}


def test_incrementing_a_secret_field_is_refused_and_changes_nothing() -> None:
    """increment() on or inside a secret field raises SecretFieldError; nothing is stored."""
    svc = StateService(MemoryBackend(), RULES)
    svc.update("u", {"card": {"n": "4111"}})
    before = svc.snapshot("u")
    with pytest.raises(SecretFieldError) as info:
        svc.increment("u", "card.n")
    assert info.value.path == "$.card"
    with pytest.raises(SecretFieldError):
        svc.increment("u", "card")
    assert svc.snapshot("u") == before


def test_transactions_and_claims_see_plaintext_and_store_ciphertext() -> None:
    """A transaction's draft and a claim's data are decrypted; what they write is sealed."""
    svc = StateService(MemoryBackend(), RULES)
    svc.update("u", {"profile": {"pin": "1234"}})

    def change(doc: dict[str, Any]) -> None:
        assert doc["profile"]["pin"] == "1234"
        doc["profile"]["pin"] = "4321"

    assert svc.transaction("u", change)["profile"]["pin"] == "4321"
    assert _raw(svc, "u")["profile"]["pin"].startswith("csenc:")
    with svc.claim("u", "m1") as claim:
        assert claim.data["profile"]["pin"] == "4321"
        claim.update({"card": "4111 1111"})
    assert svc.get("u")["card"] == "4111 1111"
    assert "4111" not in json.dumps(_raw(svc, "u"))


def test_a_redelivered_write_with_a_secret_is_a_duplicate() -> None:
    """The op-id digest ignores secret values: a redelivery is a duplicate, not an error."""
    svc = StateService(MemoryBackend(), RULES)
    first = svc.update_once("u", {"profile": {"pin": "1234"}}, op_id="m1")
    again = svc.update_once("u", {"profile": {"pin": "1234"}}, op_id="m1")
    assert (first.status, again.status) == ("applied", "duplicate")
    assert again.snapshot.data["profile"]["pin"] == "1234"


def test_the_request_digest_holds_no_hash_of_a_secret() -> None:
    """Two requests that differ only in a secret value get the same digest."""
    core = StateService(MemoryBackend(), RULES).manager
    one = core.update_write({"profile": {"pin": "1234"}, "a": 1}, "m")
    two = core.update_write({"profile": {"pin": "9876"}, "a": 1}, "m")
    other = core.update_write({"profile": {"pin": "1234"}, "a": 2}, "m")
    assert one.digest == two.digest != other.digest


def test_an_unkeyed_digest_leaves_secret_fields_out_without_encryption_too() -> None:
    """No key ring, no digest_key: the request digest still holds no hash of a secret.

    Its digest is a plain 48-bit hash, which trying every 6-digit PIN would match;
    the secret field stays out of it even though the document keeps it in clear.
    """
    plain = StateService(MemoryBackend(), StateData(secret=["profile.pin"])).manager
    one = plain.update_write({"profile": {"pin": "PIN-739155"}, "a": 1}, "m")
    two = plain.update_write({"profile": {"pin": "PIN-000000"}, "a": 1}, "m")
    other = plain.update_write({"profile": {"pin": "PIN-739155"}, "a": 2}, "m")
    assert one.digest == two.digest != other.digest
    keyed = StateService(
        MemoryBackend(), StateData(secret=["profile.pin"], digest_key=b"k" * 16)
    ).manager  # keyed: nothing can be matched against guesses, so the value counts
    assert (
        keyed.update_write({"profile": {"pin": "1"}}, "m").digest
        != keyed.update_write({"profile": {"pin": "2"}}, "m").digest
    )


def test_export_redacts_secret_fields_unless_asked() -> None:
    """export() hides secret fields (not only preserved ones) and decrypts them on request."""
    svc = StateService(MemoryBackend(), RULES)
    svc.update("u", {"profile": {"pin": "1234"}, "card": "4111"})
    redacted = svc.export("u")["document"]
    assert "1234" not in json.dumps(redacted)
    assert "csenc" not in json.dumps(redacted)
    assert svc.export("u", include_secrets=True)["document"]["profile"]["pin"] == "1234"
    plain = StateService(MemoryBackend(), StateData(secret=["card"]))  # secret, not encrypted
    plain.update("u", {"card": "4111 1111 1111 1111"})
    assert "4111" not in json.dumps(plain.export("u"))


def test_a_tampered_or_moved_token_is_a_typed_error() -> None:
    """A changed ciphertext, or one copied to another user, raises DecryptionError naming both."""
    backend = MemoryBackend()
    svc = StateService(backend, RULES)
    svc.update("ana", {"profile": {"pin": "1234"}})
    token = _raw(svc, "ana")["profile"]["pin"]
    raw = StateService(backend)  # no rules: writes what it is given
    raw.update("bob", {"profile": {"pin": token}})
    with pytest.raises(DecryptionError) as info:
        svc.get("bob")
    assert (info.value.user_id, info.value.path, info.value.reason) == (
        "bob",
        "$.profile.pin",
        "authentication",
    )
    assert token not in str(info.value)
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    raw.update("ana", {"profile": {"pin": flipped}})
    with pytest.raises(DecryptionError, match="ana"):
        svc.get("ana")


def test_rotation_reads_old_keys_and_writes_the_newest() -> None:
    """After a new key is added, old tokens still read; new writes use the new key."""
    backend = MemoryBackend()
    old = StateService(backend, RULES)
    old.update("u", {"profile": {"pin": "1234"}})
    ring = FieldEncryption({"b": KEY_B, "a": KEY_A}, current="b")
    new = StateService(
        backend, StateData(preserved=["jwt_token"], encryption=ring, secret=SECRET_PATHS)
    )
    assert new.get("u")["profile"]["pin"] == "1234"
    new.update("u", {"card": "x"})
    raw = _raw(new, "u")
    assert raw["card"].startswith("csenc:1:b:")
    assert raw["profile"]["pin"].startswith("csenc:1:a:")
    only_b = StateData(encryption=FieldEncryption({"b": KEY_B}), secret=SECRET_PATHS)
    with pytest.raises(DecryptionError) as info:
        StateService(backend, only_b).get("u")
    assert info.value.reason == "unknown_key"


def test_the_async_service_encrypts_alike() -> None:
    """AsyncStateService seals and reveals exactly as the sync one does."""

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        svc = AsyncStateService(AsyncMemoryBackend(), RULES)
        await svc.update("u", {"profile": {"pin": "1234"}})
        await svc.transaction("u", lambda d: {**d, "card": "4111"})
        stored = await svc.manager.backend.load("u")
        assert stored is not None
        return await svc.get("u"), stored.data

    plain, raw = asyncio.run(run())
    assert plain == {"profile": {"pin": "1234"}, "card": "4111"}
    assert raw["card"].startswith("csenc:")
    assert raw["profile"]["pin"].startswith("csenc:")


def test_without_a_ring_nothing_changes() -> None:
    """StateData without encryption stores secret-field values as they are."""
    svc = StateService(MemoryBackend(), StateData(secret=["card"]))
    svc.update("u", {"card": "4111"})
    assert _raw(svc, "u") == {"card": "4111"}


# -- Redis: the token never reaches the server in plaintext ------------------------


@pytest.mark.redis
def test_token_never_reaches_redis_in_plaintext(tmp_path: Path, server_kind: str) -> None:
    """A login and a refresh: the token is in no MONITOR line, hash field, SLOWLOG entry or AOF."""
    server = servers.start_server(server_kind, "--appendonly", "yes", "--appendfsync", "always")
    try:
        admin = server.client()
        admin.config_set("slowlog-log-slower-than", 0)
        admin.config_set("slowlog-max-len", 10_000)
        svc = StateService(RedisBackend.from_url(server.url, namespace="enc"), RULES)
        user = CachedUser("+34600111222", svc)
        first, second = _token(), _token()
        with servers.monitored(server) as seen:
            set_jwt_token(user, first)  # the login
            expired = _token(lifetime=-10)
            user.state.set_preserved("jwt_token", expired)
            assert get_valid_token(user, lambda _old: second) == second  # the refresh
            svc.update(user.user_id, {"profile": {"pin": "2468"}})
        assert seen
        assert any("EVALSHA" in line for line in seen)
        text = "\n".join(seen)
        for secret in (first, second, expired, "2468"):
            assert secret not in text
        stored = {k.decode(): v.decode() for k, v in admin.hgetall("enc:{+34600111222}").items()}
        assert second not in json.dumps(stored)
        assert "2468" not in json.dumps(stored)
        slowlog = json.dumps([str(entry) for entry in admin.slowlog_get(10_000)])
        assert "EVALSHA" in slowlog or "evalsha" in slowlog.lower()
        assert second not in slowlog
        assert first not in slowlog
        admin.execute_command("BGREWRITEAOF")
        aof = b"".join(
            p.read_bytes() for p in Path(server.directory).rglob("*.aof*") if p.is_file()
        )
        assert aof, "the server wrote no AOF file"
        for secret in (first, second, "2468"):
            assert secret.encode() not in aof
        assert user.state.jwt_token == second
        svc.close()
        admin.close()
    finally:
        server.cleanup()


@pytest.mark.redis
def test_the_cli_reencrypts_to_the_newest_key(
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`chatstate reencrypt` moves every document to the newest key, skips current ones on a rerun."""
    old = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    plain = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    for i in range(5):
        old.update(f"u{i}", {"profile": {"pin": f"{i}{i}{i}{i}"}, "n": i})
    plain.update("legacy", {"card": "4111 2222"})  # written before encryption was on
    module = tmp_path / "enc_rules_mod.py"
    module.write_text(
        "from chatstate import FieldEncryption, StateData\n"
        f"RING = FieldEncryption({{'b': {KEY_B!r}, 'a': {KEY_A!r}}}, current='b')\n"
        f"RULES = StateData(preserved=['jwt_token'], encryption=RING, secret={SECRET_PATHS!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [
        "reencrypt",
        "--redis",
        redis_url,
        "--namespace",
        namespace,
        "--rules",
        "enc_rules_mod:RULES",
    ]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would re-encrypt: 6, already current: 0, failed: 0" in out
    assert plain.get("legacy") == {"card": "4111 2222"}  # the dry run changed nothing
    assert main(args) == 0
    assert "re-encrypted: 6, already current: 0, failed: 0" in capsys.readouterr().out
    assert main(args) == 0
    assert "re-encrypted: 0, already current: 6, failed: 0" in capsys.readouterr().out
    assert plain.get("legacy")["card"].startswith("csenc:1:b:")
    assert plain.get("u3")["profile"]["pin"].startswith("csenc:1:b:")
    only_b = StateData(encryption=FieldEncryption({"b": KEY_B}), secret=SECRET_PATHS)
    new = StateService(RedisBackend.from_url(redis_url, namespace=namespace), only_b)
    assert new.get("u3") == {"profile": {"pin": "3333"}, "n": 3}
    assert new.get("legacy") == {"card": "4111 2222"}
    for svc in (old, plain, new):
        svc.close()


@pytest.mark.redis
def test_the_cli_state_command_shows_no_secret(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`chatstate state` prints neither the plaintext nor the ciphertext of a secret field."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    svc.update("u", {"profile": {"pin": "8642", "name": "Ana"}})
    assert main(["state", "u", "--redis", redis_url, "--namespace", namespace]) == 0
    out = capsys.readouterr().out
    assert "Ana" in out
    assert "8642" not in out
    assert "csenc" not in out
    svc.close()


# -- what the probe of the first version found ----------------------------------------


def test_reprs_hide_secret_fields_too() -> None:
    """A returned document and a flow context's state hide secret fields, not only preserved ones."""
    svc = StateService(MemoryBackend(), StateData(secret=["profile.pin"]))  # no ring
    doc = svc.update("u", {"profile": {"pin": "987654", "name": "Ana"}})
    assert "987654" not in repr(doc)
    assert "Ana" in repr(doc)
    assert doc["profile"]["pin"] == "987654"


def test_a_transaction_keeps_the_ciphertext_of_unchanged_secrets() -> None:
    """Rewriting the document whole re-encrypts only the secret values that changed."""
    svc = StateService(MemoryBackend(), RULES)
    svc.set_preserved("u", "jwt_token", "eyJ.a.b")
    svc.update("u", {"profile": {"pin": "1234"}, "card": "4111"})
    before = _raw(svc, "u")
    svc.transaction("u", lambda d: {**d, "z": 1, "card": "5500"})
    after = _raw(svc, "u")
    assert after["jwt_token"] == before["jwt_token"]
    assert after["profile"]["pin"] == before["profile"]["pin"]
    assert after["card"] != before["card"]
    assert svc.get("u")["card"] == "5500"


def test_a_secret_of_another_type_is_not_kept_for_an_equal_value() -> None:
    """True and 1 are equal in Python but not in JSON: the value is encrypted again."""
    svc = StateService(MemoryBackend(), RULES)
    svc.update("u", {"card": 1})
    svc.transaction("u", lambda d: {**d, "card": True})
    assert svc.get("u")["card"] is True


def test_the_digest_masks_a_secret_whatever_its_shape() -> None:
    """A scalar, a list or an object at a secret path digest alike; a deletion does not."""
    core = StateService(MemoryBackend(), RULES).manager
    digests = {
        core.update_write({"card": value, "a": 1}, "m").digest
        for value in ("4111", 4111, ["4111"], {"n": "4111"}, {"old": "1", "new": None})
    }
    assert len(digests) == 1
    assert core.update_write({"card": None, "a": 1}, "m").digest not in digests


@pytest.mark.redis
def test_import_with_rules_encrypts_a_plaintext_export(
    redis_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service's plaintext export imported with --rules is stored encrypted, and reads back."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    svc.update("ana", {"profile": {"pin": "1357"}, "step": 2})
    export = svc.export("ana", include_secrets=True)
    assert export["document"]["profile"]["pin"] == "1357"
    svc.erase("ana")
    path = tmp_path / "ana.json"
    path.write_text(json.dumps(export))
    module = tmp_path / "enc_import_mod.py"
    module.write_text(
        "from chatstate import FieldEncryption, StateData\n"
        f"RING = FieldEncryption({{'a': {KEY_A!r}}}, accept_plaintext=False)\n"
        f"RULES = StateData(preserved=['jwt_token'], encryption=RING, secret={SECRET_PATHS!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["--redis", redis_url, "--namespace", namespace]
    assert main(["import", str(path), *base, "--rules", "enc_import_mod:RULES"]) == 0
    assert _raw(svc, "ana")["profile"]["pin"].startswith("csenc:1:a:")
    assert svc.get("ana") == {"profile": {"pin": "1357"}, "step": 2}
    svc.close()


@pytest.mark.redis
def test_reencrypt_with_strict_rules_brings_plaintext_in(
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the bot's strict ring, the dry run and the run agree and plaintext gets encrypted."""
    plain = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    for i in range(3):
        plain.update(f"u{i}", {"card": f"4111-{i}"})
    module = tmp_path / "enc_strict_mod.py"
    module.write_text(
        "from chatstate import FieldEncryption, StateData\n"
        f"RING = FieldEncryption({{'a': {KEY_A!r}}}, accept_plaintext=False)\n"
        f"RULES = StateData(encryption=RING, secret={SECRET_PATHS!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["reencrypt", "--redis", redis_url, "--namespace", namespace]
    args += ["--rules", "enc_strict_mod:RULES"]
    assert main([*args, "--dry-run"]) == 0
    assert "would re-encrypt: 3, already current: 0, failed: 0" in capsys.readouterr().out
    assert main(args) == 0
    assert "re-encrypted: 3, already current: 0, failed: 0" in capsys.readouterr().out
    strict = StateData(encryption=FieldEncryption({"a": KEY_A}, accept_plaintext=False))
    strict = StateData(encryption=strict.encryption, secret=SECRET_PATHS)
    reader = StateService(RedisBackend.from_url(redis_url, namespace=namespace), strict)
    assert reader.get("u1") == {"card": "4111-1"}
    for svc in (plain, reader):
        svc.close()


@pytest.mark.redis
def test_the_cli_fingerprint_with_rules_is_the_tokens(
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`chatstate state --rules` shows the token's fingerprint, the one the logs show."""
    from chatstate.auth import fingerprint

    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    token = _token()
    set_jwt_token(CachedUser("u", svc), token)
    module = tmp_path / "enc_state_mod.py"
    module.write_text(
        "from chatstate import FieldEncryption, StateData\n"
        f"RULES = StateData(preserved=['jwt_token'], encryption=FieldEncryption({{'a': {KEY_A!r}}}),"
        f" secret={SECRET_PATHS!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["--redis", redis_url, "--namespace", namespace]
    assert main(["state", "u", *base, "--rules", "enc_state_mod:RULES"]) == 0
    out = capsys.readouterr().out
    assert fingerprint(token) in out
    assert token not in out
    svc.close()


# -- with schema migrations -----------------------------------------------------------


def _move_pin(doc: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2: the PIN moves from the top level into the profile."""
    pin = doc.pop("pin", None)
    if pin is not None:
        doc.setdefault("profile", {})["pin"] = pin
    return doc


def test_a_migration_sees_plaintext_and_its_result_is_sealed_at_the_new_path() -> None:
    """Migrations run on decrypted data; a secret moved to a new path is encrypted for that path."""
    backend = MemoryBackend()
    v1 = StateData(encryption=RING, secret=["pin"])
    StateService(backend, v1).update("u", {"pin": "2468", "n": 1})
    seen: list[Any] = []

    def move(doc: dict[str, Any]) -> dict[str, Any]:
        seen.append(doc.get("pin"))
        return _move_pin(doc)

    v2 = StateData(  # "pin" stays declared while documents of schema 1 may hold it
        schema_version=2, migrations={1: move}, encryption=RING, secret=["pin", "profile.pin"]
    )
    svc = StateService(backend, v2)
    assert svc.get("u") == {"profile": {"pin": "2468"}, "n": 1}
    assert seen == ["2468"]  # the migration got the plaintext, not a token
    raw = _raw(svc, "u")
    assert raw["profile"]["pin"].startswith("csenc:1:a:")
    assert "pin" not in raw
    assert svc.snapshot("u").schema == 2
    svc.update("u", {"n": 2})  # a later write sees the migrated, decryptable document
    assert svc.get("u") == {"profile": {"pin": "2468"}, "n": 2}


def test_a_secret_moved_from_an_undeclared_field_is_refused_not_encrypted_twice() -> None:
    """Dropping the old path from ``secret`` too early fails loudly; nothing is written."""
    backend = MemoryBackend()
    StateService(backend, StateData(encryption=RING, secret=["pin"])).update("u", {"pin": "1"})
    v2 = StateData(
        schema_version=2, migrations={1: _move_pin}, encryption=RING, secret=["profile.pin"]
    )
    with pytest.raises(SecretFieldError, match="encrypted again"):
        StateService(backend, v2).get("u")
    assert backend.load("u").schema == 1


@pytest.mark.redis
def test_the_cli_migrates_encrypted_documents(
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`chatstate migrate` decrypts, migrates and re-encrypts each document under its real id."""
    v1 = StateData(encryption=RING, secret=["pin"])
    old = StateService(RedisBackend.from_url(redis_url, namespace=namespace), v1)
    for user in ("ana", "+34 600", "jos\u00e9"):
        old.update(user, {"pin": f"pin-{user}"})
    module = tmp_path / "enc_migrate_mod.py"
    module.write_text(
        "from chatstate import FieldEncryption, StateData\n"
        "def move(doc):\n"
        "    doc.setdefault('profile', {})['pin'] = doc.pop('pin')\n"
        "    return doc\n"
        f"RULES = StateData(schema_version=2, migrations={{1: move}}, "
        f"encryption=FieldEncryption({{'a': {KEY_A!r}}}), secret=['pin', 'profile.pin'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["migrate", "--redis", redis_url, "--namespace", namespace]
    assert main([*args, "--rules", "enc_migrate_mod:RULES"]) == 0
    assert "migrated: 3, already current: 0, failed: 0" in capsys.readouterr().out
    v2 = StateData(
        schema_version=2, migrations={1: _move_pin}, encryption=RING, secret=["profile.pin"]
    )
    new = StateService(RedisBackend.from_url(redis_url, namespace=namespace), v2)
    for user in ("ana", "+34 600", "jos\u00e9"):
        assert new.get(user) == {"profile": {"pin": f"pin-{user}"}}
        assert _raw(new, user)["profile"]["pin"].startswith("csenc:")
    for svc in (old, new):
        svc.close()
