"""Secret fields encrypted at rest: AES-256-GCM in Python, before a value leaves the process.

Everything here is pure (no I/O); the manager calls it on the way out and on the
way in, so every backend stores the same ciphertext and no server, log, AOF file,
SLOWLOG or MONITOR stream ever sees the plaintext.

A value at a secret path is stored as one ASCII string, a *token*::

    csenc:1:<key id>:<urlsafe base64, unpadded, of nonce || ciphertext || tag>

- ``1`` is the format version; the nonce is 12 fresh bytes from ``os.urandom``.
- The plaintext is the value's compact JSON text, so any JSON value (a str, a
  number, an object...) is encrypted as one whole.
- The associated data is the JSON text of ``["chatstate.field", 1, key_id,
  user_id, [path keys...]]``: a token moved to another user, another field or
  another key id does not authenticate, and a JSON list of strings is an
  unambiguous encoding (no two different tuples give the same bytes).

Rules the integration relies on:

- **Whole values.** A secret field is replaced as a whole: a patch that sends an
  object to a secret path encrypts that object (without its ``None`` members)
  and replaces the stored one, as for a *replaced* field (no deep merge into,
  no append to, no increment of an encrypted value). Secret paths are checked
  by :func:`secret_paths`: none may lie inside another.
- **None carries no secret.** ``None`` at a secret path (a deletion marker in a
  patch, a cleared token) passes through unencrypted.
- **Plaintext legacy.** On read, a value at a secret path that is not a token
  (written before encryption was turned on) is returned as it is, unless the
  ring was built with ``accept_plaintext=False``; a string that starts with
  ``csenc:`` but is not a valid token is an error, not plaintext.
  :meth:`FieldEncryption.reencrypt_document` encrypts such values.
- **Errors never show secrets.** :class:`DecryptionError` names the user, the
  field and the key id; never the token, the plaintext or a key.

``cryptography`` is imported when a :class:`FieldEncryption` is built, never by
``import chatstate``: install it with ``pip install 'chatstate[crypto]'``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import unicodedata
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final, NoReturn

from chatstate.exceptions import (
    ConfigurationError,
    DecryptionError,
    InvalidUserIdError,
    SerializationError,
    ValidationError,
)
from chatstate.state._codec import encode_value
from chatstate.state._paths import (
    MISSING,
    drop_nones,
    format_path,
    lookup,
    parse_path,
    secret_paths,
)
from chatstate.typing import JSON, JSONObject, Path

__all__ = [
    "DEFAULT_KEYS_VARIABLE",
    "DecryptionError",
    "FieldEncryption",
    "is_encrypted",
    "key_id_of",
    "secret_paths",
]

PREFIX: Final = "csenc:"
VERSION: Final = 1
DEFAULT_KEYS_VARIABLE: Final = "CHATSTATE_KEYS"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_AAD_TAG: Final = "chatstate.field"
_INSTALL: Final = "pip install 'chatstate[crypto]'"
_KEY_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN: Final = re.compile(r"csenc:([0-9]+):([^:]*):([A-Za-z0-9_-]*)")
_B64_KEY: Final = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")


def is_encrypted(value: object) -> bool:
    """True when ``value`` looks like a token (a str starting with ``csenc:``)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def key_id_of(value: object) -> str | None:
    """The key id a version-1 token names, else ``None`` (plaintext, malformed head).

    Only the token's head is read: its body is checked when it is decrypted.
    """
    if not is_encrypted(value):
        return None
    assert isinstance(value, str)
    match = _TOKEN.fullmatch(value)
    if match is None or match[1] != str(VERSION) or not _KEY_ID.fullmatch(match[2]):
        return None
    return match[2]


def _aesgcm_class() -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415
    except ImportError:
        raise ConfigurationError(
            f"field encryption needs the 'cryptography' package: {_INSTALL}"
        ) from None
    return AESGCM


def _key_bytes(where: str, key: object) -> bytes:
    """The raw key; messages say which key by position, never its id, the key or a part of it.

    Ids are not shown either: a key and its id given the wrong way round make the
    key the "id".
    """
    if isinstance(key, bytes | bytearray | memoryview):
        raw = bytes(key)
    elif isinstance(key, str):
        text = key.strip()
        if not _B64_KEY.fullmatch(text):
            raise ConfigurationError(f"{where} is not base64 text (standard or URL-safe alphabet)")
        text = text.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except binascii.Error:
            raise ConfigurationError(f"{where} is not valid base64 text") from None
    else:
        raise ConfigurationError(f"{where} must be bytes or base64 text, not {type(key).__name__}")
    if len(raw) != KEY_BYTES:
        raise ConfigurationError(
            f"{where} is {len(raw)} bytes; AES-256-GCM needs {KEY_BYTES} "
            "(make one with FieldEncryption.generate_key())"
        )
    return raw


