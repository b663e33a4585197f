"""The backend contract suite (needs pytest); import it from :mod:`chatstate.testing`.

How to subclass :class:`BackendContract` is shown in :mod:`chatstate.testing`'s
docstring and in docs/backends.md ("Writing a backend").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import inspect
import json
import threading
import unicodedata
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import attrs
import pytest

from chatstate.exceptions import (
    ClaimLostError,
    ConflictError,
    CounterError,
    InvalidOpIdError,
    InvalidUserIdError,
    LockTimeoutError,
    OpIdReusedError,
    PreservedFieldError,
    SerializationError,
    StateTooLargeError,
    UsageError,
    UserBusyError,
)
from chatstate.state import (
    INT64_MAX,
    INT64_MIN,
    REMEMBERED_OPS,
    AsyncBackend,
    AsyncDeadlineIndex,
    AsyncStateService,
    Backend,
    DeadlineIndex,
    Replace,
    Snapshot,
    StateData,
    StateService,
    SyncServiceAsAsync,
    stored_size,
)
from chatstate.testing import ServiceTwin
from chatstate.typing import JSONObject

__all__ = ["EDGE_VALUES", "BackendContract"]

T = TypeVar("T")

EDGE_VALUES: list[Any] = [
    0,
    -1,
    2**53,
    2**53 + 1,
    -(2**53) - 1,
    2**63,
    -(2**63) - 1,
    123456789012345,
    0.1 + 0.2,
    5e-324,
    1.7976931348623157e308,
    -0.0,
    1e-7,
    True,
    False,
    None,
    "",
    "a/b",
    'quote " and \\ backslash',
    "\u00e9\u4e2d\U0001f600",
    "\x00\n\t",
    [],
    {},
    [[], {}, [{}]],
    {"a": {"b": {}}},
    [1, "two", 3.0, None, True],
]


def _twin_test(
    body: Callable[[Any, Any], Coroutine[Any, Any, None]],
) -> Callable[[Any, str], None]:
    """Turn ``async def test(self, svc)`` into a sync pytest test run on each twin."""

    def test(self: BackendContract, twin: str) -> None:
        async def main() -> None:
            svc = self.open_service(twin)
            try:
                await body(self, svc)
            finally:
                await svc.aclose()

        asyncio.run(main())

    test.__name__ = body.__name__
    test.__qualname__ = body.__qualname__
    test.__doc__ = body.__doc__
    return test


class BackendContract:
    """The behaviour every chatstate backend must show. Subclass it in a test module."""

    rules = StateData(
        preserved=["jwt_token", "profile.id"], replaced=["cart"], max_bytes=4096, max_depth=8
    )
    ttl: float | None = None
    locking: bool = True
    """Whether the backend holds per-user locks (``lock(user_id, name, lease=, wait=)``)."""
    erasable: bool = True
    """Whether the backend can ``erase`` a user (everything, op ids included)."""
    deadline_index: bool = True
    """Whether the backend keeps the optional deadline index (schedule, unschedule, due)."""
    stores_schema: bool = True
    """Whether the backend stores schema versions (``stores_schema = True``, ``Write.schema``)."""
    listing: bool = True
    """Whether the backend lists its users (``users(prefix)``: a ``Listing`` backend)."""

    def make_backend(self) -> Backend:
        """Return a new sync backend over this test's store (empty when the test starts)."""
        raise NotImplementedError

    def make_async_backend(self) -> AsyncBackend | None:
        """Return a new async backend over this test's store, or ``None`` if there is none.

        Called inside the event loop that runs the test.
        """
        return None

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the backend (TTLs, claims). Sleeps unless overridden.

        A backend with an injectable clock overrides this to move the clock
        instead, so the expiry tests take no time.
        """
        await asyncio.sleep(seconds)

    @pytest.fixture(params=["sync", "async"])
    def twin(self, request: pytest.FixtureRequest) -> str:
        """Which twin a contract test runs on."""
        return str(request.param)

    def open_service(
        self, twin: str, *, ttl: float | None = None, dedupe_window: float = 600
    ) -> ServiceTwin:
        """A service over a fresh backend of the given twin."""
        ttl = ttl if ttl is not None else self.ttl
        if twin == "sync":
            sync = StateService(
                self.make_backend(), self.rules, ttl=ttl, dedupe_window=dedupe_window
            )
            return SyncServiceAsAsync(sync)
        backend = self.make_async_backend()
        if backend is None:
            pytest.skip("this backend has no async twin")
        return AsyncStateService(backend, self.rules, ttl=ttl, dedupe_window=dedupe_window)

    # -- per-user locks (optional) ---------------------------------------------------

    @_twin_test
    async def test_a_lock_excludes_a_second_holder_until_released(self, svc: ServiceTwin) -> None:
        if not self.locking:
            pytest.skip("this backend holds no locks")
        backend: Any = svc.manager.backend
        if isinstance(svc, SyncServiceAsAsync):
            with backend.lock("ana", "refresh", lease=30, wait=1):
                with (
                    pytest.raises(LockTimeoutError),
                    backend.lock("ana", "refresh", lease=30, wait=0.05),
                ):
                    pass
                with backend.lock("ana", "other", lease=30, wait=0.05):
                    pass  # another name of the same user is free
                with backend.lock("bob", "refresh", lease=30, wait=0.05):
                    pass  # the same name of another user is free
            with backend.lock("ana", "refresh", lease=30, wait=0.05):
                pass  # free again
            return
        outer = backend.lock("ana", "refresh", lease=30, wait=1)
        async with outer:
            with pytest.raises(LockTimeoutError):
                async with backend.lock("ana", "refresh", lease=30, wait=0.05):
                    pass
            async with backend.lock("ana", "other", lease=30, wait=0.05):
                pass
            async with backend.lock("bob", "refresh", lease=30, wait=0.05):
                pass
        async with backend.lock("ana", "refresh", lease=30, wait=0.05):
            pass

    @_twin_test
    async def test_a_lock_is_released_when_its_block_raises(self, svc: ServiceTwin) -> None:
        if not self.locking:
            pytest.skip("this backend holds no locks")
        backend: Any = svc.manager.backend
        if isinstance(svc, SyncServiceAsAsync):
            with pytest.raises(KeyError), backend.lock("ana", "x", lease=30, wait=1):
                raise KeyError("boom")
            with backend.lock("ana", "x", lease=30, wait=0.05):
                pass
            return
        with pytest.raises(KeyError):
            async with backend.lock("ana", "x", lease=30, wait=1):
                raise KeyError("boom")
        async with backend.lock("ana", "x", lease=30, wait=0.05):
            pass

    # -- export and erasure ----------------------------------------------------------

    @_twin_test
    async def test_export_redacts_secrets_unless_asked(self, svc: ServiceTwin) -> None:
        await svc.update("ana", {"step": "menu", "api_password": "hunter2"})
        await svc.set_preserved("ana", "jwt_token", "eyJhbGciOi.secret.sig")
        export = await svc.export("ana")
        assert export["chatstate_export"] == 1
        assert (export["user_id"], export["version"], export["secrets"]) == ("ana", 2, "redacted")
        assert export["document"]["step"] == "menu"
        assert "eyJhbGciOi" not in str(export)
        assert "hunter2" not in str(export)
        assert str(export["document"]["jwt_token"]).startswith("<secret")
        full = await svc.export("ana", include_secrets=True)
        assert full["document"]["jwt_token"] == "eyJhbGciOi.secret.sig"  # noqa: S105
        assert full["secrets"] == "included"
        empty = await svc.export("nobody")
        assert (empty["version"], empty["document"]) == (0, {})

    @_twin_test
    async def test_erase_removes_everything_op_ids_included(self, svc: ServiceTwin) -> None:
        if not self.erasable:
            pytest.skip("this backend cannot erase")
        await svc.update_once("ana", {"a": 1}, op_id="m1")
        await svc.update_once("bob", {"b": 1}, op_id="m1")
        assert await svc.erase("ana") == ["document", "operations"]
        assert await svc.get("ana") == {}
        assert (await svc.snapshot("ana")).version == 0
        again = await svc.update_once("ana", {"a": 2}, op_id="m1")  # forgotten: new again
        assert again.status == "applied"
        assert await svc.get("bob") == {"b": 1}, "another user was touched"
        assert (await svc.update_once("bob", {"b": 1}, op_id="m1")).status == "duplicate"
        assert await svc.erase("nobody") == []

    @_twin_test
    async def test_erase_ends_a_claim_and_the_deadline(self, svc: ServiceTwin) -> None:
        if not self.erasable:
            pytest.skip("this backend cannot erase")
        claim = await _maybe(svc.claim("ana", "m1", lease=30))
        backend: Any = svc.manager.backend
        if self.deadline_index:
            await _maybe(backend.schedule("ana", 1_000))
        removed = await svc.erase("ana")
        assert "claim" in removed
        assert ("deadline" in removed) is self.deadline_index
        if self.deadline_index:
            assert await _maybe(backend.due(10**12)) == []
        with pytest.raises(ClaimLostError):
            await _maybe(claim.commit())
        assert await svc.get("ana") == {}

    # -- listing users (optional) ------------------------------------------------

    async def _users(self, svc: ServiceTwin, prefix: str = "") -> list[str]:
        if not self.listing:
            pytest.skip("this backend cannot list its users")
        return [user_id async for user_id in svc.users(prefix)]

    @_twin_test
    async def test_users_lists_live_documents_by_prefix(self, svc: ServiceTwin) -> None:
        odd = ["ana", "anna", "an", "bob", "x*y", "x[1]", "xay", "a b/\u00e9", "a%20b", "{t}"]
        for user_id in odd:
            await svc.update(user_id, {"n": 1})
        await svc.update_once("gone", {"n": 1}, op_id="m1")
        await svc.delete("gone")  # its op ids stay; its document does not
        assert sorted(await self._users(svc)) == sorted(odd)
        assert sorted(await self._users(svc, "an")) == ["an", "ana", "anna"]
        assert sorted(await self._users(svc, "x*")) == ["x*y"]
        assert sorted(await self._users(svc, "x[")) == ["x[1]"]
        assert sorted(await self._users(svc, "a ")) == ["a b/\u00e9"]
        assert sorted(await self._users(svc, "a%")) == ["a%20b"]
        assert sorted(await self._users(svc, "{")) == ["{t}"]
        assert await self._users(svc, "anna!") == []
        assert await self._users(svc, "gone") == []
        with pytest.raises(UsageError, match="prefix"):
            await self._users(svc, cast("str", 7))

    @_twin_test
    async def test_users_lists_every_user_of_a_large_store_once(self, svc: ServiceTwin) -> None:
        everyone = {f"u{n:05d}" for n in range(1_234)}
        for user_id in everyone:
            await svc.update(user_id, {"n": 1})
        listed = await self._users(svc)
        assert set(listed) == everyone
        assert len(listed) == len(everyone), "a user was listed twice on a store nobody wrote"
        assert len(await self._users(svc, "u001")) == 100

    # -- the deadline index (optional) -------------------------------------------

    def _index(self, svc: ServiceTwin) -> Any:
        backend = svc.manager.backend
        if not self.deadline_index:
            pytest.skip("this backend keeps no deadline index")
        assert isinstance(backend, DeadlineIndex | AsyncDeadlineIndex), (
            "the backend is not a DeadlineIndex (schedule, unschedule, due)"
        )
        return backend

    @_twin_test
    async def test_deadlines_come_due_in_order_and_stay_until_removed(
        self, svc: ServiceTwin
    ) -> None:
        index = self._index(svc)
        assert await _maybe(index.due(10**12)) == []
        await _maybe(index.schedule("b", 2_000))
        await _maybe(index.schedule("a", 1_000))
        await _maybe(index.schedule("c", 3_000))
        assert await _maybe(index.due(999)) == []
        assert await _maybe(index.due(2_000)) == [("a", 1_000), ("b", 2_000)]
        assert await _maybe(index.due(2_000)) == [("a", 1_000), ("b", 2_000)], "due removed"
        assert await _maybe(index.due(10_000, 2)) == [("a", 1_000), ("b", 2_000)]
        await _maybe(index.unschedule("a"))
        await _maybe(index.unschedule("nobody"))
        assert await _maybe(index.due(10_000)) == [("b", 2_000), ("c", 3_000)]

    @_twin_test
    async def test_a_deadline_moves_only_earlier_unless_exact(self, svc: ServiceTwin) -> None:
        index = self._index(svc)
        await _maybe(index.schedule("ana", 5_000))
        await _maybe(index.schedule("ana", 9_000))  # earlier_only: stays at 5,000
        assert await _maybe(index.due(10_000)) == [("ana", 5_000)]
        await _maybe(index.schedule("ana", 4_000))
        assert await _maybe(index.due(10_000)) == [("ana", 4_000)]
        await _maybe(index.schedule("ana", 8_000, earlier_only=False))
        assert await _maybe(index.due(7_999)) == []
        assert await _maybe(index.due(8_000)) == [("ana", 8_000)]

    @_twin_test
    async def test_the_deadline_index_holds_any_user_id(self, svc: ServiceTwin) -> None:
        index = self._index(svc)
        ids = ["+34 600", "\u00e9\u4e2d\U0001f600", "a{b}c", "x:y", "%41"]
        for n, user_id in enumerate(ids):
            await _maybe(index.schedule(user_id, 1_000 + n))
        assert await _maybe(index.due(2_000)) == [(u, 1_000 + n) for n, u in enumerate(ids)]
        assert await _maybe(svc.get(ids[0])) == {}, "the index wrote a document"

    @_twin_test
    async def test_the_deadline_index_refuses_bad_times(self, svc: ServiceTwin) -> None:
        index = self._index(svc)
        for bad in (1.5, "10", True, 2**60):
            with pytest.raises(UsageError):
                await _maybe(index.schedule("ana", bad))
        with pytest.raises(UsageError):
            await _maybe(index.due(1_000, 0))
        assert await _maybe(index.due(2**53)) == []

    # -- reading -------------------------------------------------------------

    @_twin_test
    async def test_unknown_user_reads_empty_and_creates_nothing(self, svc: ServiceTwin) -> None:
        """A read of an unknown user gives {} at version 0 and stores nothing."""
        assert await svc.get("nobody") == {}
        assert await svc.snapshot("nobody") == Snapshot({}, 0)
        assert await svc.snapshot("nobody") == Snapshot({}, 0)

    @_twin_test
    async def test_returned_documents_are_copies(self, svc: ServiceTwin) -> None:
        """Changing a returned document or a patch afterwards changes nothing stored."""
        patch: JSONObject = {"a": {"list": [1, 2]}}
        got = await svc.update("u", patch)
        got["a"]["list"].append(3)
        patch["a"]["list"].append(4)
        read = await svc.get("u")
        read["a"]["new"] = 1
        assert await svc.get("u") == {"a": {"list": [1, 2]}}

    # -- merging ---------------------------------------------------------------

    @_twin_test
    async def test_update_follows_json_merge_patch(self, svc: ServiceTwin) -> None:
        """Objects merge, None deletes, lists and scalars replace (RFC 7396)."""
        await svc.update("u", {"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {"f": 1}})
        got = await svc.update("u", {"a": {"c": [3], "g": {}}, "d": None, "e": 5})
        assert got == {"a": {"b": 1, "c": [3], "g": {}}, "e": 5}
        got = await svc.update("u", {"e": {"h": None, "i": 1}, "a": {"b": None}})
        assert got == {"a": {"c": [3], "g": {}}, "e": {"i": 1}}
        assert await svc.get("u") == got

    @_twin_test
    async def test_a_writes_document_is_a_dict_json_takes(self, svc: ServiceTwin) -> None:
        """``update()``'s document serializes as ``get()``'s does, and cannot be changed."""
        patch = {"a": {"b": [1, 2.5, None, True]}, "s": "\u00e9\n", "n": -(2**63)}
        writes: list[Callable[[], Coroutine[Any, Any, Any]]] = [
            lambda: svc.update("u", patch),
            lambda: svc.assign("u", {"z": 0}),
        ]
        for write in writes:
            doc = await write()
            assert isinstance(doc, dict)
            assert json.dumps(doc, sort_keys=True) == json.dumps(await svc.get("u"), sort_keys=True)
        doc = await svc.update("u", {"z": 1})
        assert json.loads(json.dumps(doc)) == {**patch, "z": 1}  # the C encoder, never read before
        with pytest.raises(TypeError, match="read-only"):
            doc["z"] = 2
        assert await svc.get("u") == {**patch, "z": 1}

    @_twin_test
    async def test_every_write_bumps_the_version_by_one(self, svc: ServiceTwin) -> None:
        """Versions go 1, 2, 3, ... with every write, resets included."""
        for expected in range(1, 6):
            await svc.update("u", {"n": expected})
            assert (await svc.snapshot("u")).version == expected
        await svc.reset("u")
        assert (await svc.snapshot("u")).version == 6

    @_twin_test
    async def test_edge_values_round_trip_exactly(self, svc: ServiceTwin) -> None:
        """Big ints, float extremes, -0.0, unicode, '/', empty containers come back as stored."""
        doc = {f"k{i}": v for i, v in enumerate(EDGE_VALUES) if v is not None}
        doc["nested"] = {"deep": dict(doc)}
        got = await svc.update("u", doc)
        assert got == doc
        read = await svc.get("u")
        assert read == doc
        assert repr(read["k11"]) == "-0.0"
        assert type(read["k5"]) is int
        assert type(read["k10"]) is float

    @_twin_test
    async def test_unicode_keys_and_odd_keys_round_trip(self, svc: ServiceTwin) -> None:
        """Keys with quotes, backslashes, dots, empty strings and emoji are kept apart."""
        doc = {"": 1, '"': 2, "\\": 3, "a.b": 4, "a": {"b": 5}, "\U0001f600": {"": {"x": 6}}}
        assert await svc.update("u", doc) == doc
        assert await svc.update("u", {"a": {"b": None}, "": None}) == {
            '"': 2,
            "\\": 3,
            "a.b": 4,
            "a": {},
            "\U0001f600": {"": {"x": 6}},
        }

    @_twin_test
    async def test_replaced_fields_take_objects_whole(self, svc: ServiceTwin) -> None:
        """A field declared replaced is overwritten, not merged, and None inside is dropped."""
        await svc.update("u", {"cart": {"apples": 2, "pears": 1}})
        got = await svc.update("u", {"cart": {"plums": 3, "figs": None}})
        assert got == {"cart": {"plums": 3}}

    # -- preserved fields -----------------------------------------------------

    @_twin_test
    async def test_preserved_fields_survive_reset_and_refuse_patches(
        self, svc: ServiceTwin
    ) -> None:
        """Preserved fields change only through set_preserved and survive reset."""
        await svc.set_preserved("u", "jwt_token", "secret-token")
        await svc.set_preserved("u", "profile.id", 42)
        await svc.update("u", {"profile": {"name": "Ann"}, "step": "menu"})
        before = await svc.snapshot("u")
        for patch in (
            {"jwt_token": "other"},
            {"jwt_token": None},
            {"profile": None},
            {"profile": "flat"},
            {"profile": {"id": 7}},
        ):
            with pytest.raises(PreservedFieldError) as info:
                await svc.update("u", patch)
            assert "secret-token" not in str(info.value)
        assert await svc.snapshot("u") == before
        after = await svc.reset("u")
        assert after == {"jwt_token": "secret-token", "profile": {"id": 42}}
        await svc.set_preserved("u", "jwt_token", None)
        assert await svc.get("u") == {"profile": {"id": 42}}

    @_twin_test
    async def test_set_preserved_refuses_undeclared_fields(self, svc: ServiceTwin) -> None:
        """set_preserved only writes fields the rules declare preserved."""
        with pytest.raises(PreservedFieldError):
            await svc.set_preserved("u", "step", 1)
        assert await svc.snapshot("u") == Snapshot({}, 0)

    @_twin_test
    async def test_reset_of_unset_preserved_leaves_nothing(self, svc: ServiceTwin) -> None:
        """Reset keeps no empty parents for preserved fields that were never set."""
        await svc.update("u", {"profile": {"name": "Ann"}, "step": 1})
        assert await svc.reset("u") == {}

    # -- refusals leave everything as it was ----------------------------------

    @_twin_test
    async def test_bad_values_are_refused_and_nothing_is_written(self, svc: ServiceTwin) -> None:
        """Non-JSON values raise SerializationError naming the path; state is unchanged."""
        await svc.update("u", {"keep": 1})
        before = await svc.snapshot("u")
        bad_values: list[Any] = [
            {1, 2},
            b"x",
            float("nan"),
            float("inf"),
            "\ud800",
            (1, 2),
            dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            decimal.Decimal("1.5"),
            object(),
        ]
        for bad in bad_values:
            with pytest.raises(SerializationError) as info:
                await svc.update("u", {"ok": 1, "deep": {"list": [0, bad]}})
            assert info.value.path == "$.deep.list[1]"
            assert str(info.value).startswith("Failed to update state")
        with pytest.raises(SerializationError):
            await svc.update("u", {1: "int key"})  # type: ignore[dict-item]
        with pytest.raises(SerializationError):
            await svc.update("u", ["not", "an", "object"])  # type: ignore[arg-type]
        deep: Any = 1
        for _ in range(self.rules.max_depth + 1):
            deep = {"d": deep}
        with pytest.raises(SerializationError):
            await svc.update("u", deep)
        assert await svc.snapshot("u") == before

    @_twin_test
    async def test_size_limit_is_enforced_without_writing(self, svc: ServiceTwin) -> None:
        """A write past max_bytes raises StateTooLargeError and leaves the document."""
        await svc.update("u", {"a": "x" * 100})
        before = await svc.snapshot("u")
        with pytest.raises(StateTooLargeError) as info:
            await svc.update("u", {"b": "y" * self.rules.max_bytes})
        assert info.value.limit == self.rules.max_bytes
        assert await svc.snapshot("u") == before

    @_twin_test
    async def test_bad_user_ids_are_refused(self, svc: ServiceTwin) -> None:
        """Empty, non-str, too long and invalid unicode ids raise InvalidUserIdError."""
        for bad in ("", 5, None, "x" * (self.rules.max_user_id_length + 1), "\udc00"):
            with pytest.raises(InvalidUserIdError):
                await svc.update(bad, {"a": 1})  # type: ignore[arg-type]

    # -- users are kept apart -------------------------------------------------

    @_twin_test
    async def test_users_never_see_each_other(self, svc: ServiceTwin) -> None:
        """Ids that differ only in separators, braces or globs are distinct users."""
        ids = ["a", "a:b", "a:{b}", "{a}:b", "a*", "a?", "a[b]", "a\nb", "a b", "a%3Ab", "x" * 200]
        for i, uid in enumerate(ids):
            await svc.update(uid, {"i": i})
        for i, uid in enumerate(ids):
            assert await svc.get(uid) == {"i": i}

    @_twin_test
    async def test_canonically_equal_ids_name_one_user(self, svc: ServiceTwin) -> None:
        """An id in NFD and the same id in NFC reach the same document."""
        nfc = unicodedata.normalize("NFC", "Jos\u00e9")
        nfd = unicodedata.normalize("NFD", nfc)
        await svc.update(nfd, {"n": 1})
        assert await svc.get(nfc) == {"n": 1}

    # -- delete ---------------------------------------------------------------

    @_twin_test
    async def test_delete_removes_everything(self, svc: ServiceTwin) -> None:
        """Delete drops the document, preserved fields included; the version restarts."""
        await svc.set_preserved("u", "jwt_token", "t")
        await svc.update("u", {"a": 1})
        await svc.delete("u")
        assert await svc.snapshot("u") == Snapshot({}, 0)
        await svc.update("u", {"b": 2})
        assert await svc.snapshot("u") == Snapshot({"b": 2}, 1)

    # -- idempotency ----------------------------------------------------------

    @_twin_test
    async def test_repeated_op_id_is_applied_once(self, svc: ServiceTwin) -> None:
        """A write repeated with the same op_id is a duplicate; another request is refused."""
        first = await svc.update_once("u", {"n": 1}, op_id="wamid.1")
        assert first.status == "applied"
        second = await svc.update_once("u", {"n": 1}, op_id="wamid.1")
        assert second.status == "duplicate"
        assert second.snapshot == Snapshot({"n": 1}, 1)
        assert second.version == 1
        assert not second.applied
        with pytest.raises(OpIdReusedError) as info:
            await svc.update_once("u", {"n": 2}, op_id="wamid.1")
        assert info.value.op_id == "wamid.1"
        other = await svc.update_once("other-user", {"n": 3}, op_id="wamid.1")
        assert other.status == "applied"
        for bad in ("", "line\nbreak", "x" * 201):
            with pytest.raises(InvalidOpIdError):
                await svc.update_once("u", {"n": 4}, op_id=bad)
        assert await svc.snapshot("u") == Snapshot({"n": 1}, 1)

    @_twin_test
    async def test_a_duplicate_reports_the_version_it_produced(self, svc: ServiceTwin) -> None:
        """A duplicate's version is the one its first application made, not the current one."""
        await svc.update_once("u", {"a": 1}, op_id="first")
        await svc.update("u", {"b": 2})
        await svc.update("u", {"c": 3})
        again = await svc.update_once("u", {"a": 1}, op_id="first")
        assert again.status == "duplicate"
        assert again.version == 1
        assert again.snapshot.version == 3
        assert again.snapshot.data == {"a": 1, "b": 2, "c": 3}

    @_twin_test
    async def test_a_resent_write_of_the_same_call_counts_as_applied(
        self, svc: ServiceTwin
    ) -> None:
        """The same Write sent twice (a lost reply) is applied once and both answers say so."""
        write = svc.manager.update_write({"n": 1}, "wamid.lost")
        backend = svc.manager.backend
        first = await _maybe(backend.apply("u", write))
        again = await _maybe(backend.apply("u", write))
        assert (first.status, again.status) == ("applied", "applied")
        assert again.version == first.version == 1
        assert (await svc.snapshot("u")).version == 1
        # Another call with the same op_id (another nonce) is a duplicate.
        other = await svc.update_once("u", {"n": 1}, op_id="wamid.lost")
        assert other.status == "duplicate"

    @_twin_test
    async def test_op_ids_outlive_a_delete(self, svc: ServiceTwin) -> None:
        """After delete, a redelivered op_id is still recognised and recreates nothing."""
        await svc.update_once("u", {"a": 1}, op_id="m1")
        await svc.delete("u", op_id="m2")
        again = await svc.update_once("u", {"a": 1}, op_id="m1")
        assert again.status == "duplicate"
        assert await svc.snapshot("u") == Snapshot({}, 0)
        fresh = await svc.update_once("u", {"a": 1}, op_id="m3")
        assert fresh.applied
        assert fresh.version == 1

    @_twin_test
    async def test_the_newest_op_ids_are_remembered_and_the_log_is_capped(
        self, svc: ServiceTwin
    ) -> None:
        """The newest REMEMBERED_OPS ids stay duplicates; old ones are forgotten at last."""
        total = 3 * REMEMBERED_OPS
        for i in range(total):
            await svc.update_once("u", {"i": i}, op_id=f"id-{i}")
        for i in range(total - REMEMBERED_OPS, total):
            assert (await svc.update_once("u", {"i": i}, op_id=f"id-{i}")).status == "duplicate"
        assert (await svc.snapshot("u")).version == total
        forgotten = await svc.update_once("u", {"i": 0}, op_id="id-0")
        assert forgotten.applied, "the log must be trimmed (it may not keep every id forever)"

    @_twin_test
    async def test_an_empty_patch_only_records_its_op_id(self, svc: ServiceTwin) -> None:
        """update({}) creates nothing and bumps no version, but its op_id is remembered."""
        out = await svc.update_once("u", {}, op_id="noop")
        assert out.applied
        assert await svc.snapshot("u") == Snapshot({}, 0)
        assert (await svc.update_once("u", {}, op_id="noop")).status == "duplicate"

    @_twin_test
    async def test_conditional_update_applies_only_at_the_expected_version(
        self, svc: ServiceTwin
    ) -> None:
        """update_once(if_version=v) writes at version v and reports a conflict otherwise."""
        first = await svc.update_once("u", {"step": 1}, op_id=None, if_version=0)
        assert first.status == "applied"
        stale = await svc.update_once("u", {"step": 9}, op_id=None, if_version=0)
        assert stale.status == "conflict"
        assert stale.snapshot == Snapshot({"step": 1}, 1)
        second = await svc.update_once("u", {"step": 2}, op_id=None, if_version=1)
        assert second.status == "applied"
        assert await svc.snapshot("u") == Snapshot({"step": 2}, 2)

    # -- counters and exact assignment ----------------------------------------

    @_twin_test
    async def test_increment_counts_exactly_over_the_int64_range(self, svc: ServiceTwin) -> None:
        """increment() starts at 0, creates parents, and is exact to the int64 limits."""
        assert await svc.increment("u", "stats.visits") == 1
        assert await svc.increment("u", ("stats", "visits"), 41) == 42
        assert await svc.get("u") == {"stats": {"visits": 42}}
        assert await svc.increment("u", "big", INT64_MAX) == INT64_MAX
        assert await svc.increment("u", "small", INT64_MIN) == INT64_MIN
        assert await svc.increment("u", "big", -1) == INT64_MAX - 1
        got = await svc.get("u")
        assert got["big"] == INT64_MAX - 1
        assert type(got["big"]) is int
        assert (await svc.snapshot("u")).version == 5

    @_twin_test
    async def test_increment_refuses_non_integers_and_overflow(self, svc: ServiceTwin) -> None:
        """A non-integer, a non-object parent or an overflow is a CounterError; nothing changes."""
        await svc.update("u", {"f": 1.5, "s": "3", "b": True, "o": {}, "l": [1], "leaf": 7})
        await svc.increment("u", "max", INT64_MAX)
        before = await svc.snapshot("u")
        for path in ("f", "s", "b", "o", "l", "leaf.x", "s.x"):
            with pytest.raises(CounterError) as info:
                await svc.increment("u", path)
            assert info.value.reason == "not_integer"
        with pytest.raises(CounterError) as info:
            await svc.increment("u", "max")
        assert info.value.reason == "overflow"
        with pytest.raises(CounterError):
            await svc.increment("u", "new", INT64_MIN - 1)
        with pytest.raises(CounterError):
            await svc.increment("u", "min", 2**63)  # beyond int64 even where the sum is not
        with pytest.raises(PreservedFieldError):
            await svc.increment("u", "jwt_token")
        with pytest.raises(PreservedFieldError):
            await svc.increment("u", "profile")
        assert await svc.snapshot("u") == before

    @_twin_test
    async def test_increment_with_an_op_id_counts_once(self, svc: ServiceTwin) -> None:
        """A redelivered increment changes nothing and returns the current value."""
        assert await svc.increment("u", "n", 5, op_id="m1") == 5
        assert await svc.increment("u", "n", 5, op_id="m1") == 5
        assert await svc.increment("u", "n", 1) == 6
        assert await svc.increment("u", "n", 5, op_id="m1") == 6
        assert (await svc.snapshot("u")).version == 2

    @_twin_test
    async def test_increment_keeps_the_size_limit(self, svc: ServiceTwin) -> None:
        """A counter that grows past max_bytes is refused like any write."""
        filler = self.rules.max_bytes - len('"pad"') - 2 - len('"n"') - 1
        await svc.update("u", {"pad": "x" * filler, "n": 1})
        assert stored_size(await svc.get("u")) == self.rules.max_bytes
        before = await svc.snapshot("u")
        with pytest.raises(StateTooLargeError):
            await svc.increment("u", "n", 10)
        assert await svc.snapshot("u") == before
        assert await svc.increment("u", "n", 1) == 2

    @_twin_test
    async def test_assign_sets_exact_values(self, svc: ServiceTwin) -> None:
        """assign() replaces objects whole, stores None, creates parents, keeps the rest."""
        await svc.update("u", {"form": {"a": 1, "b": 2}, "keep": 1})
        got = await svc.assign("u", {"form": {"c": 3}, ("meta", "seen"): None, "a.b": [1]})
        expected = {"form": {"c": 3}, "keep": 1, "meta": {"seen": None}, "a.b": [1]}
        assert got == expected
        assert await svc.get("u") == expected
        await svc.set_preserved("u", "profile.id", 1)
        bad: dict[Any, Any]
        for bad in ({"jwt_token": "x"}, {"profile": {}}, {("profile", "id"): 2}):
            with pytest.raises(PreservedFieldError):
                await svc.assign("u", bad)
        assert (await svc.get("u"))["profile"] == {"id": 1}

    # -- size bookkeeping -------------------------------------------------------

    @_twin_test
    async def test_the_size_limit_is_exact_after_many_writes(self, svc: ServiceTwin) -> None:
        """After updates, deletes and replacements the backend's size is the true size."""
        await svc.update("u", {"a": {"b": "x" * 50, "c": [1, 2]}, "d": "y" * 30})
        await svc.update("u", {"a": {"b": None, "e": {"f": "z" * 20}}, "d": None, "g": 1})
        await svc.update("u", {"cart": {"p": "q" * 40}})
        await svc.update("u", {"cart": {"r": 1}})
        await svc.update("u", {"a": None, "h": "w" * 10})
        size = stored_size(await svc.get("u"))
        room = self.rules.max_bytes - size - len('"pad"') - 2
        await svc.update("u", {"pad": "p" * room})
        assert stored_size(await svc.get("u")) == self.rules.max_bytes
        with pytest.raises(StateTooLargeError):
            await svc.update("u", {"pad": "p" * (room + 1)})

    # -- claims -------------------------------------------------------------------

    @_twin_test
    async def test_a_claim_commits_its_changes_once(self, svc: ServiceTwin) -> None:
        """A claim reads, stages changes, commits them with its op_id; a repeat is a duplicate."""
        await svc.update("u", {"n": 1})
        claim = await svc.claim("u", "msg-1", wait=0)
        assert not claim.duplicate
        assert claim.data == {"n": 1}
        claim.update({"n": 2})
        claim.set_preserved("jwt_token", "tok")
        out = await claim.commit()
        assert out.applied
        assert await svc.snapshot("u") == Snapshot({"n": 2, "jwt_token": "tok"}, 2)
        again = await svc.claim("u", "msg-1", wait=0)
        assert again.duplicate
        # A message that changes nothing is remembered all the same.
        quiet = await svc.claim("u", "msg-2", wait=0)
        await quiet.commit()
        assert (await svc.claim("u", "msg-2", wait=0)).duplicate
        assert (await svc.snapshot("u")).version == 2

    @_twin_test
    async def test_a_held_claim_makes_other_messages_wait(self, svc: ServiceTwin) -> None:
        """While a claim is held, another message and another copy of the same one wait."""
        first = await svc.claim("u", "a", wait=0)
        with pytest.raises(UserBusyError):
            await svc.claim("u", "a", wait=0)  # the first copy may yet fail: wait for it
        with pytest.raises(UserBusyError) as info:
            await svc.claim("u", "b", wait=0.05)
        assert 0 < info.value.retry_after <= 30
        await first.release()
        second = await svc.claim("u", "b", wait=0)
        assert not second.duplicate
        await second.commit()
        held = await svc.claim("u", "c", wait=0)
        await held.commit()
        assert (await svc.claim("u", "c", wait=0)).duplicate  # committed: a duplicate at once
        # A released message was not remembered: it can be handled again.
        third = await svc.claim("u", "a", wait=0)
        assert not third.duplicate
        await third.release()

    @_twin_test
    async def test_a_lapsed_claim_loses_to_the_next(self, svc: ServiceTwin) -> None:
        """A claim past its lease can be taken over; the old holder's commit writes nothing."""
        stale = await svc.claim("u", "slow", lease=0.05, wait=0, heartbeat=False)
        stale.update({"by": "stale"})
        await self.advance(0.1)
        # The same message, redelivered after the lease ran out, is handled again...
        fresh = await svc.claim("u", "slow", wait=0)
        assert not fresh.duplicate
        fresh.update({"by": "fresh"})
        await fresh.commit()
        # ...and the stale handler's commit finds it handled: nothing is written.
        late = await stale.commit()
        assert late.status == "duplicate"
        assert await svc.get("u") == {"by": "fresh"}
        # A stale claim whose user another message took over cannot commit at all.
        slow = await svc.claim("u", "m1", lease=0.05, wait=0, heartbeat=False)
        slow.update({"by": "slow"})
        await self.advance(0.1)
        other = await svc.claim("u", "m2", wait=0)
        with pytest.raises(ClaimLostError):
            await slow.commit()
        await other.commit()
        assert await svc.get("u") == {"by": "fresh"}

    @_twin_test
    async def test_staged_changes_are_sized_as_the_result(self, svc: ServiceTwin) -> None:
        """Staged updates are sized as their result: overwritten and deleted values do not count."""
        big = self.rules.max_bytes // 2
        claim = await svc.claim("u", "m", wait=0)
        claim.update({"a": "x" * big})
        claim.update({"a": "y" * big})  # replaces the first: the result holds one
        claim.update({"b": {"c": "z" * big}})
        claim.update({"b": None})  # and this one goes away again
        await claim.commit()
        assert await svc.get("u") == {"a": "y" * big}

    @_twin_test
    async def test_a_refused_commit_releases_the_claim(self, svc: ServiceTwin) -> None:
        """A commit refused as too large writes nothing and frees the user at once."""
        claim = await svc.claim("u", "m1", wait=0)
        claim.update({"a": "x" * (self.rules.max_bytes + 1)})
        with pytest.raises(StateTooLargeError):
            await claim.commit()
        again = await svc.claim("u", "m1", wait=0)  # not busy, not a duplicate
        assert not again.duplicate
        await again.release()
        assert await svc.snapshot("u") == Snapshot({}, 0)

    def test_a_lapsed_claim_that_nobody_took_cannot_commit(self, twin: str) -> None:
        """Past its lease a claim is lost even if no one else claimed the user."""

        async def main() -> None:
            svc = self.open_service(twin)
            try:
                claim = await svc.claim("u", "slow", lease=0.05, wait=0, heartbeat=False)
                claim.update({"late": True})
                await self.advance(0.1)
                with pytest.raises(ClaimLostError):
                    await claim.commit()
                assert await svc.get("u") == {}
            finally:
                await svc.aclose()

        asyncio.run(main())

    def test_a_claim_outlives_a_shorter_dedupe_window(self, twin: str) -> None:
        """A held claim stays held while the op ids around it expire."""

        async def main() -> None:
            svc = self.open_service(twin, dedupe_window=0.2)
            try:
                first = await svc.claim("u", "a", lease=30, wait=0)
                await svc.update("u", {"n": 1})
                await self.advance(0.5)
                with pytest.raises(UserBusyError):
                    await svc.claim("u", "b", wait=0)
                await first.commit()
            finally:
                await svc.aclose()

        asyncio.run(main())

    @_twin_test
    async def test_a_renewed_claim_outlives_its_first_lease(self, svc: ServiceTwin) -> None:
        """renew() moves the lease's end: the user stays held past the first lease."""
        claim = await svc.claim("u", "slow", lease=0.4, wait=0, heartbeat=False)
        await self.advance(0.25)
        assert await claim.renew() is True
        await self.advance(0.25)  # 0.5 s after the claim, 0.25 s after the renewal
        with pytest.raises(UserBusyError):
            await svc.claim("u", "other", wait=0)
        claim.update({"done": True})
        assert (await claim.commit()).applied
        assert await svc.get("u") == {"done": True}

    @_twin_test
    async def test_a_renewal_never_takes_a_claim_back(self, svc: ServiceTwin) -> None:
        """A lapsed claim is not renewed, even when nobody took the user: it stays free."""
        claim = await svc.claim("u", "slow", lease=0.05, wait=0, heartbeat=False)
        await self.advance(0.1)
        assert await claim.renew() is False
        other = await svc.claim("u", "next", wait=0)  # free: the renewal took nothing
        assert not other.duplicate
        await other.release()
        assert await other.renew() is False  # released: nothing to renew, nothing taken
        with pytest.raises(ClaimLostError):
            await claim.commit()

    @_twin_test
    async def test_a_kept_commit_holds_the_user_until_the_second(self, svc: ServiceTwin) -> None:
        """commit(keep=True) stores and remembers the message, and the user stays held."""
        claim = await svc.claim("u", "m1", wait=0)
        claim.update({"step": 2, "outbox": {"k": ["hello"]}})
        assert (await claim.commit(keep=True)).applied
        assert claim.open
        assert await svc.get("u") == {"step": 2, "outbox": {"k": ["hello"]}}
        assert (await svc.claim("u", "m1", wait=0)).duplicate  # remembered already
        with pytest.raises(UserBusyError):
            await svc.claim("u", "m2", wait=0)  # still held
        assert await claim.renew() is True  # a kept claim is renewed like any other
        claim.update({"outbox": {"k": None}})
        assert (await claim.commit()).applied  # under a key of its own: not a duplicate
        assert claim.status == "claimed"
        assert not getattr(claim, "open")  # noqa: B009 - mypy narrowed it to True above
        assert await svc.get("u") == {"step": 2, "outbox": {}}
        after = await svc.claim("u", "m2", wait=0)  # free again
        assert not after.duplicate
        await after.release()
        assert (await svc.claim("u", "m1", wait=0)).duplicate

    @_twin_test
    async def test_a_kept_claim_can_be_released(self, svc: ServiceTwin) -> None:
        """release() after commit(keep=True) frees the user and keeps what was committed."""
        claim = await svc.claim("u", "m1", wait=0)
        claim.update({"n": 1})
        await claim.commit(keep=True)
        await claim.release()
        assert not claim.open
        free = await svc.claim("u", "m2", wait=0)
        assert not free.duplicate
        await free.release()
        assert await svc.get("u") == {"n": 1}
        assert (await svc.claim("u", "m1", wait=0)).duplicate

    # -- transactions -----------------------------------------------------------

    @_twin_test
    async def test_transaction_applies_a_python_function(self, svc: ServiceTwin) -> None:
        """transaction() stores what the function returns, or what it changed in place."""
        await svc.update("u", {"balance": 10})

        def spend(doc: JSONObject) -> JSONObject:
            return {**doc, "balance": doc["balance"] - 3, "last": "spend"}

        assert await svc.transaction("u", spend) == {"balance": 7, "last": "spend"}

        def in_place(doc: JSONObject) -> None:
            doc["balance"] += 1

        assert await svc.transaction("u", in_place) == {"balance": 8, "last": "spend"}
        assert (await svc.snapshot("u")).version == 3

    @_twin_test
    async def test_transaction_retries_when_the_document_changed(self, svc: ServiceTwin) -> None:
        """A write between the read and the compare-and-set makes the function run again."""
        await svc.update("u", {"n": 0})
        calls: list[int] = []
        other = self.open_service("sync")

        def bump(doc: JSONObject) -> JSONObject:
            calls.append(doc["n"])
            if len(calls) == 1:
                # Another writer sneaks in after our read.
                _run_sync_in_thread(lambda: _sync_update(other, "u", {"n": 100}))
            return {"n": doc["n"] + 1}

        assert await svc.transaction("u", bump) == {"n": 101}
        assert calls == [0, 100]
        await other.aclose()

    @_twin_test
    async def test_transaction_gives_up_with_conflict_error(self, svc: ServiceTwin) -> None:
        """A function that always loses its race ends in ConflictError after max_attempts."""
        await svc.update("u", {"n": 0})
        other = self.open_service("sync")

        def always_raced(doc: JSONObject) -> JSONObject:
            _run_sync_in_thread(lambda: _sync_update(other, "u", {"n": doc["n"] + 10}))
            return {"n": -1}

        with pytest.raises(ConflictError) as info:
            await svc.transaction("u", always_raced, max_attempts=3)
        assert info.value.attempts == 3
        assert (await svc.get("u"))["n"] == 30
        await other.aclose()

    @_twin_test
    async def test_transaction_cannot_change_preserved_fields(self, svc: ServiceTwin) -> None:
        """A transaction that changes or drops a preserved field is refused."""
        await svc.set_preserved("u", "jwt_token", "t")
        with pytest.raises(PreservedFieldError):
            await svc.transaction("u", lambda _doc: {"jwt_token": "changed"})
        with pytest.raises(PreservedFieldError):
            await svc.transaction("u", lambda _doc: {})
        assert await svc.get("u") == {"jwt_token": "t"}

    # -- expiry ---------------------------------------------------------------

    def test_ttl_expires_documents(self, twin: str) -> None:
        """A document expires ttl after its last write; every write extends it."""

        async def main() -> None:
            svc = self.open_service(twin, ttl=0.6)
            try:
                await svc.update("u", {"a": 1})
                await self.advance(0.35)
                await svc.update("u", {"b": 2})
                await self.advance(0.35)  # 0.7 s after the first write, 0.35 s after the last
                assert await svc.get("u") == {"a": 1, "b": 2}
                await self.advance(0.4)
                assert await svc.snapshot("u") == Snapshot({}, 0)
            finally:
                await svc.aclose()

        asyncio.run(main())

    def test_users_leaves_out_expired_documents(self, twin: str) -> None:
        """An expired document's user is not listed, though its op ids are remembered."""

        async def main() -> None:
            svc = self.open_service(twin, ttl=0.6)
            try:
                await svc.update_once("old", {"a": 1}, op_id="m1")
                await self.advance(0.4)
                await svc.update("new", {"a": 1})
                await self.advance(0.4)
                assert await self._users(svc) == ["new"]
            finally:
                await svc.aclose()

        asyncio.run(main())

    def test_op_ids_outlive_an_expired_document(self, twin: str) -> None:
        """With ttl shorter than dedupe_window, ids of an expired document stay remembered."""

        async def main() -> None:
            svc = self.open_service(twin, ttl=0.3)
            try:
                for i in range(32):
                    await svc.update_once("u", {"i": i}, op_id=f"m{i}")
                await self.advance(0.5)
                assert await svc.snapshot("u") == Snapshot({}, 0)
                for i in range(32):
                    again = await svc.update_once("u", {"i": i}, op_id=f"m{i}")
                    assert again.status == "duplicate", i
                assert await svc.snapshot("u") == Snapshot({}, 0)
            finally:
                await svc.aclose()

        asyncio.run(main())

    # -- schema versions (optional) -------------------------------------------------

    def _schema_write(self, svc: ServiceTwin, schema: int | None, **kwargs: Any) -> Any:
        if not self.stores_schema:
            pytest.skip("this backend does not store schema versions")
        write = svc.manager.update_write(kwargs.pop("patch", {"n": 1}), kwargs.pop("op_id", None))
        write.schema = schema
        return write

    @_twin_test
    async def test_a_created_document_stores_the_writes_schema(self, svc: ServiceTwin) -> None:
        """A write that creates a document stores its schema; one without a schema keeps it."""
        backend = svc.manager.backend
        created = await _maybe(backend.apply("u", self._schema_write(svc, 3)))
        assert (created.status, created.snapshot.schema) == ("applied", 3)
        assert (await _maybe(backend.load("u"))).schema == 3
        await _maybe(backend.apply("u", self._schema_write(svc, None, patch={"m": 2})))
        loaded = await _maybe(backend.load("u"))
        assert (loaded.schema, loaded.version, loaded.data) == (3, 2, {"n": 1, "m": 2})
        await _maybe(backend.apply("plain", self._schema_write(svc, None)))
        assert (await _maybe(backend.load("plain"))).schema == 1

    @_twin_test
    async def test_a_write_to_an_older_schema_is_refused_and_not_remembered(
        self, svc: ServiceTwin
    ) -> None:
        """A write of a newer schema finds an older document: nothing written, op id kept free."""
        backend = svc.manager.backend
        await _maybe(backend.apply("u", self._schema_write(svc, None, patch={"old": 1})))
        write = self._schema_write(svc, 2, patch={"new": 1}, op_id="wamid.s1")
        refused = await _maybe(backend.apply("u", write))
        assert (refused.status, refused.value, refused.snapshot.schema) == ("stale_schema", 1, 1)
        loaded = await _maybe(backend.load("u"))
        assert (loaded.version, loaded.schema, loaded.data) == (1, 1, {"old": 1})
        # A replace may move the document to the newer schema (it carries a migrated one) ...
        replace = svc.manager.write(Replace({"old": 1, "moved": True}, 1), None)
        replace.schema = 2
        moved = await _maybe(backend.apply("u", replace))
        assert (moved.status, moved.version, moved.snapshot.schema) == ("applied", 2, 2)
        # ... and the refused write, sent again, is new: its op id was not remembered.
        again = await _maybe(backend.apply("u", write))
        assert (again.status, again.version) == ("applied", 3)
        loaded = await _maybe(backend.load("u"))
        assert (loaded.schema, loaded.data) == (2, {"old": 1, "moved": True, "new": 1})

    @_twin_test
    async def test_a_write_to_a_newer_schema_is_refused(self, svc: ServiceTwin) -> None:
        """Older code never writes to, nor replaces, a document of a newer schema."""
        backend = svc.manager.backend
        await _maybe(backend.apply("u", self._schema_write(svc, 3, patch={"v3": 1})))
        for schema in (1, 2):
            refused = await _maybe(backend.apply("u", self._schema_write(svc, schema)))
            assert (refused.status, refused.value) == ("newer_schema", 3)
            replace = svc.manager.write(Replace({"old": 1}, 1), "wamid.r")
            replace.schema = schema
            refused = await _maybe(backend.apply("u", replace))
            assert (refused.status, refused.value) == ("newer_schema", 3)
        loaded = await _maybe(backend.load("u"))
        assert (loaded.version, loaded.schema, loaded.data) == (1, 3, {"v3": 1})
        # The refused replace's op id is free too.
        replace = svc.manager.write(Replace({"v3": 2}, 1), "wamid.r")
        replace.schema = 3
        assert (await _maybe(backend.apply("u", replace))).status == "applied"

    @_twin_test
    async def test_a_delete_ignores_the_schema_and_removes_it(self, svc: ServiceTwin) -> None:
        """Delete works at any schema; the next document starts at the writer's schema."""
        backend = svc.manager.backend
        await _maybe(backend.apply("u", self._schema_write(svc, 3)))
        delete = svc.manager.delete_write(None)
        delete.schema = 2
        assert (await _maybe(backend.apply("u", delete))).status == "applied"
        assert await _maybe(backend.load("u")) is None
        await _maybe(backend.apply("u", self._schema_write(svc, 2)))
        assert (await _maybe(backend.load("u"))).schema == 2

    def test_a_service_migrates_an_older_document_when_it_reads_it(self, twin: str) -> None:
        """A service with schema_version 3 reads a schema-less document through migrations 1, 2."""
        if not self.stores_schema:
            pytest.skip("this backend does not store schema versions")

        def to_2(doc: JSONObject) -> JSONObject:
            doc["name"] = {"first": doc.pop("name", "")}
            return doc

        def to_3(doc: JSONObject) -> JSONObject:
            return {**doc, "lang": doc.get("lang", "en")}

        newer = attrs.evolve(self.rules, schema_version=3, migrations={1: to_2, 2: to_3})

        async def main() -> None:
            old = self.open_service(twin)
            try:
                await old.update("u", {"name": "Ann"})
                await old.set_preserved("u", "jwt_token", "t")
                svc = _same_store(old, newer)
                assert await svc.get("u") == {
                    "name": {"first": "Ann"}, "lang": "en", "jwt_token": "t"
                }  # fmt: skip
                snapshot = await svc.snapshot("u")
                assert (snapshot.version, snapshot.schema) == (3, 3)
                assert (await svc.update("u", {"x": 1}))["x"] == 1
            finally:
                await old.aclose()

        asyncio.run(main())

    # -- concurrency ------------------------------------------------------------

    def test_concurrent_writers_lose_no_update(self, twin: str) -> None:
        """Many concurrent writers to one user: every write lands, versions are contiguous."""
        writers, per_writer = 8, 25

        async def main() -> None:
            svc = self.open_service(twin)
            try:
                versions: list[int] = []

                async def writer(w: int) -> None:
                    for i in range(per_writer):
                        out = await svc.update_once("hot", {f"w{w}": {f"i{i}": i}}, op_id=None)
                        versions.append(out.version)

                if isinstance(svc, SyncServiceAsAsync):
                    threads = [
                        threading.Thread(target=asyncio.run, args=(writer(w),))
                        for w in range(writers)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                else:
                    await asyncio.gather(*(writer(w) for w in range(writers)))
                total = writers * per_writer
                assert sorted(versions) == list(range(1, total + 1))
                doc = await svc.get("hot")
                assert sum(len(v) for v in doc.values()) == total
            finally:
                await svc.aclose()

        asyncio.run(main())


def _same_store(svc: ServiceTwin, rules: StateData) -> ServiceTwin:
    """Another service with ``rules`` over the same backend object."""
    if isinstance(svc, SyncServiceAsAsync):
        return SyncServiceAsAsync(StateService(svc.manager.backend, rules))
    return AsyncStateService(svc.manager.backend, rules)


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _sync_update(svc: ServiceTwin, user_id: str, patch: JSONObject) -> None:
    asyncio.run(svc.update(user_id, patch))


def _run_sync_in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in another thread and wait (a second client, outside our event loop)."""
    box: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]
