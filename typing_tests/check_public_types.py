"""Static checks of the public API's types: mypy must accept every assert_type here."""

from __future__ import annotations

from typing import Any, assert_type

from chatstate import (
    AsyncCachedUser,
    AsyncClaim,
    AsyncStateService,
    CachedUser,
    Claim,
    Document,
    MemoryBackend,
    Outcome,
    RedisBackend,
    Snapshot,
    StateData,
    StateService,
)
from chatstate.auth import TokenInfo, fingerprint, get_jwt_token, read_token
from chatstate.state import AsyncCachedState, CachedState


def sync_api(svc: StateService) -> None:
    assert_type(svc.get("u"), dict[str, Any])
    assert_type(svc.snapshot("u"), Snapshot)
    assert_type(svc.snapshot("u").schema, int)
    assert_type(svc.rules.schema_version, int | None)
    assert_type(svc.update("u", {"a": 1}), Document)
    assert_type(svc.update_once("u", {"a": 1}, op_id="m1"), Outcome)
    assert_type(svc.update_once("u", {}, op_id=None).applied, bool)
    assert_type(svc.reset("u"), Document)
    assert_type(svc.increment("u", "n"), int)
    assert_type(svc.assign("u", {"a": None}), Document)
    assert_type(svc.claim("u", "m1"), Claim)
    assert_type(svc.claim("u", "m1").duplicate, bool)
    assert_type(svc.delete("u"), None)
    assert_type(svc.transaction("u", lambda doc: {**doc, "n": 1}), dict[str, Any])
    assert_type(svc.user("u"), CachedUser)
    assert_type(svc.user("u").state.version, int)
    assert_type(svc.user("u").load(), CachedState)
    assert_type(svc.user("u").jwt_token, str | None)
    assert_type(svc.rules, StateData)
    assert_type(StateService(MemoryBackend()), StateService)
    assert_type(RedisBackend.from_url("redis://localhost"), RedisBackend)


async def async_api(svc: AsyncStateService) -> None:
    assert_type(await svc.get("u"), dict[str, Any])
    assert_type(await svc.update("u", {"a": 1}), Document)
    assert_type(await svc.claim("u", "m1"), AsyncClaim)
    assert_type(await svc.increment("u", ("a", "b"), 2), int)
    assert_type(await svc.snapshot("u"), Snapshot)
    user = svc.user("u")
    assert_type(user, AsyncCachedUser)
    assert_type(await user.load(), AsyncCachedState)


def auth_api(user: CachedUser) -> None:
    assert_type(get_jwt_token(user), str | None)
    assert_type(read_token("a.b.c"), TokenInfo)
    assert_type(fingerprint("t"), str)
