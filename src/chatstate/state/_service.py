"""What the state service twins share: exports, claims and cached documents, no I/O.

``AsyncStateService`` and its claim and cached-user classes (``state/_async/service.py``)
are the one body of both twins; ``StateService`` and the rest of the sync twin
(``state/_sync/service.py``) are generated from it by ``tools/unasync.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, Literal, TypeVar

from chatstate._redact import redact
from chatstate.exceptions import ConfigurationError, UsageError
from chatstate.state._backend import Document, Outcome, Snapshot
from chatstate.state._manager import _ClaimCore
from chatstate.state._protocols import Erasing, Listing
from chatstate.state._rules import StateData
from chatstate.typing import JSONObject, Path

__all__ = ["CLAIM_PURPOSE", "EXPORT_FORMAT"]

S = TypeVar("S")

CLAIM_PURPOSE = "claim"


EXPORT_FORMAT = 1
"""The ``chatstate_export`` version :meth:`StateService.export` writes."""

ERASE: Final = "Failed to erase user"


def _export(
    user_id: str, snapshot: Snapshot, rules: StateData, include_secrets: bool
) -> JSONObject:
    data = snapshot.data if snapshot.version else {}
    export: JSONObject = {
        "chatstate_export": EXPORT_FORMAT,
        "user_id": user_id,
        "version": snapshot.version,
        "secrets": "included" if include_secrets else "redacted",
        "document": data if include_secrets else redact(data, rules.redacted_fields),
    }
    if snapshot.version and snapshot.schema != 1:
        export["schema"] = snapshot.schema
    return export


def _eraser(backend: object) -> Callable[[str], Any]:
    """The backend's ``erase`` (the :class:`~chatstate.state.Erasing` capability)."""
    if not isinstance(backend, Erasing):  # AsyncErasing has the same shape
        raise UsageError(
            f"{type(backend).__name__} cannot erase a user (it is not an Erasing backend); "
            "delete(user_id, force=True) removes the document only"
        )
    return backend.erase


def _lister(backend: object) -> Callable[[str], Any]:
    """The backend's ``users`` (the :class:`~chatstate.state.Listing` capability)."""
    if not isinstance(backend, Listing):  # AsyncListing has the same shape
        raise ConfigurationError(
            f"{type(backend).__name__} cannot list its users (it is not a Listing backend); "
            "the memory, SQLite and Redis backends can"
        )
    return backend.users


def _counter_value(doc: JSONObject, path: Path) -> int:
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if type(node) is int else 0


class _ClaimBase:
    """What both claim twins share: the status, the snapshot, staging."""

    def __init__(self, core: _ClaimCore) -> None:
        self._core = core

    @property
    def user_id(self) -> str:
        """The claimed user."""
        return self._core.user_id

    @property
    def op_id(self) -> str | None:
        """The message id the claim is for."""
        return self._core.op_id

    @property
    def status(self) -> Literal["claimed", "duplicate"]:
        """``"claimed"``, or ``"duplicate"`` when the op id was handled already."""
        return "claimed" if self._core.status == "claimed" else "duplicate"

    @property
    def duplicate(self) -> bool:
        """True when the message must not be handled again: do nothing, send nothing."""
        return self._core.status != "claimed"

    @property
    def snapshot(self) -> Snapshot:
        """The user's document and version as the claim found them."""
        return self._core.snapshot

    @property
    def data(self) -> JSONObject:
        """The user's document as the claim found it."""
        return self._core.snapshot.data

    @property
    def open(self) -> bool:
        """True until the claim is committed or released (False for a duplicate)."""
        return self._core.state == "open"

    def update(self, patch: Mapping[str, Any]) -> None:
        """Stage a merge patch, written at commit (checked now)."""
        self._core.stage_update(patch)

    def assign(self, values: Mapping[Any, Any]) -> None:
        """Stage exact values (see :meth:`StateService.assign`), written at commit."""
        self._core.stage_assign(values)

    def set_preserved(self, path: str | Path, value: Any) -> None:
        """Stage a preserved field (a token), written at commit with the rest."""
        self._core.stage_preserved(path, value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} user_id={self.user_id!r} status={self.status!r}>"


class _CachedStateView(Mapping[str, Any]):
    """Read access to a cached document; the twins below add the writes."""

    def __init__(self, snapshot: Snapshot, rules: StateData) -> None:
        self._snapshot = snapshot
        self._rules = rules

    def _store(self, outcome: Outcome) -> Document:
        self._snapshot = outcome.snapshot
        return Document(outcome.snapshot, self._rules.redacted_fields)

    @property
    def data(self) -> JSONObject:
        """The cached document (yours to read; write through the methods)."""
        return self._snapshot.data

    @property
    def version(self) -> int:
        """The version of the cached document."""
        return self._snapshot.version

    def __getitem__(self, key: str) -> Any:
        return self._snapshot.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._snapshot.data)

    def __len__(self) -> int:
        return len(self._snapshot.data)

    @property
    def jwt_token(self) -> str | None:
        """The user's JWT (the rules' ``token_field``), or ``None``."""
        token = self._snapshot.data.get(self._rules.token_field)
        return token if isinstance(token, str) else None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} version={self.version} keys={sorted(self.data)}>"


# A property cannot wait: the asyncio twin's ``CachedUser.state`` needs its awaited
# ``load()`` first, the sync twin's loads on first use. tools/unasync.py swaps the
# first helper (called in the async source) for the second.


def cached_state_async(state: S | None, load: Callable[[], object]) -> S:
    """The state :meth:`AsyncCachedUser.load` read; refused before it has run."""
    del load  # the sync variant calls it
    if state is None:
        raise UsageError("await AsyncCachedUser.load() before reading .state")
    return state


def cached_state_sync(state: S | None, load: Callable[[], S]) -> S:
    """The state :meth:`CachedUser.load` read, read now on first use."""
    return load() if state is None else state
