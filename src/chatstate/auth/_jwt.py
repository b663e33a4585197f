"""Reading and checking JWTs with PyJWT: pure, no I/O."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import attrs
import jwt

from chatstate._redact import fingerprint
from chatstate.exceptions import (
    ConfigurationError,
    ExpiredTokenError,
    ImmatureTokenError,
    InvalidTokenError,
)

__all__ = ["TokenInfo", "TokenVerifier", "fingerprint", "read_token"]

_HMAC: Final = frozenset({"HS256", "HS384", "HS512"})
_ASYMMETRIC: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_SAFE_KID: Final = re.compile(r"[A-Za-z0-9_.:=+-]{1,128}")

KeyResolver = Callable[[str | None], Any]


@attrs.frozen
class TokenInfo:
    """What chatstate read from a token. The token itself is never kept here.

    Attributes:
        fingerprint: See :func:`fingerprint`.
        expires_at: The ``exp`` claim as an aware UTC datetime, or ``None`` if absent.
        algorithm: The ``alg`` of its header.
    """

    fingerprint: str
    expires_at: datetime | None
    algorithm: str

    def expires_within(self, margin: timedelta, now: datetime | None = None) -> bool:
        """True when the token has lapsed or lapses within ``margin``."""
        if self.expires_at is None:
            return False
        now = now or datetime.now(UTC)
        return self.expires_at - now <= margin

    def expired(self, now: datetime | None = None) -> bool:
        """True when ``exp`` has passed."""
        return self.expires_within(timedelta(0), now)


def _check_shape(token: object) -> str:
    if not isinstance(token, str) or not token:
        raise InvalidTokenError("the token must be a non-empty str")
    if token.count(".") != 2 or any(c.isspace() for c in token):
        raise InvalidTokenError("the token is not a JWT (three dot-separated parts)")
    return token


def _header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidTokenError("the token's header is not valid JWT") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise InvalidTokenError("the token is unsigned (alg none) or names no algorithm")
    return header


def _info(token: str, header: dict[str, Any], claims: dict[str, Any]) -> TokenInfo:
    exp = claims.get("exp")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
        raise InvalidTokenError("the token's exp claim is not a number")
    expires_at = None if exp is None else datetime.fromtimestamp(exp, UTC)
    return TokenInfo(fingerprint(token), expires_at, str(header["alg"]))


def read_token(token: object) -> TokenInfo:
    """Read a token's expiry WITHOUT checking its signature.

    Use this when another service issued the token and the bot only needs to
    know when to refresh it. Anyone can forge such a token's contents: never
    base an authorisation decision on what this returns. Unsigned tokens
    (``alg: none``) are refused all the same.

    Raises:
        InvalidTokenError: not a JWT, undecodable, unsigned, or a non-numeric ``exp``.
    """
    token = _check_shape(token)
    header = _header(token)
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise InvalidTokenError("the token's payload is not valid JWT") from None
    return _info(token, header, claims)


@attrs.frozen
class TokenVerifier:
    """Verifies a token's signature and claims with PyJWT before trusting its expiry.

    Args:
        key: The key (an HMAC secret, a public key in PEM, a key object) or a
            callable that gets the header's ``kid`` and returns the key. A
            ``kid`` is only passed on if it is short and holds no path or
            control characters.
        algorithms: The algorithms to accept: required, never ``none``, and
            either all HMAC (HS*) or all asymmetric (RS*, PS*, ES*, EdDSA), so a
            public key can never be used as an HMAC secret.
        leeway: Clock skew to allow on ``exp``, ``nbf`` and ``iat``.
        audience: If set, the ``aud`` claim must match.
        issuer: If set, the ``iss`` claim must match.

    Raises:
        ConfigurationError: the algorithm list is empty, names ``none``, an unknown
            algorithm, or mixes HMAC with asymmetric ones.
    """

    key: Any = attrs.field(repr=False)
    algorithms: tuple[str, ...] = attrs.field(converter=tuple)
    leeway: timedelta = timedelta(seconds=5)
    audience: str | None = None
    issuer: str | None = None

    @algorithms.validator
    def _check_algorithms(self, _attr: object, value: Sequence[str]) -> None:
        algs = set(value)
        if not algs:
            raise ConfigurationError("give at least one algorithm")
        unknown = algs - _HMAC - _ASYMMETRIC
        if unknown:
            raise ConfigurationError(f"unsupported or unsafe algorithms: {sorted(unknown)}")
        if algs & _HMAC and algs & _ASYMMETRIC:
            raise ConfigurationError(
                "never mix HMAC (HS*) and asymmetric algorithms in one verifier"
            )

    def verify(self, token: object) -> TokenInfo:
        """Check the signature and the time claims; return what the token says.

        Raises:
            InvalidTokenError: malformed, bad signature, wrong algorithm, unsafe
                ``kid``, missing ``exp``, wrong audience or issuer.
            ExpiredTokenError: ``exp`` has passed (beyond ``leeway``).
            ImmatureTokenError: ``nbf`` or ``iat`` lies in the future.
        """
        token = _check_shape(token)
        header = _header(token)
        if header["alg"] not in self.algorithms:
            raise InvalidTokenError(f"the token's algorithm {header['alg']!r} is not accepted")
        key = self.key
        if callable(key):
            kid = header.get("kid")
            if kid is not None and (
                not isinstance(kid, str) or not _SAFE_KID.fullmatch(kid) or ".." in kid
            ):
                raise InvalidTokenError("the token's kid holds characters that are not allowed")
            key = key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                leeway=self.leeway,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise ExpiredTokenError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise ImmatureTokenError(
                "the token is not valid yet (nbf or iat in the future)"
            ) from None
        except jwt.PyJWTError as exc:
            raise InvalidTokenError(
                f"the token failed verification ({type(exc).__name__})"
            ) from None
        return _info(token, header, claims)
