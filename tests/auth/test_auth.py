"""JWT helpers: storage in preserved state, PyJWT checks, single-flight refresh, redaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from chatstate import (
    AsyncCachedUser,
    AsyncMemoryBackend,
    AsyncRedisBackend,
    AsyncStateService,
    CachedUser,
    MemoryBackend,
    RedisBackend,
    StateData,
    StateService,
)
from chatstate.auth import (
    ApiClient,
    AsyncApiClient,
    TokenVerifier,
    aget_valid_token,
    aset_jwt_token,
    clear_jwt_token,
    fingerprint,
    get_jwt_token,
    get_valid_token,
    read_token,
    set_jwt_token,
)
from chatstate.exceptions import (
    ExpiredTokenError,
    ImmatureTokenError,
    InvalidTokenError,
    LockLostError,
    PreservedFieldError,
    RedactedError,
    StateError,
    TokenRefreshError,
    UsageError,
)
from conftest import register_secret
from strategies import patches

RULES = StateData(preserved=["jwt_token", "profile"])
HS_KEY = "test-hmac-secret-that-is-long-enough-0123456789"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_token(
    lifetime: float = 3600,
    *,
    key: Any = HS_KEY,
    alg: str = "HS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A real token made with PyJWT, registered as a secret for the log guard."""
    now = int(time.time())
    payload = {"sub": "user-1", "iat": now, "exp": now + lifetime, **claims}
    return register_secret(jwt.encode(payload, key, algorithm=alg, headers=headers))


def unsigned_token(lifetime: float = 3600) -> str:
    return register_secret(
        jwt.encode({"exp": int(time.time() + lifetime)}, None, algorithm="none")  # type: ignore[arg-type]
    )


@pytest.fixture
def user() -> CachedUser:
    return CachedUser("+34600000000", StateService(MemoryBackend(), RULES))


# -- storing ---------------------------------------------------------------------


def test_set_get_clear(user: CachedUser) -> None:
    """A token is stored in the preserved field, read back and cleared."""
    token = make_token()
    set_jwt_token(user, token)
    assert get_jwt_token(user) == token
    assert user.jwt_token == token
    assert user.state.jwt_token == token
    assert CachedUser(user.user_id, user.service).jwt_token == token
    clear_jwt_token(user)
    assert get_jwt_token(user) is None


@pytest.mark.parametrize("bad", [None, "", "not-a-jwt", "a.b.c", "x" * 50, 42])
def test_bad_tokens_are_refused_without_echo(user: CachedUser, bad: Any) -> None:
    """None, empty and malformed tokens raise StateError: 'Failed to set JWT token', no echo."""
    with pytest.raises(StateError) as info:
        set_jwt_token(user, bad)
    assert str(info.value).startswith("Failed to set JWT token")
    assert isinstance(info.value, InvalidTokenError)
    if isinstance(bad, str) and bad:
        assert bad not in str(info.value)
    assert get_jwt_token(user) is None


def test_unsigned_tokens_are_refused_everywhere(user: CachedUser) -> None:
    """alg: none is refused when storing, reading and verifying."""
    token = unsigned_token()
    with pytest.raises(InvalidTokenError):
        set_jwt_token(user, token)
    with pytest.raises(InvalidTokenError):
        read_token(token)
    with pytest.raises(InvalidTokenError):
        TokenVerifier(HS_KEY, ["HS256"]).verify(token)


def test_the_token_field_must_be_preserved() -> None:
    """Using the helpers on rules that do not preserve the token field is a clear error."""
    user = CachedUser("u", StateService())
    with pytest.raises(ValueError, match="preserved"):
        set_jwt_token(user, make_token())


def test_token_survives_patches_resets_and_is_patch_proof(user: CachedUser) -> None:
    """Updates and resets keep the token; a patch cannot overwrite or delete it."""
    token = make_token()
    set_jwt_token(user, token)
    user.state.update({"step": "menu"})
    user.state.reset()
    with pytest.raises(PreservedFieldError) as info:
        user.state.update({"jwt_token": None})
    assert token not in str(info.value)
    assert user.state.refresh()["jwt_token"] == token


