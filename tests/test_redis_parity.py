"""Hypothesis parity: the Lua script and the Python rules reach the same documents."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstate import (
    MemoryBackend,
    RedisBackend,
    StateData,
    StateError,
    StateService,
    StateTooLargeError,
)
from chatstate.state import stored_size
from strategies import EDGE_FLOATS, EDGE_INTS, canonical, documents, json_values, patches

pytestmark = pytest.mark.redis

RULES = StateData(preserved=["jwt_token", "p.id"], replaced=["cart"], max_bytes=3000)
_users = itertools.count()

operations = st.lists(
    st.one_of(
        st.tuples(st.just("update"), patches()),
        st.tuples(st.just("reset"), st.none()),
        st.tuples(st.just("token"), st.one_of(st.text(max_size=8), st.none())),
        st.tuples(st.just("pid"), st.one_of(st.sampled_from(EDGE_INTS + EDGE_FLOATS), st.none())),
        st.tuples(st.just("replace"), documents()),
        st.tuples(
            st.just("increment"),
            st.tuples(
                st.lists(st.sampled_from(["n", "c", "a", "cart", "p"]), min_size=1, max_size=3),
                st.sampled_from([1, -1, 0, 2**62, -(2**62), 2**63 - 1, -(2**63)]),
            ),
        ),
        st.tuples(
            st.just("assign"),
            st.dictionaries(
                st.lists(st.sampled_from(["a", "b", "n", "x"]), min_size=1, max_size=2).map(tuple),
                st.one_of(json_values(max_leaves=4), st.none()),
                max_size=3,
            ),
        ),
    ),
    min_size=1,
    max_size=8,
)


def _run(svc: StateService, user: str, op: str, arg: object) -> tuple[str, str]:
    try:
        if op == "update":
            out = svc.update(user, arg)  # type: ignore[arg-type]
        elif op == "reset":
            out = svc.reset(user)
        elif op == "token":
            out = svc.set_preserved(user, "jwt_token", arg)
        elif op == "pid":
            out = svc.set_preserved(user, "p.id", arg)
        elif op == "increment":
            path, by = arg  # type: ignore[misc]
            value = svc.increment(user, tuple(path), by)
            out = {"value": value}
        elif op == "assign":
            out = svc.assign(user, arg)  # type: ignore[arg-type]
        else:
            keep = {k: v for k, v in svc.get(user).items() if k in ("jwt_token", "p")}
            new = {**arg, **keep}  # type: ignore[dict-item]
            if "p" in keep and isinstance(keep["p"], dict):
                new["p"] = keep["p"]
            out = svc.transaction(user, lambda _doc: new)
    except StateError as exc:
        return "error", type(exc).__name__
    snap = svc.snapshot(user)
    return canonical(dict(out)), f"{canonical(snap.data)} v{snap.version}"


@pytest.fixture
def services(redis_url: str, namespace: str):
    redis_svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    memory_svc = StateService(MemoryBackend(), RULES)
    yield memory_svc, redis_svc
    redis_svc.close()


# Each example works on a user of its own, so sharing the services is safe.
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=documents(), ops=operations)
def test_memory_and_redis_agree(services, start, ops) -> None:
    """Any sequence of updates, resets, preserved writes and transactions: same docs or errors."""
    memory_svc, redis_svc = services
    user = f"user:{next(_users)}"
    start = {k: v for k, v in start.items() if k not in ("jwt_token", "p", "cart")}
    backend = redis_svc.manager.backend
    key = backend.keys(user)[0]  # type: ignore[attr-defined]
    assert _run(memory_svc, user, "update", start) == _run(redis_svc, user, "update", start)
    for op, arg in ops:
        assert _run(memory_svc, user, op, arg) == _run(redis_svc, user, op, arg)
        # The size the script keeps incrementally is the size of the document.
        kept = backend.client.hget(key, "#s")  # type: ignore[attr-defined]
        assert int(kept or 0) == stored_size(redis_svc.get(user))


def test_edge_values_survive_lua(services) -> None:
    """The values cjson would damage come back byte for byte from Redis."""
    _, redis_svc = services
    doc = {
        "big": 123456789012345,
        "bigger": 2**53 + 1,
        "huge": 2**64,
        "neg": -(2**63) - 1,
        "tiny": 5e-324,
        "max": 1.7976931348623157e308,
        "sum": 0.1 + 0.2,
        "negzero": -0.0,
        "empty_list": [],
        "empty_obj": {},
        "nested": {"l": [[], {}], "o": {"e": {}}},
        "slash": "a/b",
        "unicode": "\u00e9\U0001f600",
    }
    redis_svc.update("edge", doc)
    assert canonical(redis_svc.get("edge")) == canonical(doc)
    raw = redis_svc.manager.backend.client.hgetall(  # type: ignore[attr-defined]
        redis_svc.manager.backend.keys("edge")[0]  # type: ignore[attr-defined]
    )
    assert raw[b'"big"'] == b"123456789012345"
    assert raw[b'"empty_list"'] == b"[]"
    assert raw[b'"slash"'] == b'"a/b"'


def test_size_limit_is_the_same_number_on_both(services) -> None:
    """A document just under the limit fits on both backends; one byte more fails on both."""
    memory_svc, redis_svc = services
    # stored size of {"s": "x"*n} is len('"s"') + n + 2
    n = RULES.max_bytes - 5
    for svc in (memory_svc, redis_svc):
        assert svc.update("lim", {"s": "x" * n})["s"] == "x" * n
        with pytest.raises(StateError):
            svc.update("lim", {"s": "x" * (n + 1)})


@pytest.mark.redis
def test_a_document_over_a_lowered_max_bytes_can_still_be_deleted(
    redis_url: str, namespace: str
) -> None:
    """After max_bytes is lowered, delete() removes a document now over it, as in memory."""
    for backend in (MemoryBackend(), RedisBackend.from_url(redis_url, namespace=namespace)):
        StateService(backend).update("big", {"blob": "x" * 2000})
        small = StateService(backend, StateData(max_bytes=500))
        with pytest.raises(StateTooLargeError):
            small.update("big", {"more": 1})
        small.delete("big")
        assert small.get("big") == {}
        small.close()
