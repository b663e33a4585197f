"""The Redis and Valkey backends, and what operators' tools need of them.

Everything chatstate knows of Redis lives in this package: the backends
(:class:`RedisBackend`, :class:`AsyncRedisBackend`, also exported by
:mod:`chatstate.state` and :mod:`chatstate`), the key grammar
(:class:`KeyScheme`), what a write waits for (:class:`Durability`), the Lua
scripts, the client defaults and the mapping of
redis-py's errors to chatstate's. The command line uses these names and no
other; so can your own tools. Importing it imports redis-py.
"""

from chatstate.state.redis._backends import AsyncRedisBackend, RedisBackend
from chatstate.state.redis._core import (
    DEFAULT_NAMESPACE,
    Durability,
    default_client_options,
    map_redis_errors,
)
from chatstate.state.redis._keys import KeyKind, KeyScheme, ParsedKey
from chatstate.state.redis._lua import APPLY_SCRIPT, LOAD_SCRIPT

__all__ = [
    "APPLY_SCRIPT",
    "DEFAULT_NAMESPACE",
    "LOAD_SCRIPT",
    "AsyncRedisBackend",
    "Durability",
    "KeyKind",
    "KeyScheme",
    "ParsedKey",
    "RedisBackend",
    "default_client_options",
    "map_redis_errors",
]