@settings(max_examples=50)
@given(seq=st.lists(st.one_of(patches(max_leaves=5), st.just("reset")), max_size=8))
def test_token_survives_any_sequence(seq: list[Any]) -> None:
    """Property: whatever patches and resets come, the stored token stays the same."""
    user = CachedUser("p", StateService(MemoryBackend(), RULES))
    token = make_token()
    set_jwt_token(user, token)
    for item in seq:
        if item == "reset":
            user.state.reset()
            continue
        with contextlib.suppress(PreservedFieldError):
            user.state.update(item)
        assert user.jwt_token == token
    assert CachedUser("p", user.service).jwt_token == token


# -- reading and verifying ----------------------------------------------------------


def test_read_token_reads_exp_without_checking_the_signature() -> None:
    """Unverified mode reads exp of any signed token, even one signed with a key we lack."""
    token = make_token(120, key="someone-elses-secret-key-0123456789abcdef")
    info = read_token(token)
    assert info.expires_at is not None
    assert timedelta(seconds=100) < info.expires_at - datetime.now(UTC) <= timedelta(seconds=120)
    assert info.fingerprint == fingerprint(token)
    assert token not in repr(info)


@pytest.mark.parametrize(
    ("key", "verify_key", "alg"),
    [
        (HS_KEY, HS_KEY, "HS256"),
        (RSA_KEY, _pem(RSA_KEY), "RS256"),
        (EC_KEY, _pem(EC_KEY), "ES256"),
    ],
    ids=["HS256", "RS256", "ES256"],
)
def test_verified_tokens(key: Any, verify_key: Any, alg: str) -> None:
    """A valid token verifies; expired, immature, tampered, wrong-key ones are refused."""
    verifier = TokenVerifier(verify_key, [alg], leeway=timedelta(seconds=1))
    assert verifier.verify(make_token(key=key, alg=alg)).algorithm == alg
    with pytest.raises(ExpiredTokenError):
        verifier.verify(make_token(-60, key=key, alg=alg))
    with pytest.raises(ImmatureTokenError):
        verifier.verify(make_token(key=key, alg=alg, nbf=int(time.time()) + 600))
    with pytest.raises(ImmatureTokenError):
        verifier.verify(make_token(key=key, alg=alg, iat=int(time.time()) + 600))
    good = make_token(key=key, alg=alg)
    header, _payload, signature = good.split(".")
    forged = jwt.utils.base64url_encode(b'{"sub":"admin","exp":9999999999}').decode()
    with pytest.raises(InvalidTokenError):
        verifier.verify(register_secret(f"{header}.{forged}.{signature}"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong = {
        "HS256": "another-secret-0123456789abcdef0123456789",
        "RS256": other,
        "ES256": ec.generate_private_key(ec.SECP256R1()),
    }[alg]
    with pytest.raises(InvalidTokenError):
        verifier.verify(make_token(key=wrong, alg=alg))


def test_algorithm_confusion_is_impossible() -> None:
    """An HS256 token signed with the RSA public key is refused by an RS256 verifier."""
    public_pem = _pem(RSA_KEY)
    verifier = TokenVerifier(public_pem, ["RS256"])
    # PyJWT itself refuses to use a PEM public key as an HMAC secret; forge it by hand.
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    body = jwt.utils.base64url_encode(b'{"exp":9999999999}')
    import hashlib
    import hmac

    sig = jwt.utils.base64url_encode(
        hmac.new(public_pem, header + b"." + body, hashlib.sha256).digest()
    )
    forged = register_secret(b".".join([header, body, sig]).decode())
    with pytest.raises(InvalidTokenError, match="not accepted"):
        verifier.verify(forged)
    with pytest.raises(ValueError, match="never mix"):
        TokenVerifier(public_pem, ["HS256", "RS256"])
    with pytest.raises(ValueError):
        TokenVerifier(HS_KEY, [])
    with pytest.raises(ValueError):
        TokenVerifier(HS_KEY, ["none"])


def test_exp_is_required_when_verifying() -> None:
    """A verified token must carry exp."""
    token = register_secret(jwt.encode({"sub": "x"}, HS_KEY, algorithm="HS256"))
    with pytest.raises(InvalidTokenError):
        TokenVerifier(HS_KEY, ["HS256"]).verify(token)


def test_kid_with_path_characters_never_reaches_the_key_resolver() -> None:
    """A kid like ../../etc/passwd is refused before the resolver is called."""
    calls: list[str | None] = []

    def resolve(kid: str | None) -> str:
        calls.append(kid)
        return HS_KEY

    verifier = TokenVerifier(resolve, ["HS256"])
    assert verifier.verify(make_token(headers={"kid": "key-2026.1"})).algorithm == "HS256"
    for kid in ("../../etc/passwd", "a/b", "a\\b", "k\n", "..", "x" * 200):
        with pytest.raises(InvalidTokenError, match="kid"):
            verifier.verify(make_token(headers={"kid": kid}))
    assert calls == ["key-2026.1"]


# -- refresh --------------------------------------------------------------------------


def test_valid_token_is_returned_without_refreshing(user: CachedUser) -> None:
    """A token far from expiry is returned as it is."""
    token = make_token(3600)
    set_jwt_token(user, token)
    assert get_valid_token(user, lambda _old: pytest.fail("refreshed")) == token


@pytest.mark.parametrize("lifetime", [-10, 30], ids=["expired", "within-margin"])
def test_lapsing_tokens_are_refreshed(user: CachedUser, lifetime: int) -> None:
    """An expired token, or one inside the margin, is replaced by the refresh's result."""
    old = make_token(lifetime)
    user.state.set_preserved("jwt_token", old)
    new = make_token(3600, jti="new")
    seen: list[str | None] = []

    def refresh(previous: str | None) -> str:
        seen.append(previous)
        return new

    assert get_valid_token(user, refresh, margin=timedelta(seconds=60)) == new
    assert seen == [old]
    assert CachedUser(user.user_id, user.service).jwt_token == new


def test_missing_token_is_fetched(user: CachedUser) -> None:
    """With no token stored, refresh is called with None."""
    new = make_token()
    assert get_valid_token(user, lambda old: new if old is None else "x") == new


def test_refresh_failure_keeps_the_old_token(user: CachedUser) -> None:
    """A failing refresh raises TokenRefreshError; a still-valid old token is kept."""
    old = make_token(30)
    set_jwt_token(user, old)

    def broken(previous: str | None) -> str:
        raise ConnectionError(f"login API down, had {previous}")

    with pytest.raises(TokenRefreshError) as info:
        get_valid_token(user, broken)
    assert info.value.old_token_valid is True
    assert old not in str(info.value)
    assert str(info.value).startswith("Failed to refresh JWT token")
    assert user.state.refresh()["jwt_token"] == old
    with pytest.raises(TokenRefreshError) as info:
        get_valid_token(user, lambda _previous: "garbage")
    assert user.jwt_token == old


def test_a_failed_refresh_never_chains_the_callables_message(user: CachedUser) -> None:
    """The refresh callable's error (which may quote a token) is not in the traceback."""
    old = make_token(30)
    set_jwt_token(user, old)
    leaked = register_secret(f"refresh-secret-{old[-12:]}")

    def broken(previous: str | None) -> str:
        raise ValueError(f"upstream said: token {previous} rejected ({leaked})")

    with pytest.raises(TokenRefreshError) as info:
        get_valid_token(user, broken)
    cause = info.value.__cause__
    assert isinstance(cause, RedactedError)
    assert cause.original_type == "builtins.ValueError"
    assert info.value.__suppress_context__
    assert info.value.__context__ is None  # not even reachable by a tool that walks it
    text = "".join(traceback.format_exception(info.value))
    assert "ValueError" in text
    assert leaked not in text
    assert old not in text
    logging.getLogger("chatstate.test").error("refresh failed", exc_info=info.value)


def test_a_refresh_that_outlives_its_lock_is_reported(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh whose lock lapsed (erased here) logs a warning; the lock raises LockLostError."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    backend = svc.manager.backend
    gone = threading.Event()

    def expire_lock() -> None:
        client = backend.client  # type: ignore[attr-defined]
        key = f"{backend.keys('u')[0]}:lock:test"  # type: ignore[attr-defined]
        while not client.exists(key):
            time.sleep(0.001)
        client.delete(key)  # as if the lease ran out
        gone.set()

    thread = threading.Thread(target=expire_lock)
    thread.start()
    with pytest.raises(LockLostError), backend.lock("u", "test", lease=30, wait=1):  # type: ignore[attr-defined]
        gone.wait(5)
    thread.join()

    user = CachedUser("u", svc)
    new = make_token(3600, jti="slow")

    def slow(previous: str | None) -> str:
        key = f"{backend.keys('u')[0]}:lock:jwt-refresh"  # type: ignore[attr-defined]
        backend.client.delete(key)  # type: ignore[attr-defined]  # the lease lapses meanwhile
        return new

    with caplog.at_level(logging.WARNING, logger="chatstate.auth"):
        assert get_valid_token(user, slow) == new
    assert "lapsed before the refresh ended" in caplog.text
    assert user.state.refresh()["jwt_token"] == new
    svc.close()


def test_expired_old_token_is_reported_invalid(user: CachedUser) -> None:
    """When the old token has expired, the error says it cannot be used."""
    user.state.set_preserved("jwt_token", make_token(-5))
    with pytest.raises(TokenRefreshError) as info:
        get_valid_token(user, lambda _previous: 1 / 0)  # type: ignore[arg-type,return-value]
    assert info.value.old_token_valid is False


def _single_flight_threads(make_user: Any) -> int:
    calls = 0
    lock = threading.Lock()
    new = make_token(3600, jti="fresh")

    def refresh(previous: str | None) -> str:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.1)
        return new

    results: list[str] = []

    def caller() -> None:
        results.append(get_valid_token(make_user(), refresh))

    threads = [threading.Thread(target=caller) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [new] * 20
    return calls


def test_single_flight_threads_memory() -> None:
    """20 threads needing a refresh on the memory backend: one refresh call."""
    svc = StateService(MemoryBackend(), RULES)
    assert _single_flight_threads(lambda: CachedUser("u", svc)) == 1


@pytest.mark.redis
def test_single_flight_across_clients_redis(redis_url: str, namespace: str) -> None:
    """20 threads, each with its own Redis client (as separate processes would): one refresh."""
    services = [
        StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES) for _ in range(4)
    ]
    counter = iter(range(10_000))
    calls = _single_flight_threads(lambda: CachedUser("u", services[next(counter) % 4]))
    assert calls == 1
    for svc in services:
        svc.close()


async def _single_flight_tasks(make_user: Any) -> int:
    calls = 0
    new = make_token(3600, jti="fresh-async")

    async def refresh(previous: str | None) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return new

    async def caller() -> str:
        return await aget_valid_token(make_user(), refresh)

    results = await asyncio.gather(*(caller() for _ in range(20)))
    assert results == [new] * 20
    return calls


def test_single_flight_tasks_memory() -> None:
    """20 asyncio tasks on the memory backend: one refresh call."""
    svc = AsyncStateService(AsyncMemoryBackend(), RULES)
    assert asyncio.run(_single_flight_tasks(lambda: AsyncCachedUser("u", svc))) == 1


@pytest.mark.redis
def test_single_flight_tasks_redis(redis_url: str, namespace: str) -> None:
    """20 asyncio tasks over Redis: one refresh call."""

    async def main() -> int:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace), RULES)
        calls = await _single_flight_tasks(lambda: AsyncCachedUser("u", svc))
        await svc.aclose()
        return calls

    assert asyncio.run(main()) == 1


