"""The error tree: what each error means, what derives from what, what is never disguised."""

from __future__ import annotations

import asyncio
import sys

import pytest

import chatstate
from chatstate import (
    AsyncMemoryBackend,
    AsyncStateService,
    ChatstateError,
    MemoryBackend,
    StateData,
    StateService,
)
from chatstate.auth import TokenVerifier
from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendPermissionError,
    BackendUnavailable,
    ConfigurationError,
    InvalidOpIdError,
    LockTimeoutError,
    OutcomeUnknown,
    RedactedError,
    SerializationError,
    UsageError,
    ValidationError,
)


def test_every_exported_error_derives_from_chatstate_error() -> None:
    """Each error class chatstate exports has ChatstateError at its root."""
    errors = [
        getattr(chatstate.exceptions, name)
        for name in chatstate.exceptions.__all__
        if isinstance(getattr(chatstate.exceptions, name), type)
        and issubclass(getattr(chatstate.exceptions, name), BaseException)
    ]
    assert len(errors) > 20
    # RedactedError stands in for a third-party cause whose text was redacted: it is the
    # __cause__ of a chatstate error, never raised by chatstate itself.
    assert all(issubclass(e, ChatstateError) for e in errors if e is not RedactedError)


def test_a_refused_password_is_not_something_to_retry() -> None:
    """BackendAuthenticationError is a PermissionError, not a BackendUnavailable."""
    assert not issubclass(BackendAuthenticationError, BackendUnavailable)
    assert issubclass(BackendAuthenticationError, PermissionError)
    assert issubclass(BackendPermissionError, BackendAuthenticationError)
    assert issubclass(OutcomeUnknown, BackendUnavailable)  # retrying with the op_id is safe


def test_bad_options_are_configuration_errors() -> None:
    """Out-of-range options raise ConfigurationError (a ValueError) when objects are built."""
    bad = [
        lambda: StateService(ttl=0),
        lambda: StateService(dedupe_window=-1),
        lambda: StateService(max_attempts=0),
        lambda: StateService(max_attempts=-1),
        lambda: StateService(max_attempts=True),
        lambda: StateService(rules={"preserved": ["x"]}),  # type: ignore[arg-type]
        lambda: StateData(max_bytes=0),
        lambda: StateData(preserved=["a"], replaced=["a"]),
        lambda: StateData(preserved=[""]),
        lambda: chatstate.RedisBackend.from_url("redis://localhost", namespace="a{b}"),
        lambda: TokenVerifier("k" * 40, algorithms=["HS256", "RS256"]),
    ]
    for make in bad:
        with pytest.raises(ConfigurationError):
            make()
    assert issubclass(ConfigurationError, ValueError)


def test_the_wrong_twin_is_a_usage_error() -> None:
    """A sync service over an async backend (and the reverse) raises UsageError at once."""
    with pytest.raises(UsageError):
        StateService(AsyncMemoryBackend())  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        AsyncStateService(MemoryBackend())  # type: ignore[arg-type]
    svc = AsyncStateService()
    with pytest.raises(UsageError):
        _ = svc.user("u").state
    assert issubclass(UsageError, TypeError)


def test_a_bad_op_id_is_a_validation_error() -> None:
    """An empty, too long or unprintable op_id raises InvalidOpIdError, a ValidationError."""
    svc = StateService()
    for bad in ("", "a\nb", "x" * 201, 5):
        with pytest.raises(InvalidOpIdError) as info:
            svc.update("u", {"a": 1}, op_id=bad)  # type: ignore[arg-type]
        assert isinstance(info.value, ValidationError)
    assert svc.snapshot("u").version == 0


def test_an_integer_too_long_to_write_is_a_serialization_error() -> None:
    """10**4300 cannot be written as text by Python: SerializationError names its path."""
    svc = StateService()
    huge = 10 ** (sys.get_int_max_str_digits() + 1)
    with pytest.raises(SerializationError) as info:
        svc.update("u", {"n": {"m": huge}})
    assert info.value.path == "$.n.m"
    assert svc.get("u") == {}
    assert svc.update("u", {"n": 10**600})["n"] == 10**600  # long but writable is fine


def test_a_lock_not_acquired_in_time_is_a_lock_timeout() -> None:
    """A backend lock held elsewhere raises LockTimeoutError (a TimeoutError) after the wait."""
    store = MemoryBackend()
    with (
        store.lock("u", "x", lease=1, wait=0),
        pytest.raises(LockTimeoutError) as info,
        store.lock("u", "x", lease=1, wait=0.01),
    ):
        pass
    assert isinstance(info.value, TimeoutError)

    async def main() -> None:
        backend = AsyncMemoryBackend(store)
        async with backend.lock("u", "x", lease=1, wait=0):
            with pytest.raises(LockTimeoutError):
                async with backend.lock("u", "x", lease=1, wait=0.01):
                    pass

    asyncio.run(main())


def test_per_user_tables_in_memory_do_not_grow_with_users() -> None:
    """Locks, claims and op logs of 10,000 users leave no entry behind once they are done."""
    from chatstate.auth import _tokens

    now = [0.0]
    store = MemoryBackend(clock=lambda: now[0])
    svc = StateService(store, ttl=60, dedupe_window=1)
    for i in range(10_000):
        with store.lock(f"user-{i}", "jwt-refresh", lease=1, wait=1):
            pass
        svc.claim(f"user-{i}", f"m{i}").commit()
    assert len(store._locks) == 0
    assert len(_tokens._local_locks_sync) == 0
    assert len(store._users) == 10_000
    now[0] += 2
    svc.update("last", {"a": 1})  # any write reclaims what expired
    assert len(store._users) == 1

    async def main() -> int:
        backend = AsyncMemoryBackend(store)
        for i in range(1000):
            async with backend.lock(f"user-{i}", "jwt-refresh", lease=1, wait=1):
                pass
        return len(backend._locks)

    assert asyncio.run(main()) == 0


def test_a_backend_authors_wrong_inputs_are_named() -> None:
    """apply_write / apply_operation say what they wanted instead of an AttributeError."""
    from chatstate.state import OpLog, Snapshot, apply_operation, apply_write
    from chatstate.state._backend import Reset

    with pytest.raises(UsageError, match="Snapshot"):
        apply_operation({"a": 1}, Reset(()), 100)  # type: ignore[arg-type]
    write = StateService().manager.reset_write(None)
    with pytest.raises(UsageError, match="OpLog"):
        apply_write(Snapshot({}, 0), {}, write, 0)  # type: ignore[arg-type]
    assert apply_operation(None, Reset(()), 100)[0] == "applied"
    assert OpLog().records == {}
