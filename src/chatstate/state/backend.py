"""For backend authors: the protocols, the data model of a write, the reference algorithm.

A backend stores one document and one operation log per user. It is a
:class:`Backend` (``load``, ``apply``, ``close``) or an :class:`AsyncBackend`
(``aclose``). Every optional capability is one protocol, and chatstate checks
it with ``isinstance``, never by looking a method up by name:

=========================================  ============================================
protocol (sync / asyncio)                  what uses it
=========================================  ============================================
:class:`Listing` / :class:`AsyncListing`   ``StateService.users()``, the command line,
                                           python-telegram-bot's start-up load
:class:`Locking` / :class:`AsyncLocking`   the token refresh, aiogram and PTB isolation
:class:`DeadlineIndex` /                   ``Router.due()``: reminders and timeouts
:class:`AsyncDeadlineIndex`
:class:`Erasing` / :class:`AsyncErasing`   ``StateService.erase()``
:class:`Pinging` / :class:`AsyncPinging`   ``StateService.ping()``, health checks
:class:`StoresSchema`                      ``StateData(schema_version=...)``
:class:`~chatstate.observe.Describing`     metrics and traces name the backend
=========================================  ============================================

``apply(user_id, write)`` applies a :class:`Write` atomically: an operation
(:class:`Edits`, :class:`Increment`, :class:`Reset`, :class:`Replace`,
:class:`Delete`, or the claim operations :class:`Acquire`, :class:`Renew`,
:class:`Release`) under the op-id, claim and schema rules, and answers an
:class:`Outcome`. A backend that can hold a lock or a transaction around a read
and a write keeps a :class:`Snapshot` and an :class:`OpLog` per user and calls
:func:`apply_write`, the reference algorithm, in between: it follows every rule
by construction. The Redis backend's Lua script is checked against it.

:class:`chatstate.testing.BackendContract` is the test suite that proves a
backend; "Writing a backend" in the docs walks through one.
"""

from chatstate.state._backend import (
    ERASED_PARTS,
    INT64_MAX,
    INT64_MIN,
    OPS_TRIM_AT,
    REMEMBERED_OPS,
    UNCHANGED,
    Acquire,
    Delete,
    Edits,
    Increment,
    Lease,
    Operation,
    OpLog,
    OpRecord,
    Outcome,
    Release,
    Renew,
    Replace,
    Reset,
    Snapshot,
    Write,
    WriteResult,
    apply_operation,
    apply_write,
    check_deadline,
    check_limit,
    check_prefix,
)
from chatstate.state._protocols import (
    AsyncBackend,
    AsyncDeadlineIndex,
    AsyncErasing,
    AsyncListing,
    AsyncLocking,
    AsyncPinging,
    Backend,
    DeadlineIndex,
    Erasing,
    Listing,
    Locking,
    Pinging,
    StoresSchema,
    stores_schema,
)

__all__ = [
    "ERASED_PARTS",
    "INT64_MAX",
    "INT64_MIN",
    "OPS_TRIM_AT",
    "REMEMBERED_OPS",
    "UNCHANGED",
    "Acquire",
    "AsyncBackend",
    "AsyncDeadlineIndex",
    "AsyncErasing",
    "AsyncListing",
    "AsyncLocking",
    "AsyncPinging",
    "Backend",
    "DeadlineIndex",
    "Delete",
    "Edits",
    "Erasing",
    "Increment",
    "Lease",
    "Listing",
    "Locking",
    "OpLog",
    "OpRecord",
    "Operation",
    "Outcome",
    "Pinging",
    "Release",
    "Renew",
    "Replace",
    "Reset",
    "Snapshot",
    "StoresSchema",
    "Write",
    "WriteResult",
    "apply_operation",
    "apply_write",
    "check_deadline",
    "check_limit",
    "check_prefix",
    "stores_schema",
]