# -- the parent-service pattern and redaction -------------------------------------------


class Accounts(ApiClient):
    """An API client of the bot."""


class Payments(ApiClient):
    """Another API client of the bot."""


def test_api_clients_share_the_users_token(user: CachedUser) -> None:
    """service.jwt_token writes through; parent.state reads it; children see it."""
    accounts = Accounts(user)
    token = make_token()
    accounts.jwt_token = token
    assert accounts.parent.state.jwt_token == token
    payments = Payments(accounts)
    assert payments.parent is accounts.parent
    assert payments.jwt_token == token
    later = Accounts(CachedUser(user.user_id, user.service))  # the next request
    assert later.jwt_token == token
    for text in (
        repr(accounts),
        repr(payments),
        repr(user),
        repr(user.state),
        repr(user.service.snapshot(user.user_id)),
    ):
        assert token not in text
    assert fingerprint(token) in repr(accounts)
    payments.logout()
    assert Accounts(CachedUser(user.user_id, user.service)).jwt_token is None


def test_async_api_client() -> None:
    """The async twin stores and shares the token the same way."""

    async def main() -> None:
        svc = AsyncStateService(AsyncMemoryBackend(), RULES)
        user = AsyncCachedUser("u", svc)
        await user.load()
        client = AsyncApiClient(user)
        token = make_token()
        await client.set_jwt_token(token)
        assert AsyncApiClient(client).jwt_token == token
        assert token not in repr(client)
        await aset_jwt_token(user, make_token(jti="2"))
        await client.logout()
        assert client.jwt_token is None

    asyncio.run(main())


