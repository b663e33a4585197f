"""The context every prompt, validator, cleaner, branch, hook and handler can ask for.

A callable takes its usual argument (the answer, or the data collected so far)
and, when it declares a second positional parameter, the :class:`Context` as
well::

    def check_pin(answer, ctx):            # a validator with the context
        return None if ctx.deps.bank.pin_ok(ctx.user_id, answer) else "Wrong PIN."

    def positive(answer):                  # the simple form still works
        return None if answer.isdigit() else "A number, please."

Whatever a callable stages on the context (a patch, a preserved field such as a
token, the next flow, the user's language) is written in the same atomic write
that ends the step, or not at all.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol

from typing_extensions import TypeVar

from chatstate._actions import SET_TOKEN, failing
from chatstate.exceptions import ConfigurationError, UsageError
from chatstate.flow._message import Message
from chatstate.flow._scheduled import scheduled_entry
from chatstate.flow._sending import check_key
from chatstate.state import Document, Snapshot, parse_path
from chatstate.typing import JSONObject

if TYPE_CHECKING:
    from chatstate.auth import TokenVerifier
    from chatstate.flow._flow import Flow
    from chatstate.state import StateData
    from chatstate.typing import Path

__all__ = ["Context", "Translations", "Turn"]

DepsT = TypeVar("DepsT", default=Any)


class _Gettext(Protocol):
    def gettext(self, message: str, /) -> str: ...


Catalogue = Mapping[str, str] | _Gettext
Translations = Mapping[str, Catalogue] | Callable[[str, str], str]
"""A mapping from a language code to a catalogue (a mapping from the English
text to its translation, or a :mod:`gettext` translations object), or a function
``(text, language) -> translated text``."""


def _identity(text: str) -> str:
    return text


class Catalogues:
    """The router's translations: one translate function per language."""

    def __init__(self, translations: Translations | None, default_language: str) -> None:
        if not isinstance(default_language, str) or not default_language:  # type: ignore[redundant-expr]  # callers may be untyped
            raise ConfigurationError(
                "default_language must be a non-empty language code such as 'en'"
            )
        self.default = default_language
        self._source = translations
        self.languages: frozenset[str] | None = None  # None: any code (a function decides)
        self._cache: dict[str, Callable[[str], str]] = {}
        if translations is None:
            self.languages = frozenset({default_language})
        elif isinstance(translations, Mapping):
            for code, catalogue in translations.items():
                if not isinstance(code, str) or not (  # type: ignore[redundant-expr]  # callers may be untyped
                    isinstance(catalogue, Mapping) or callable(getattr(catalogue, "gettext", None))
                ):
                    raise ConfigurationError(
                        "translations maps a language code to a mapping of texts "
                        f"or a gettext translations object; {code!r} does not"
                    )
            self.languages = frozenset(translations) | {default_language}
        elif not callable(translations):
            raise ConfigurationError(
                "translations must be a mapping of language codes or a function (text, language)"
            )

    def pick(self, stored: object) -> str:
        """The language of a user whose stored language field holds ``stored``."""
        if (
            isinstance(stored, str)
            and stored
            and (self.languages is None or stored in self.languages)
        ):
            return stored
        return self.default

    def accepts(self, language: str) -> bool:
        """True when ``language`` has (or may have) a catalogue."""
        return (
            isinstance(language, str)  # type: ignore[redundant-expr]  # callers may be untyped
            and bool(language)
            and (self.languages is None or language in self.languages)
        )

    def translator(self, language: str) -> Callable[[str], str]:
        """The function that translates one text into ``language`` (untranslated texts stay)."""
        found = self._cache.get(language)
        if found is not None:
            return found
        source = self._source
        translate: Callable[[str], str]
        if source is None:
            translate = _identity
        elif isinstance(source, Mapping):
            catalogue = source.get(language)
            if catalogue is None:
                translate = _identity
            elif isinstance(catalogue, Mapping):
                table = catalogue

                def translate(text: str) -> str:
                    found = table.get(text)
                    return found if isinstance(found, str) and found else text
            else:
                translate = catalogue.gettext
        else:
            function = source

            def translate(text: str) -> str:
                return function(text, language)

        self._cache[language] = translate
        return translate


class _Staging(Protocol):
    """Where a context's changes go: the claim of the message being handled."""

    def update(self, patch: Mapping[str, Any]) -> None: ...

    def assign(self, values: Mapping[Any, Any]) -> None: ...

    def set_preserved(self, path: str | Path, value: Any) -> None: ...


class _StateView(Mapping[str, Any]):
    """A read-only view of the stored document whose repr hides preserved and secret fields."""

    __slots__ = ("_data", "_hidden")

    def __init__(self, data: JSONObject, hidden: frozenset[Path]) -> None:
        self._data = data
        self._hidden = hidden

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        return repr(Document(Snapshot(self._data), self._hidden))