def _key_like(text: str) -> bool:
    """True when ``text`` decodes as base64 to exactly one key's worth of bytes."""
    try:
        _key_bytes("", text)
    except ConfigurationError:
        return False
    return True


def _b64decode(body: str) -> bytes | None:
    """The bytes of unpadded URL-safe base64, or ``None``; only the canonical text is accepted.

    Base64 text whose last character carries unused bits has twins that decode
    to the same bytes: refusing them means that any changed character is caught.
    """
    try:
        blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii") != body:
        return None
    return blob


class FieldEncryption:
    """A key ring that encrypts and decrypts secret fields with AES-256-GCM.

    New values are encrypted with the ``current`` key; tokens written with any
    configured key are read. To rotate: add a new key and make it current, run
    the re-encryption command, then drop the old key.

    Args:
        keys: Key id to key. A key is 32 random bytes, or their base64 text
            (standard or URL-safe, padding optional), as
            :meth:`generate_key` makes. A key id is 1 to 64 characters of
            ``A-Z a-z 0-9 . _ -`` starting with a letter or digit (a date such as
            ``"2026-11"`` reads well); it is stored in every token.
        current: The id of the key new values are encrypted with. Required when
            there are several keys (a mapping's order is too easy to get wrong);
            with one key, that key.
        accept_plaintext: Read a value at a secret path that is not a token as
            plaintext written before encryption was turned on (the default).
            Once every document is re-encrypted, ``False`` makes such a value an
            error: otherwise anyone who can write to the store could put a
            plaintext value of their choosing (a token of theirs) in a secret
            field. :meth:`reencrypt_document` encrypts plaintext either way.

    Raises:
        ConfigurationError: no keys, a bad key id, a key that is not 32 bytes,
            two ids with the same key, ``current`` missing or unknown, or the
            ``cryptography`` package is not installed.

    Example::

        encryption = FieldEncryption(
            {"2026-11": new_key, "2026-01": old_key}, current="2026-11"
        )
    """

    __slots__ = ("_accept_plaintext", "_ciphers", "_current")

    def __init__(
        self,
        keys: Mapping[str, bytes | str],
        *,
        current: str | None = None,
        accept_plaintext: bool = True,
    ) -> None:
        given: object = keys  # checked at run time too: it often comes from config files
        if not isinstance(given, Mapping) or not given:
            raise ConfigurationError("field encryption needs at least one key")
        raws: dict[str, bytes] = {}
        for number, (key_id, key) in enumerate(given.items(), start=1):
            where = f"key {number} of {len(given)}"
            if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                raise ConfigurationError(
                    f"the id of {where} must be 1 to 64 characters of A-Z a-z 0-9 . _ - "
                    "starting with a letter or digit (ids are not shown: one may be a key)"
                )
            if len(key_id) >= 40 and _key_like(key_id):
                raise ConfigurationError(
                    f"the id of {where} looks like a key: give the id first, then the key"
                )
            raw = _key_bytes(where, key)
            for position, seen in enumerate(raws.values(), start=1):
                if seen == raw:
                    raise ConfigurationError(f"keys {position} and {number} are the same key")
            raws[key_id] = raw
        if current is None:
            if len(raws) > 1:
                raise ConfigurationError(
                    f"with {len(raws)} keys, say which is current: "
                    "FieldEncryption(keys, current=...)"
                )
            current = next(iter(raws))
        if current not in raws:
            raise ConfigurationError("current= is not one of the key ids")
        aesgcm = _aesgcm_class()
        self._ciphers: dict[str, Any] = {key_id: aesgcm(raw) for key_id, raw in raws.items()}
        self._current: str = current
        self._accept_plaintext = accept_plaintext

    @classmethod
    def from_string(
        cls, spec: str, *, source: str = "the key list", accept_plaintext: bool = True
    ) -> FieldEncryption:
        """A key ring from ``"id1:key1,id2:key2"``: base64 keys, newest (current) first.

        Spaces around entries are ignored. This is the form of
        :meth:`from_env`'s variable.

        Args:
            spec: The key list.
            source: What to call it in error messages (a variable's name).
            accept_plaintext: As for the constructor.

        Raises:
            ConfigurationError: the list is empty or an entry is not ``id:key``
                (the message gives the entry's position, never its text).
        """
        keys: dict[str, str] = {}
        for number, entry in enumerate(spec.split(","), start=1):
            key_id, sep, key = entry.strip().partition(":")
            if not sep or not key_id or not key:
                raise ConfigurationError(f"entry {number} of {source} is not 'key_id:base64_key'")
            if key_id in keys:
                raise ConfigurationError(f"the key id of entry {number} of {source} appears twice")
            keys[key_id] = key
        return cls(keys, current=next(iter(keys)), accept_plaintext=accept_plaintext)

    @classmethod
    def from_env(
        cls,
        name: str = DEFAULT_KEYS_VARIABLE,
        *,
        environ: Mapping[str, str] | None = None,
        accept_plaintext: bool = True,
    ) -> FieldEncryption | None:
        """A key ring from an environment variable, or ``None`` when it is unset or blank.

        The variable holds ``"id1:key1,id2:key2"``, newest (current) key first,
        as :meth:`from_string` reads. ``None`` means encryption is off, so
        ``FieldEncryption.from_env()`` can be passed straight to the service.
        ``environ`` stands in for ``os.environ``; ``accept_plaintext`` is as for
        the constructor.

        Raises:
            ConfigurationError: the variable is set but malformed.
        """
        value = (os.environ if environ is None else environ).get(name, "")
        if not value.strip():
            return None
        return cls.from_string(value, source=f"${name}", accept_plaintext=accept_plaintext)

    @staticmethod
    def generate_key() -> str:
        """A new random key as URL-safe base64 text (32 bytes from ``os.urandom``)."""
        return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii")

    @property
    def current(self) -> str:
        """The id of the key new values are encrypted with."""
        return self._current

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every configured key id, the current one first."""
        return (self._current, *(k for k in self._ciphers if k != self._current))

    @property
    def accept_plaintext(self) -> bool:
        """Whether a value at a secret path that is not a token is read as plaintext."""
        return self._accept_plaintext

    def accepting_plaintext(self) -> FieldEncryption:
        """This key ring, reading plaintext at secret paths as it is.

        For the steps that bring plaintext under encryption (``chatstate
        reencrypt``, ``chatstate import``) while the bot's own ring is strict.
        """
        if self._accept_plaintext:
            return self
        ring = object.__new__(FieldEncryption)
        ring._ciphers = self._ciphers
        ring._current = self._current
        ring._accept_plaintext = True
        return ring

    def __repr__(self) -> str:
        strict = "" if self._accept_plaintext else ", accept_plaintext=False"
        return f"FieldEncryption(current={self._current!r}, key_ids={self.key_ids!r}{strict})"

    # -- one value --------------------------------------------------------------

    def encrypt(self, user_id: str, path: Path | str, value: JSON) -> str:
        """Encrypt one JSON value for one user's field, with the current key.

        Every call uses a fresh nonce, so the same value gives a different token.

        Args:
            user_id: The user the document belongs to (bound to the token).
            path: The field, as keys (``("profile", "pin")``) or dotted text.
            value: Any JSON value, encrypted whole.

        Raises:
            SerializationError: ``value`` is not JSON (its path is named).
        """
        path = _as_path(path)
        _check_user(user_id)
        try:
            plaintext = encode_value(value).encode("utf-8")
        except (TypeError, ValueError):
            raise SerializationError(
                f"the secret value at {format_path(path)} is not JSON", path=format_path(path)
            ) from None
        nonce = os.urandom(NONCE_BYTES)
        key_id = self._current
        sealed = self._ciphers[key_id].encrypt(nonce, plaintext, _aad(key_id, user_id, path))
        body = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")
        return f"{PREFIX}{VERSION}:{key_id}:{body}"

    def decrypt(self, user_id: str, path: Path | str, value: JSON) -> JSON:
        """The plaintext of a token; ``None`` and (by default) plaintext are returned as they are.

        Raises:
            DecryptionError: the token names a key that is not configured, does
                not authenticate (altered, another key under the same id, or
                moved from another user or field), or is malformed; or, with
                ``accept_plaintext=False``, the value is not a token.
        """
        return self._open(user_id, path, value, lenient=self._accept_plaintext)

    def _open(self, user_id: str, path: Path | str, value: JSON, *, lenient: bool) -> JSON:
        if value is None or (lenient and not is_encrypted(value)):
            return value
        path = _as_path(path)
        _check_user(user_id)
        if not is_encrypted(value):
            _fail(
                user_id,
                path,
                None,
                "plaintext",
                "is not encrypted, and this key ring refuses plaintext (accept_plaintext=False)",
            )
        assert isinstance(value, str)
        match = _TOKEN.fullmatch(value)
        if match is None:
            _fail(user_id, path, None, "malformed", "is not a well-formed chatstate ciphertext")
        version, key_id, body = match.groups()
        if not _KEY_ID.fullmatch(key_id):
            _fail(user_id, path, None, "malformed", "is not a well-formed chatstate ciphertext")
        if version != str(VERSION):
            _fail(
                user_id,
                path,
                key_id,
                "unsupported_version",
                f"uses ciphertext format {version}, which this release cannot read",
            )
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            _fail(
                user_id,
                path,
                key_id,
                "unknown_key",
                f"was encrypted with key {key_id!r}, which is not configured "
                f"(configured: {', '.join(map(repr, self.key_ids))})",
            )
        blob = _b64decode(body)
        if blob is None or len(blob) < NONCE_BYTES + TAG_BYTES:
            _fail(user_id, path, key_id, "malformed", "is not a well-formed chatstate ciphertext")
        from cryptography.exceptions import InvalidTag  # noqa: PLC0415 - loaded with the ring

        try:
            plaintext = cipher.decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(key_id, user_id, path)
            )
        except InvalidTag:
            _fail(
                user_id,
                path,
                key_id,
                "authentication",
                f"does not authenticate with key {key_id!r}: it was altered, written with "
                "another key under that id, or moved from another user or field",
            )
        try:
            result: JSON = json.loads(plaintext.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            _fail(user_id, path, key_id, "malformed", "decrypts to something other than JSON")
        return result

    # -- documents and patches ---------------------------------------------------

    def encrypt_document(
        self, doc: JSONObject, user_id: str, secret: Collection[Path]
    ) -> JSONObject:
        """A copy of ``doc`` with the value at each secret path encrypted.

        Only paths present in ``doc`` (every ancestor an object) with a value
        other than ``None`` are encrypted; each value is encrypted whole. The
        input is never changed: the objects on the way to an encrypted value are
        copied, every other subtree is shared with ``doc``.

        Args:
            doc: A plaintext document (or subtree: see :meth:`encrypt_value`).
            user_id: The document's user.
            secret: The secret paths (from :func:`secret_paths`).
        """
        return self._transform(doc, (), secret, lambda p, v: self.encrypt(user_id, p, v))

    def encrypt_patch(
        self, patch: Mapping[str, Any], user_id: str, secret: Collection[Path]
    ) -> JSONObject:
        """A copy of a merge patch with the values at secret paths encrypted whole.

        The same walk as :meth:`encrypt_document`: the patch descends through
        objects (``{"profile": {"pin": "1234"}}`` reaches ``profile.pin``), an
        object or list sent to a secret path is encrypted as one value (which
        then replaces the stored one: secret fields are never deep-merged), and
        ``None`` (delete) passes through. A patch that replaces an ancestor by a
        non-object holds no value at the secret path, so nothing is encrypted.

        An object sent to a secret path loses its ``None`` members (recursively,
        not inside lists) before it is encrypted, as RFC 7396 does when an object
        patch replaces a non-object: merging the encrypted patch and decrypting
        gives what merging the plaintext patch gives when the secret fields are
        *replaced* fields. Validate the plaintext patch (``StateData.compile``)
        before encrypting it: limits and checks cannot see inside a ciphertext.
        """

        def seal(path: Path, value: Any) -> str:
            # What a replaced field would store: an object patch merged into nothing.
            return self.encrypt(user_id, path, drop_nones(value) if type(value) is dict else value)

        return self._transform(dict(patch), (), secret, seal)

    def encrypt_value(self, at: Path, value: JSON, user_id: str, secret: Collection[Path]) -> JSON:
        """Encrypt what ``value``, about to be written at ``at``, holds at secret paths.

        For writes of one field (``set_preserved(path, value)``): ``at`` may be a
        secret path (the value is encrypted whole), an ancestor of secret paths
        (those inside ``value`` are encrypted), or unrelated (``value`` is
        returned unchanged).

        Raises:
            ValidationError: ``at`` lies strictly inside a secret field, which can
                only be written whole.
        """
        for path in secret:
            if len(at) > len(path) and at[: len(path)] == path:
                raise ValidationError(
                    f"{format_path(at)} lies inside the encrypted field {format_path(path)}, "
                    "which can only be written whole"
                )
        if not at:
            if not isinstance(value, dict):
                return value
            return self.encrypt_document(value, user_id, secret)
        holder: JSONObject = {at[-1]: value}
        out = self._transform(holder, at[:-1], secret, lambda p, v: self.encrypt(user_id, p, v))
        result: JSON = out[at[-1]]
        return result

    def decrypt_document(
        self, doc: JSONObject, user_id: str, secret: Collection[Path]
    ) -> JSONObject:
        """A copy of a stored document with each token at a secret path decrypted.

        Plaintext values at secret paths (written before encryption was on) are
        kept as they are. The input is never changed (objects on the way are
        copied, the rest is shared); when no value changes, ``doc`` itself is
        returned.

        Raises:
            DecryptionError: a token cannot be decrypted (names user and field).
        """
        return self._transform(doc, (), secret, lambda p, v: self.decrypt(user_id, p, v))

    def needs_reencryption(self, doc: JSONObject, secret: Collection[Path]) -> bool:
        """True when a secret path holds plaintext or a token of a key other than the current.

        This only reads the tokens' key ids (no decryption, so no user id is
        needed and nothing is authenticated): a value that starts with
        ``csenc:`` but names no valid key id counts, and
        :meth:`reencrypt_document` then raises for it.
        """
        for path in secret:
            value = lookup(doc, path)
            if value is MISSING or value is None:
                continue
            if key_id_of(value) != self._current:
                return True
        return False

    def reencrypt_document(
        self, doc: JSONObject, user_id: str, secret: Collection[Path]
    ) -> JSONObject:
        """A copy of ``doc`` whose secret values are all encrypted with the current key.

        Plaintext values are encrypted, tokens of older keys are decrypted and
        encrypted again; tokens of the current key are kept byte for byte. When
        nothing needs it, ``doc`` itself is returned, so ``result is doc``
        tells the re-encryption command it can skip the write.

        Raises:
            DecryptionError: a token cannot be decrypted with any configured key.
        """
        if not self.needs_reencryption(doc, secret):
            return doc

        def redo(path: Path, value: JSON) -> JSON:
            if key_id_of(value) == self._current:
                return value
            return self.encrypt(user_id, path, self._open(user_id, path, value, lenient=True))

        return self._transform(doc, (), secret, redo)

    def _transform(
        self,
        root: JSONObject,
        base: Path,
        secret: Collection[Path],
        change: Callable[[Path, Any], Any],
    ) -> JSONObject:
        """Apply ``change(path, value)`` at each secret path present under ``root``.

        ``root`` sits at ``base`` in the document. Shorter paths go first, so a
        secret inside another (refused by :func:`secret_paths`) is never seen
        twice. Objects on the way are copied once each, on first write.
        """
        out = root
        copied: set[int] = set()
        for path in sorted(secret, key=len):
            if len(path) <= len(base) or path[: len(base)] != base:
                continue
            rel = path[len(base) :]
            parents = []
            node: Any = out
            for key in rel[:-1]:
                if type(node) is not dict or key not in node:
                    break
                parents.append(node)
                node = node[key]
            else:
                if type(node) is not dict or rel[-1] not in node or node[rel[-1]] is None:
                    continue
                new = change(path, node[rel[-1]])
                if new is node[rel[-1]]:
                    continue
                # Copy the objects from the root down to the value's holder.
                chain = [*parents, node]
                fresh = [obj if id(obj) in copied else dict(obj) for obj in chain]
                for i in range(1, len(fresh)):
                    fresh[i - 1][rel[i - 1]] = fresh[i]
                fresh[-1][rel[-1]] = new
                copied.update(id(obj) for obj in fresh)
                out = fresh[0]
        return out


def _as_path(path: Path | str) -> Path:
    return parse_path(path) if isinstance(path, str) else path


def _check_user(user_id: object) -> None:
    """Check a user id; :func:`_aad` binds its NFC form, as the services name users."""
    if not isinstance(user_id, str):
        raise InvalidUserIdError(f"a user id must be a str, not {type(user_id).__name__}")


def _aad(key_id: str, user_id: str, path: Path) -> bytes:
    if not user_id.isascii():
        user_id = unicodedata.normalize("NFC", user_id)  # one user, whichever form is given
    # ensure_ascii: the same bytes whatever the text, lone surrogates included.
    return json.dumps(
        [_AAD_TAG, VERSION, key_id, user_id, list(path)], ensure_ascii=True, separators=(",", ":")
    ).encode("ascii")


def _fail(user_id: str, path: Path, key_id: str | None, reason: str, why: str) -> NoReturn:
    where = format_path(path)
    raise DecryptionError(
        f"the secret value at {where} of user {user_id!r} {why}",
        user_id=user_id,
        path=where,
        key_id=key_id,
        reason=reason,
    ) from None  # the cipher's or decoder's own error could quote plaintext bytes