def test_cached_user_twins_read_the_document_once() -> None:
    """load() and state give one cached state; only the asyncio twin needs load() first."""
    store = MemoryBackend()
    svc = StateService(store, RULES)
    svc.update("u", {"a": 1})
    user = CachedUser("u", svc)
    assert user.state is user.load() is user.load()
    assert user.state["a"] == 1

    async def main() -> None:
        auser = AsyncCachedUser("u", AsyncStateService(AsyncMemoryBackend(store), RULES))
        with pytest.raises(UsageError, match="load"):
            _ = auser.state
        state = await auser.load()
        assert auser.state is state is await auser.load()
        assert state["a"] == 1

    asyncio.run(main())


def test_writes_never_show_tokens_in_reprs(user: CachedUser) -> None:
    """The objects a write makes or returns do not print the token they hold."""
    token = make_token()
    write = user.service.manager.preserved_write("jwt_token", token, None)
    assert token not in repr(write)
    set_jwt_token(user, token)
    outcome = user.service.update_once(user.user_id, {"a": 1}, op_id=None)
    document = user.service.update(user.user_id, {"b": 2})
    assert document["jwt_token"] == token  # the token is there...
    for shown in (repr(outcome), repr(outcome.snapshot), repr(document), str(document)):
        assert token not in shown  # ...and never printed
    assert token not in repr(user.service.reset(user.user_id))
    assert token not in repr(
        user.service.manager.replace_write(
            user.service.snapshot(user.user_id), user.service.get(user.user_id), None
        )
    )


