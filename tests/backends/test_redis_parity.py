"""Hypothesis parity: the Lua script and the Python reference answer every write alike.

The Redis backend runs one Lua script; the memory backend runs ``apply_write``, the
reference it mirrors. Random sequences run on both must leave the same documents,
and answer the same statuses, versions and values for writes with op ids (resent,
reused with another digest), claims (taken, renewed, completed, kept, released) and
schema versions (a write from older or newer code refused).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chatstate import ChatstateError, MemoryBackend, RedisBackend, StateData, StateService
from chatstate.exceptions import StateError, StateTooLargeError
from chatstate.state import (
    Acquire,
    Delete,
    Edits,
    Increment,
    Operation,
    Outcome,
    Release,
    Renew,
    Replace,
    Reset,
    Snapshot,
    Write,
    stored_size,
)
from fakes import FakeClock
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


# -- raw writes: op ids, claims and schemas ------------------------------------------------
#
# The writes a manager sends, built by hand so that every field varies: a few op keys,
# nonces and digests shared by the steps of an example (so that keys are resent, reused
# with another digest and found duplicate, and claims are held by one call and met by
# another), completing and keeping claims, and the schema version of the code that sends
# the write. Leases are long and the memory backend's clock never moves, so no claim
# lapses on either side: what is compared is the rules, not the timing.

RAW_RULES = StateData(max_bytes=3000)
LEASE_MS = 600_000
OP_KEYS = ["opkeyAAAAAA1", "opkeyAAAAAA2", "opkeyAAAAAA3"]  # 12 characters, as the manager's
NONCES = ["nonce001", "nonce002"]  # two calls: a claim is often met by its holder
DIGESTS = ["", "digestAAAAAA", "digestBBBBBB"]
KEPT = ("keep",)

raw_operations = st.one_of(
    st.tuples(st.just("edits"), patches(max_leaves=6), st.none() | st.integers(0, 5)),
    st.tuples(st.just("edits"), st.just({}), st.none() | st.integers(0, 5)),  # only the op id
    st.tuples(
        st.just("increment"),
        st.lists(st.sampled_from(["n", "a", "keep"]), min_size=1, max_size=2).map(tuple),
        st.sampled_from([1, -1, 2**63 - 1]),
    ),
    st.tuples(st.just("reset"), st.none(), st.none()),
    st.tuples(st.just("replace"), documents(max_leaves=6), st.integers(0, 5)),
    st.tuples(st.just("delete"), st.none(), st.none()),
    st.tuples(st.just("acquire"), st.none(), st.none()),
    st.tuples(st.just("acquire"), st.none(), st.none()),  # twice as likely: claims held
    st.tuples(st.just("renew"), st.none(), st.none()),
    st.tuples(st.just("release"), st.none(), st.none()),
)
CLAIM_OPS = frozenset({"acquire", "renew", "release"})

raw_writes = st.lists(
    st.fixed_dictionaries(
        {
            "op": raw_operations,
            "key": st.sampled_from([*OP_KEYS, None]),  # None: a key made up for this write
            "nonce": st.sampled_from(NONCES),
            "digest": st.sampled_from(DIGESTS),
            "schema": st.sampled_from([None, None, 1, 2, 3]),
            "completes": st.sampled_from([False, False, True]),
            "keeps": st.booleans(),
        }
    ),
    min_size=1,
    max_size=12,
)


def _operation(kind: str, arg: object, extra: object) -> Operation | None:  # noqa: PLR0911 - one return per operation
    if kind == "edits":
        try:
            edits = RAW_RULES.compile(arg)  # type: ignore[arg-type]
        except StateError:
            return None  # a patch the rules refuse never reaches a backend
        return Edits(tuple(edits), extra)  # type: ignore[arg-type]
    if kind == "increment":
        return Increment(arg, extra)  # type: ignore[arg-type]
    if kind == "reset":
        return Reset((KEPT,))
    if kind == "replace":
        return Replace(arg, extra)  # type: ignore[arg-type]
    if kind == "delete":
        return Delete()
    if kind == "acquire":
        return Acquire(LEASE_MS)
    if kind == "renew":
        return Renew(LEASE_MS)
    return Release()


def _write(step: dict[str, object], fresh: int) -> Write | None:
    kind, arg, extra = step["op"]  # type: ignore[misc]
    operation = _operation(kind, arg, extra)
    if operation is None:
        return None
    key = step["key"]
    completes = bool(step["completes"]) and kind not in CLAIM_OPS
    return Write(
        operation,
        # A made-up key is used once and has no op id (the script then skips the
        # lookup on a first send); a shared key carries an op id, as a caller's does.
        key if key is not None else f"fresh{fresh:07d}",  # type: ignore[arg-type]
        step["nonce"],  # type: ignore[arg-type]
        step["digest"] if key is not None else "",  # type: ignore[arg-type]
        None,
        RAW_RULES.max_bytes,
        LEASE_MS,
        completes_claim=completes,
        op_id=None if key is None else f"id-{key}",
        schema=step["schema"],  # type: ignore[arg-type]
        keeps_claim=completes and bool(step["keeps"]),
    )


def _outcome(outcome: Outcome, write: Write) -> tuple[object, ...]:
    """What an outcome answers, in the terms both backends promise."""
    snapshot = outcome.snapshot
    if isinstance(write.operation, Renew | Release):
        # These read nothing but the claim, and the manager asks no document of them
        # (the script answers version 0 beside the document): only the status answers.
        return (outcome.status,)
    busy = outcome.status == "busy"
    return (
        outcome.status,
        outcome.version,
        outcome.value,
        # The script answers the claim key's PTTL, the memory backend its exact lease.
        0 < outcome.retry_after_ms <= LEASE_MS if busy else outcome.retry_after_ms,
        canonical(snapshot.data),
        snapshot.version,
        snapshot.schema if write.schema is not None else None,
    )


def _apply(backend: object, user: str, write: Write) -> tuple[object, ...]:
    try:
        outcome = backend.apply(user, write)  # type: ignore[attr-defined]
    except StateError as exc:
        return ("error", type(exc).__name__)
    return _outcome(outcome, write)


def _stored(backend: object, user: str) -> tuple[object, ...]:
    """The stored document, and which nonce holds the user's claim (a renewal tells)."""
    snapshot = backend.load(user) or Snapshot({}, 0)  # type: ignore[attr-defined]
    holders = []
    for nonce in NONCES:
        probe = Write(Renew(LEASE_MS), "probe0000000", nonce, "", None, 3000, LEASE_MS)
        if backend.apply(user, probe).status == "claimed":  # type: ignore[attr-defined]
            holders.append(nonce)
    return canonical(snapshot.data), snapshot.version, snapshot.schema, holders


