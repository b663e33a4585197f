"""chatstate as pyTelegramBotAPI's state storage, and a guard against duplicate updates.

Switch a bot over with one line; handlers, ``StateContext`` and
``bot.add_data``/``retrieve_data`` stay as they are::

    from chatstate.integrations.telebot import ChatstateStateStorage, UpdateDedupeMiddleware

    storage = ChatstateStateStorage.from_url("redis://localhost:6379/0")
    bot = TeleBot(TOKEN, state_storage=storage, use_class_middlewares=True)
    bot.setup_middleware(UpdateDedupeMiddleware(bot, storage.service))  # optional, first
    bot.setup_middleware(StateMiddleware(bot))

:class:`AsyncChatstateStateStorage` and :class:`AsyncUpdateDedupeMiddleware`
are the twins for ``AsyncTeleBot``.

Each key telebot builds (``telebot:<bot>:<business connection>:<thread>:<chat>:<user>``,
the parts that are unset left out, exactly as its own storages build it) is
one chatstate document ``{"state": ..., "data": {...}}``; the key exists (for
``set_data``, ``reset_data``, ``save`` and ``delete_state``) while the
document has a ``"state"`` field, as telebot's record exists from
``set_state`` to ``delete_state``. ``set_data`` (what ``bot.add_data`` and
``StateContext.add_data`` call, once per keyword) writes only its field, in
one chatstate write, so concurrent handlers never lose each other's fields
where telebot's own storages read the whole data and write it back. Values
are stored as JSON, exactly (a tuple as a list, as telebot's Redis storage
stores it).

Needs ``pip install 'chatstate[telebot]'``.
"""

from __future__ import annotations

from chatstate.integrations.telebot._async.storage import (
    AsyncChatstateStateStorage,
    AsyncUpdateDedupeMiddleware,
)
from chatstate.integrations.telebot._common import (
    DATA_FIELD,
    DEDUPE_UPDATE_TYPES,
    DEFAULT_LEASE,
    STATE_FIELD,
    update_key,
)
from chatstate.integrations.telebot._sync.storage import (
    ChatstateStateStorage,
    UpdateDedupeMiddleware,
)

__all__ = [
    "DATA_FIELD",
    "DEDUPE_UPDATE_TYPES",
    "DEFAULT_LEASE",
    "STATE_FIELD",
    "AsyncChatstateStateStorage",
    "AsyncUpdateDedupeMiddleware",
    "ChatstateStateStorage",
    "UpdateDedupeMiddleware",
    "update_key",
]
