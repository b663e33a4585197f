"""How the Redis backends name their keys, both ways: one class builds and parses them.

A user's keys share one hash tag, so they live in one Cluster slot::

    <namespace>:{<tag>}              the document (a hash)
    <namespace>:{<tag>}:ops          the operation log (a hash)
    <namespace>:{<tag>}:claim        the claim (a string)
    <namespace>:{<tag>}:lock:<name>  a named lock (a string)
    <namespace>:deadlines:{<n>}      shard ``n`` of the deadline index (a sorted set)

The tag is the user id percent-encoded (so distinct ids give distinct keys and
no id can open or close a hash tag), or, with a key secret, ``#`` and an
HMAC-SHA256 of the id (160 bits in base32), so no user id appears in a key
name. :class:`KeyScheme` is the one place that knows this grammar: the backends
build their keys with it and the command line reads keys back with it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import zlib
from typing import Final, Literal
from urllib.parse import quote, unquote

import attrs

from chatstate.exceptions import ConfigurationError

__all__ = ["KeyKind", "KeyScheme", "ParsedKey"]

KeyKind = Literal["doc", "ops", "claim", "lock"]
"""What a user's key holds."""

_SAFE_ID_CHARS: Final = "@+"  # plus quote()'s own: letters, digits and "_.-~"
_HASHED_TAG: Final = re.compile(r"#[a-z2-7]{32}")
_TAILS: Final[dict[str, KeyKind]] = {"": "doc", ":ops": "ops", ":claim": "claim"}


def check_namespace(namespace: object) -> str:
    """Return ``namespace`` if it can prefix keys (printable, no hash-tag braces)."""
    if not isinstance(namespace, str) or not namespace:
        raise ConfigurationError("namespace must be a non-empty str")
    if any(c in namespace for c in "{}") or not namespace.isprintable():
        raise ConfigurationError("namespace must be printable and hold no '{' or '}'")
    return namespace


def check_secret(secret: object) -> bytes | None:
    """Return a key secret as bytes (a str is UTF-8 encoded); at least 16 bytes."""
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ConfigurationError("key_secret must be at least 16 bytes (a str or bytes)")
    return secret


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (``SCAN MATCH``)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@functools.lru_cache(maxsize=16384)
def _encoded(user_id: str) -> str:
    return quote(user_id, safe=_SAFE_ID_CHARS)


