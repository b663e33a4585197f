"""SyncServiceAsAsync: the async face of a sync :class:`StateService`, written by hand.

It is not a generated twin: its coroutines call the sync service and never
suspend, so the sync router and the contract suite can drive one coroutine body
over both twins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any

from chatstate.state._backend import Document, Outcome, Snapshot
from chatstate.state._manager import DEFAULT_LEASE, DEFAULT_WAIT, TransactionFn
from chatstate.state._service import CLAIM_PURPOSE, _ClaimBase
from chatstate.state._sync.service import Claim, StateService
from chatstate.typing import JSONObject, Path

__all__ = ["SyncServiceAsAsync"]


class _SyncClaimAsAsync(_ClaimBase):
    """An async face over a sync :class:`Claim` (for the sync router's shared logic)."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(claim._core)  # noqa: SLF001 - the twin wraps the same core
        self._claim = claim

    async def commit(self, *, keep: bool = False) -> Outcome:
        """Commit the sync claim."""
        return self._claim.commit(keep=True) if keep else self._claim.commit()

    async def renew(self, lease: float | timedelta | None = None) -> bool:
        """Renew the sync claim."""
        return self._claim.renew(lease)

    async def release(self) -> None:
        """Release the sync claim."""
        self._claim.release()


class SyncServiceAsAsync:
    """An async face over a :class:`StateService` whose coroutines never suspend.

    The sync router drives its shared coroutine logic through it, and the backend
    contract suite uses it so that one test body serves both twins. Every method
    takes exactly the arguments of its :class:`StateService` namesake.
    """

    def __init__(self, service: StateService) -> None:
        self.service = service
        self.rules = service.rules
        self.manager = service.manager

    async def get(self, user_id: str) -> JSONObject:
        """Call :meth:`StateService.get`."""
        return self.service.get(user_id)

    async def snapshot(self, user_id: str) -> Snapshot:
        """Call :meth:`StateService.snapshot`."""
        return self.service.snapshot(user_id)

    async def update(
        self, user_id: str, patch: Mapping[str, Any], *, op_id: str | None = None
    ) -> Document:
        """Call :meth:`StateService.update`."""
        return self.service.update(user_id, patch, op_id=op_id)

    async def update_once(
        self,
        user_id: str,
        patch: Mapping[str, Any],
        *,
        op_id: str | None,
        if_version: int | None = None,
        fingerprint: str | None = None,
    ) -> Outcome:
        """Call :meth:`StateService.update_once`."""
        return self.service.update_once(
            user_id, patch, op_id=op_id, if_version=if_version, fingerprint=fingerprint
        )

    async def assign(
        self, user_id: str, values: Mapping[Any, Any], *, op_id: str | None = None
    ) -> Document:
        """Call :meth:`StateService.assign`."""
        return self.service.assign(user_id, values, op_id=op_id)

    async def increment(
        self, user_id: str, path: str | Path, by: int = 1, *, op_id: str | None = None
    ) -> int:
        """Call :meth:`StateService.increment`."""
        return self.service.increment(user_id, path, by, op_id=op_id)

    async def set_preserved(
        self, user_id: str, path: str | Path, value: Any, *, op_id: str | None = None
    ) -> Document:
        """Call :meth:`StateService.set_preserved`."""
        return self.service.set_preserved(user_id, path, value, op_id=op_id)

    async def reset(self, user_id: str, *, op_id: str | None = None) -> Document:
        """Call :meth:`StateService.reset`."""
        return self.service.reset(user_id, op_id=op_id)

    async def delete(self, user_id: str, *, op_id: str | None = None, force: bool = False) -> None:
        """Call :meth:`StateService.delete`."""
        self.service.delete(user_id, op_id=op_id, force=force)

    async def export(self, user_id: str, *, include_secrets: bool = False) -> JSONObject:
        """Call :meth:`StateService.export`."""
        return self.service.export(user_id, include_secrets=include_secrets)

    async def users(self, prefix: str = "") -> AsyncIterator[str]:
        """Iterate over :meth:`StateService.users`."""
        for user_id in self.service.users(prefix):
            yield user_id

    async def erase(self, user_id: str) -> list[str]:
        """Call :meth:`StateService.erase`."""
        return self.service.erase(user_id)

    async def transaction(
        self, user_id: str, fn: TransactionFn, *, max_attempts: int | None = None
    ) -> JSONObject:
        """Call :meth:`StateService.transaction`."""
        return self.service.transaction(user_id, fn, max_attempts=max_attempts)

    async def claim(
        self,
        user_id: str,
        op_id: str | None = None,
        *,
        fingerprint: str | None = None,
        purpose: str = CLAIM_PURPOSE,
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = DEFAULT_WAIT,
        heartbeat: bool = True,
    ) -> _SyncClaimAsAsync:
        """Call :meth:`StateService.claim`."""
        claim = self.service.claim(
            user_id,
            op_id,
            fingerprint=fingerprint,
            purpose=purpose,
            lease=lease,
            wait=wait,
            heartbeat=heartbeat,
        )
        return _SyncClaimAsAsync(claim)

    async def ping(self) -> float:
        """Call :meth:`StateService.ping`."""
        return self.service.ping()

    async def aclose(self) -> None:
        """Call :meth:`StateService.close`."""
        self.service.close()