def test_log_records_show_fingerprints(user: CachedUser, caplog: pytest.LogCaptureFixture) -> None:
    """Auth logs name the token by fingerprint only."""
    token = make_token()
    set_jwt_token(user, token)
    assert fingerprint(token) in caplog.text
    assert token not in caplog.text


def _refresh_in_process(url: str, namespace: str, token: str) -> list[str]:
    """One process of the cross-process single-flight test: 5 threads want a token."""
    import redis as redis_lib

    counter = redis_lib.Redis.from_url(url)
    svc = StateService(RedisBackend.from_url(url, namespace=namespace), RULES)

    def refresh(previous: str | None) -> str:
        counter.incr(f"{namespace}:refresh-calls")
        time.sleep(0.3)
        return token

    results: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(get_valid_token(CachedUser("u", svc), refresh))
        )
        for _ in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    svc.close()
    counter.close()
    return results


@pytest.mark.redis
@pytest.mark.slow
def test_single_flight_across_processes(redis_url: str, namespace: str) -> None:
    """4 processes x 5 threads needing a refresh at once: the refresh runs once in all."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import redis as redis_lib

    token = make_token(3600, jti="cross-process")
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_refresh_in_process, redis_url, namespace, token) for _ in range(4)]
        results = [r for f in futures for r in f.result()]
    assert results == [token] * 20
    counter = redis_lib.Redis.from_url(redis_url)
    assert int(counter.get(f"{namespace}:refresh-calls")) == 1
    counter.close()