@pytest.fixture
def backends(redis_url: str, namespace: str):
    redis_backend = RedisBackend.from_url(redis_url, namespace=namespace)
    yield MemoryBackend(clock=FakeClock()), redis_backend
    redis_backend.close()


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=documents(max_leaves=6), start_schema=st.none() | st.integers(1, 3), steps=raw_writes)
def test_memory_and_redis_answer_op_ids_claims_and_schemas_alike(
    backends, start, start_schema, steps
) -> None:
    """Writes with shared op keys, nonces, digests, claims and schemas: same answers, same state."""
    memory, redis_backend = backends
    user = f"raw:{next(_users)}"
    first = Write(Edits(tuple(RAW_RULES.compile(start))), "start0000000", "nonce000", "", None,
                  RAW_RULES.max_bytes, LEASE_MS, schema=start_schema)  # fmt: skip
    assert _apply(memory, user, first) == _apply(redis_backend, user, first)
    for n, step in enumerate(steps):
        write = _write(step, n)
        if write is None:
            continue
        answer = _apply(memory, user, write)
        assert answer == _apply(redis_backend, user, write), (n, write)
        event(
            f"{type(write.operation).__name__}: {answer[1] if answer[0] == 'error' else answer[0]}"
        )
        assert _stored(memory, user) == _stored(redis_backend, user), (n, write)


# -- the claim API and schema guards, through StateService -----------------------------------
#
# Two handlers of messages per backend, each with code at schema 1 or 2 (a migration
# between them), claim, stage, commit (or keep), renew and release under the public
# API; the manager builds the writes (op keys from message ids, digests of fingerprints
# under a digest key), so the answers of both backends must read the same.


def _to_two(doc: dict[str, object]) -> dict[str, object]:
    return {**doc, "v2": True}


def _code(backend: object, schema: int) -> StateService:
    rules = StateData(
        digest_key="a deployment secret!",
        schema_version=schema,
        migrations={1: _to_two} if schema == 2 else {},
    )
    return StateService(backend, rules)  # type: ignore[arg-type]


claim_steps = st.lists(
    st.tuples(
        st.sampled_from(["claim", "claim", "update", "commit", "keep", "renew", "release", "once"]),
        st.sampled_from([0, 1]),  # which handler
        st.sampled_from(["m1", "m2"]),  # the message id
        st.sampled_from(["hi", "bye"]),  # the message's text
        st.sampled_from([1, 2]),  # the schema of the code that handles it
    ),
    min_size=1,
    max_size=12,
)


def _claim_step(  # noqa: PLR0911 - one answer per action
    services: dict[int, StateService],
    held: dict[int, object],
    user: str,
    step: tuple[str, int, str, str, int],
) -> str:
    action, handler, message, text, schema = step
    service = services[schema]
    claim: Any = held.get(handler)
    try:
        if action == "claim":
            claim = held[handler] = service.claim(
                # No heartbeat: nothing renews behind the test's back.
                user,
                message,
                fingerprint=text,
                lease=LEASE_MS / 1000,
                wait=0,
                heartbeat=False,
            )
            return f"duplicate={claim.duplicate} {canonical(dict(claim.data))}"
        if action == "once":
            outcome = service.update_once(user, {"text": text}, op_id=message)
            return f"{outcome.status} {canonical(dict(outcome.snapshot.data))}"
        if claim is None:
            return "no claim"
        if action == "update":
            claim.update({f"h{handler}": text})
            return "staged"
        if action in {"commit", "keep"}:
            return claim.commit(keep=action == "keep").status
        if action == "renew":
            return f"renewed={claim.renew()}"
        claim.release()
    except ChatstateError as exc:  # a closed claim's misuse (UsageError) answers too
        return type(exc).__name__
    return "released"


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=claim_steps)
def test_memory_and_redis_answer_claims_under_two_schemas_alike(
    redis_url, namespace, steps
) -> None:
    """Claims taken, committed, kept, renewed and released by code at two schemas: same answers."""
    user = f"claims:{next(_users)}"
    redis_backend = RedisBackend.from_url(redis_url, namespace=namespace)
    backends = (MemoryBackend(clock=FakeClock()), redis_backend)
    services = [{s: _code(b, s) for s in (1, 2)} for b in backends]
    held: list[dict[int, object]] = [{}, {}]
    try:
        for step in steps:
            answers = [_claim_step(services[i], held[i], user, step) for i in (0, 1)]
            assert answers[0] == answers[1], step
            event(f"{step[0]}: {answers[0].split(' ')[0]}")
        in_memory, in_redis = (b.load(user) or Snapshot({}, 0) for b in backends)
        assert canonical(in_memory.data) == canonical(in_redis.data)
        assert (in_memory.version, in_memory.schema) == (in_redis.version, in_redis.schema)
    finally:
        redis_backend.close()