class Context(Generic[DepsT]):
    """What a prompt, validator, cleaner, branch, hook or handler knows, and may change.

    Read:
        user_id, message, state (the stored document as the message found it,
        read-only), data (what the flow collected so far; the whole answer set
        in ``on_complete``), deps (the object given to the router as ``deps=``),
        language, authenticated, flow and step (names, or ``None``),
        idempotency_key, now.

    Change, all in the one atomic write that ends the step (nothing is written
    if the handling fails): :meth:`update`, :meth:`assign`,
    :meth:`set_preserved`, :meth:`log_in`, :meth:`log_out`,
    :meth:`set_language`, :meth:`start`, :meth:`schedule`, :meth:`cancel_scheduled`.
    """

    __slots__ = (
        "_catalogues",
        "_doc",
        "_flows",
        "_language_field",
        "_next_flow",
        "_protected",
        "_rules",
        "_scheduled_field",
        "_staging",
        "_translate",
        "_wakes",
        "authenticated",
        "data",
        "deps",
        "flow",
        "language",
        "message",
        "now",
        "step",
    )

    def __init__(
        self,
        *,
        message: Message,
        state: JSONObject,
        deps: DepsT,
        authenticated: bool,
        catalogues: Catalogues,
        rules: StateData,
        staging: _Staging | None,
        flows: Mapping[str, type[Flow]],
        protected: str,
        language_field: str,
        scheduled_field: str = "scheduled",
        flow: str | None = None,
        step: str | None = None,
        data: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        self.message = message
        """The message being handled."""
        self.now: float = (
            now
            if now is not None
            else (message.timestamp if message.timestamp is not None else time.time())
        )
        """When the message is handled, Unix seconds: its timestamp, else the router's clock.

        Deadlines the step stores (``schedule``) are measured against it, so
        compare with it rather than ``time.time()``: a test clock moves it too."""
        self._doc = state
        self.deps: DepsT = deps
        """The bot's own services, as given to the router (``deps=``)."""
        self.authenticated = authenticated
        """True when the user is logged in (changes at once with :meth:`log_in`)."""
        self.flow = flow
        """The active flow's name, or ``None``."""
        self.step = step
        """The active step's name, or ``None``."""
        self.data: dict[str, Any] = data if data is not None else {}
        """What the flow has collected so far."""
        self._catalogues = catalogues
        self._rules = rules
        self._staging = staging
        self._flows = flows
        self._protected = protected
        self._language_field = language_field
        self._next_flow: type[Flow] | None = None
        self._scheduled_field = scheduled_field
        self._wakes: list[int] = []
        self.language = catalogues.pick(state.get(language_field))
        """The user's language code (the stored one, else the router's default)."""
        self._translate = catalogues.translator(self.language)

    @property
    def state(self) -> Mapping[str, Any]:
        """The user's stored document as the message found it (read-only).

        Its repr hides preserved and secret fields.
        """
        return _StateView(self._doc, self._rules.redacted_fields)

    def __repr__(self) -> str:
        return (
            f"<Context user_id={self.user_id!r} flow={self.flow!r} step={self.step!r} "
            f"language={self.language!r}>"
        )

    @property
    def user_id(self) -> str:
        """The sender."""
        return self.message.user_id

    @property
    def idempotency_key(self) -> str:
        """The key for other services' effects of this message (:attr:`Message.idempotency_key`)."""
        return self.message.idempotency_key

    def t(self, text: str, /, **values: Any) -> str:
        """``text`` in the user's language, then ``str.format``-ed with ``values``.

        Examples:
            ``ctx.t("Sent {amount} credits.", amount=25)``
        """
        translated = self._translate(text)
        return translated.format(**values) if values else translated

    # -- staged changes --------------------------------------------------------

    def _stage(self) -> _Staging:
        if self._staging is None:
            raise UsageError("this context cannot change state (it belongs to a finished message)")
        return self._staging

    def _guard(self, keys: Any) -> None:
        for key in keys:
            path = parse_path(key) if isinstance(key, str | tuple) else (key,)
            if path and path[0] == self._scheduled_field:
                raise UsageError(
                    f"the field {self._scheduled_field!r} is the router's own: "
                    "use ctx.schedule() and ctx.cancel_scheduled()"
                )
            if path and path[0] == self._protected:
                raise UsageError(
                    f"the field {self._protected!r} is the router's own: "
                    "move between flows with ctx.start()"
                )

    def update(self, patch: Mapping[str, Any]) -> None:
        """Stage a merge patch of the user's state (see :meth:`StateService.update`)."""
        self._guard(patch.keys() if isinstance(patch, Mapping) else ())  # type: ignore[redundant-expr]  # callers may be untyped
        self._stage().update(patch)

    def assign(self, values: Mapping[Any, Any]) -> None:
        """Stage exact values (see :meth:`StateService.assign`)."""
        self._guard(values.keys() if isinstance(values, Mapping) else ())  # type: ignore[redundant-expr]  # callers may be untyped
        self._stage().assign(values)

    def set_preserved(self, path: str | Path, value: Any) -> None:
        """Stage a preserved field (``None`` removes it)."""
        self._stage().set_preserved(path, value)

    def log_in(self, token: str, *, verifier: TokenVerifier | None = None) -> None:
        """Stage the user's JWT in the preserved token field; the user counts as logged in at once.

        The token is checked first (see :func:`chatstate.auth.set_jwt_token`).

        Raises:
            InvalidTokenError: not a signed JWT (the message never holds the token).
        """
        from chatstate.auth import read_token  # noqa: PLC0415 - auth imports flow lazily

        with failing(SET_TOKEN):
            if verifier is not None:
                verifier.verify(token)
            else:
                read_token(token)
        self._stage().set_preserved(self._rules.token_field, token)
        self.authenticated = True

    def log_out(self) -> None:
        """Stage the removal of the user's token; the user counts as logged out at once."""
        self._stage().set_preserved(self._rules.token_field, None)
        self.authenticated = False

    def set_language(self, language: str) -> None:
        """Stage the user's language; the rest of this message's replies use it already.

        Raises:
            UsageError: the router has no catalogue for ``language``.
        """
        if not self._catalogues.accepts(language):
            raise UsageError(f"no translations for language {language!r}")
        field = self._language_field
        if (field,) in self._rules.preserved:
            self._stage().set_preserved(field, language)
        else:
            self._stage().update({field: language})
        self.language = language
        self._translate = self._catalogues.translator(language)

    def start(self, flow: type[Flow] | str) -> None:
        """Start ``flow`` when this step or hook is done (its first prompt follows the replies).

        Raises:
            UsageError: the router does not know the flow (add it to a menu or to ``flows=``).
        """
        name = flow if isinstance(flow, str) else getattr(flow, "name", None)
        known = self._flows.get(name) if isinstance(name, str) else None
        if known is None or (not isinstance(flow, str) and known is not flow):
            raise UsageError(
                f"the router does not know the flow {name!r}: put it in a menu or in flows="
            )
        self._stage()
        self._next_flow = known

    def schedule(
        self,
        key: str,
        at: float | datetime,
        replies: Any = None,
        *,
        start: type[Flow] | str | None = None,
    ) -> None:
        """Stage a message to the user at ``at``; the same ``key`` again moves or replaces it.

        See :meth:`Router.schedule <chatstate.flow.Router.schedule>` (the same
        arguments); here it is written with this step, or not at all.

        Raises:
            UsageError: a bad key, time, reply or flow.
        """
        entry = scheduled_entry(key, at, replies, start, self._flows)
        self._stage().update({self._scheduled_field: {key: entry}})
        self._wakes.append(entry[0])

    def cancel_scheduled(self, key: str) -> None:
        """Stage the removal of the scheduled message ``key`` (nothing if there is none)."""
        check_key(key, "key")
        stored = self._doc.get(self._scheduled_field)
        if isinstance(stored, dict) and key in stored:
            self._stage().update({self._scheduled_field: {key: None}})


Turn = Context
"""The former name of :class:`Context`."""


# -- calling user code ------------------------------------------------------------


def _unwrap(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def is_async(fn: Any) -> bool:
    """True when ``fn`` surely returns a coroutine (async def, or an async ``__call__``)."""
    fn = _unwrap(fn)
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    call = None if inspect.isroutine(fn) else type(fn).__dict__.get("__call__")
    return call is not None and inspect.iscoroutinefunction(call)


def arity(fn: Callable[..., Any]) -> int:
    """How many positional arguments ``fn`` wants: 1, or 2 when it takes the context too.

    A second positional parameter without a default (or ``*args``) means the
    context; builtins whose signature cannot be read (``int``) take one.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    names: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return 2
        if parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ) and (
            parameter.default is inspect.Parameter.empty or parameter.name in ("ctx", "context")
        ):
            names.append(parameter.name)
    if names in (["ctx"], ["context"]):
        # (ctx) alone would be handed the answer or the data, never the context.
        raise UsageError(
            f"{getattr(fn, '__qualname__', fn)!r} takes only {names[0]!r}: its first "
            "parameter gets the answer (or the flow's data), the context comes second; "
            f"write ({'self, ' if inspect.ismethod(fn) else ''}value, {names[0]})"
        )
    return 2 if len(names) >= 2 else 1


class Call:
    """A user callable with its calling convention decided once, when it is declared."""

    __slots__ = ("fn", "is_async", "with_context")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.with_context = arity(fn) == 2
        self.is_async = is_async(fn)

    def __call__(self, value: Any, ctx: Context[Any]) -> Any:
        return self.fn(value, ctx) if self.with_context else self.fn(value)

    async def run(self, value: Any, ctx: Context[Any]) -> Any:
        """Call and await the result if it is awaitable."""
        result = self(value, ctx)
        if inspect.isawaitable(result):
            result = await result
        return result


async def maybe_await(value: Any) -> Any:
    """``value``, awaited when it is awaitable."""
    return await value if inspect.isawaitable(value) else value