@functools.lru_cache(maxsize=16384)
def _hashed(secret: bytes, user_id: str) -> str:
    digest = hmac.new(secret, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return "#" + base64.b32encode(digest[:20]).decode("ascii").lower()


@functools.lru_cache(maxsize=16384)
def _user_keys(
    namespace: str, secret: bytes | None, by_tag: bool, user_id: str
) -> tuple[str, str, str]:
    if by_tag:
        tag = user_id
    elif secret is not None:
        tag = _hashed(secret, user_id)
    else:
        tag = _encoded(user_id)
    base = f"{namespace}:{{{tag}}}"
    return base, base + ":ops", base + ":claim"


@attrs.frozen
class ParsedKey:
    """A key read back: what it holds and whose it is.

    Attributes:
        kind: ``"doc"``, ``"ops"``, ``"claim"`` or ``"lock"``.
        tag: The key's hash tag (the encoded id, or ``#`` and a keyed hash).
        user_id: The user id, or ``None`` when the tag is a keyed hash (which
            cannot be turned back into an id).
        lock: The lock's name, for a ``"lock"`` key.
    """

    kind: KeyKind
    tag: str
    user_id: str | None
    lock: str | None = None


@attrs.frozen(repr=False)
class KeyScheme:
    """The keys of one namespace: built from user ids, and parsed back.

    Pass one to a backend as ``keys=`` (instead of ``namespace`` and
    ``key_secret``), or use it in your own tools to find and read keys.

    Args:
        namespace: The prefix of every key (printable, no ``{`` or ``}``).
        secret: A key secret (at least 16 bytes; a str is UTF-8 encoded): tags
            are then keyed hashes of the user ids. Never shown in a repr.
        by_tag: The ids a backend is given are hash tags, as :meth:`parse`
            reads them from keys found by a scan, not user ids: so a tool can
            address every user, pseudonymous keys included, without their ids
            (``chatstate migrate`` does).

    >>> scheme = KeyScheme("chatstate")
    >>> scheme.keys("ann")
    ('chatstate:{ann}', 'chatstate:{ann}:ops', 'chatstate:{ann}:claim')
    >>> scheme.parse("chatstate:{a%20b}:lock:auth")
    ParsedKey(kind='lock', tag='a%20b', user_id='a b', lock='auth')
    """

    namespace: str = attrs.field(converter=check_namespace)
    secret: bytes | None = attrs.field(default=None, converter=check_secret)
    by_tag: bool = attrs.field(default=False, kw_only=True)

    def __repr__(self) -> str:  # never the secret
        hashed = ", hashed" if self.secret is not None else ""
        tagged = ", by_tag=True" if self.by_tag else ""
        return f"KeyScheme({self.namespace!r}{hashed}{tagged})"

    @property
    def pseudonymous(self) -> bool:
        """True when keys do not turn back into user ids (a key secret, or ``by_tag``)."""
        return self.secret is not None or self.by_tag

    def tag(self, user_id: str) -> str:
        """The hash tag of a user's keys (for an already checked user id)."""
        if self.by_tag:
            return user_id
        if self.secret is not None:
            return _hashed(self.secret, user_id)
        return _encoded(user_id)

    def keys(self, user_id: str) -> tuple[str, str, str]:
        """The user's document, operation-log and claim keys: one hash slot.

        Cached per user, as every read and write asks for them.
        """
        return _user_keys(self.namespace, self.secret, self.by_tag, user_id)

    def tag_keys(self, tag: str) -> tuple[str, str, str]:
        """The document, operation-log and claim keys of a hash tag (as found by a scan)."""
        base = f"{self.namespace}:{{{tag}}}"
        return base, base + ":ops", base + ":claim"

    def lock(self, user_id: str, name: str) -> str:
        """The key of the user's lock ``name``."""
        return f"{self.keys(user_id)[0]}:lock:{name}"

    def deadline(self, shard: int) -> str:
        """The sorted set of shard ``shard`` of the deadline index."""
        return f"{self.namespace}:deadlines:{{{shard}}}"

    def deadline_shard(self, user_id: str, shards: int) -> str:
        """The deadline shard holding the user's entry, of ``shards``."""
        digest = zlib.crc32(user_id.encode("utf-8", "surrogatepass"))
        return self.deadline(digest % shards)

    def pattern(self, prefix: str = "", *, kind: KeyKind | None = "doc") -> str:
        """A ``SCAN MATCH`` pattern for the keys of users whose id starts with ``prefix``.

        ``kind=None`` matches every key of the users. A prefix needs readable
        tags: with a key secret only ``""`` is allowed.
        """
        if prefix and self.pseudonymous:
            raise ConfigurationError("keys hold keyed hashes of user ids: no prefix can match")
        start = f"{glob_escape(self.namespace)}:{{{_encoded(prefix) if prefix else ''}"
        if kind is None:
            return start + "*"
        if kind == "lock":
            return start + "*}:lock:*"
        tail = {"doc": "", "ops": ":ops", "claim": ":claim"}[kind]
        return f"{start}*}}{tail}"

    def parse(self, key: str | bytes) -> ParsedKey | None:  # noqa: PLR0911 - a rule each
        """What a key of this namespace holds, and whose; ``None`` for any other key.

        ``None`` too for a key chatstate did not build: a foreign key, or a tag
        that does not decode. A keyed-hash tag parses with ``user_id=None``,
        with or without this scheme's secret.
        """
        if isinstance(key, bytes):
            try:
                key = key.decode("utf-8")
            except UnicodeDecodeError:
                return None
        prefix = self.namespace + ":{"
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix) :]
        end = rest.find("}")
        if end <= 0:
            return None
        tag, tail = rest[:end], rest[end + 1 :]
        lock: str | None = None
        kind: KeyKind
        if tail.startswith(":lock:") and len(tail) > len(":lock:"):
            kind, lock = "lock", tail[len(":lock:") :]
        elif tail in _TAILS:
            kind = _TAILS[tail]
        else:
            return None
        if tag.startswith("#"):  # a keyed hash ('#' itself is encoded as %23)
            return ParsedKey(kind, tag, None, lock) if _HASHED_TAG.fullmatch(tag) else None
        try:
            user_id = unquote(tag, errors="strict")
        except UnicodeDecodeError:
            return None
        if _encoded(user_id) != tag:
            return None
        return ParsedKey(kind, tag, user_id, lock)
