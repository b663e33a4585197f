"""The Flow base class: a multi-step conversation, checked when it is defined.

A flow is a class whose attributes are :class:`Step` objects::

    class Transfer(Flow):
        amount = Step("How many credits?", validate=positive_int, clean=int, next="to")
        to = Step("Who receives them?", next="confirm")
        confirm = Step(confirm_screen, next={"yes": DONE, "no": "amount"})

        def on_complete(self, data):
            return Text(f"Sent {data['amount']} to {data['to']}.")

The first step is the first one declared (or ``first = "name"``). ``next`` is a
step name, :data:`DONE`, a dict from the cleaned answer to a target, or a
callable of the collected data with its possible ``targets`` declared. When
the class is created, :meth:`Flow.__init_subclass__` checks duplicate data
keys, unknown targets, unreachable steps and a missing first step, and raises
:class:`~chatstate.exceptions.InvalidFlowDefinition` at import.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeAlias

import attrs

from chatstate.exceptions import InvalidFlowDefinition
from chatstate.flow._context import Call, Context, arity
from chatstate.flow._message import KINDS, Message
from chatstate.flow._screens import Buttons, ListScreen, Screen, Text, translate_screen

if TYPE_CHECKING:
    from chatstate.flow._context import Turn

__all__ = ["DONE", "Flow", "Invalid", "Step"]

DONE: Final = "__done__"
"""The target that completes a flow."""

Prompt: TypeAlias = "str | Screen | Callable[..., str | Screen | Awaitable[str | Screen]]"
Validator: TypeAlias = Callable[..., "str | Awaitable[str | None] | None"]
Cleaner: TypeAlias = Callable[..., Any]
Brancher: TypeAlias = Callable[..., "str | Awaitable[str]"]
Replies: TypeAlias = "Screen | str | Sequence[Screen | str] | None"

INVALID_TEXT: Final = "Sorry, that is not a valid answer."
CHOICES_TEXT: Final = "Please answer one of: {choices}."
SEND_TEXT: Final = "Please send text."
SEND_KIND_TEXT: Final = "Please send {kinds}."
KIND_NAMES: Final = {
    "text": "text",
    "image": "a photo",
    "audio": "a voice message",
    "video": "a video",
    "document": "a document",
    "sticker": "a sticker",
    "location": "a location",
    "contacts": "a contact",
    "reaction": "a reaction",
}


class Invalid(Exception):  # noqa: N818 - reads as "the answer is invalid"
    """Raise from a ``validate`` or ``clean`` function to re-prompt with ``message``."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    to_json = getattr(value, "to_json", None)
    return to_json() if callable(to_json) else value


def _bad(message: str) -> InvalidFlowDefinition:
    return InvalidFlowDefinition(message, flow="?")


def _targets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise _bad(f"Step(targets=...) takes a collection of step names, not {value!r}")
    targets = tuple(value)
    if not all(isinstance(t, str) for t in targets):
        raise _bad(f"Step(targets=...) takes step names (str), got {targets!r}")
    return targets


def _check_prompt(_step: Step, _attribute: Any, value: Any) -> None:
    if not (isinstance(value, str | Text | Buttons | ListScreen) or callable(value)):
        raise _bad(
            "Step(prompt) must be a str, a screen (Text, Buttons, ListScreen) or a function, "
            f"not {type(value).__name__}"
        )


def _check_next(_step: Step, _attribute: Any, value: Any) -> None:
    if not (isinstance(value, str | Mapping) or callable(value)):
        raise _bad(
            "Step(next=...) must be a step name, DONE, a dict or a function, "
            f"not {type(value).__name__}"
        )


def _check_key(_step: Step, _attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise _bad(f"Step(key=...) must be a non-empty str or None, not {value!r}")


def _check_attempts(_step: Step, _attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"Step(max_attempts=...) must be a whole number of at least 1, not {value!r}")


def _check_text(_step: Step, attribute: Any, value: Any) -> None:
    if value is None and attribute.name == "wrong_kind_message":
        return
    if not isinstance(value, str) or not value:
        raise _bad(f"Step({attribute.name}=...) must be a non-empty str, not {value!r}")


def _accepts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, str | Iterable):
        raise _bad(f"Step(accepts=...) takes a kind or a collection of kinds, not {value!r}")
    kinds = (value,) if isinstance(value, str) else tuple(value)
    for kind in kinds:
        if kind not in KINDS or kind in ("reply", "status", "unsupported"):
            raise InvalidFlowDefinition(
                f"Step(accepts=...) got {kind!r}; use 'text' (typed text and taps) or one of "
                + ", ".join(sorted(KIND_NAMES)),
                flow="?",
            )
    if not kinds:
        raise InvalidFlowDefinition("Step(accepts=()) accepts nothing", flow="?")
    return kinds


def _on_too_many(_step: Step, _attribute: Any, value: str) -> None:
    if value not in ("cancel", "restart"):
        raise InvalidFlowDefinition(
            f"Step(on_too_many={value!r}): must be 'cancel' or 'restart'", flow="?"
        )


def _callable(_step: Step, attribute: Any, value: Any) -> None:
    if value is not None and not callable(value):
        raise InvalidFlowDefinition(
            f"Step({attribute.name}=...) must be callable, not {type(value).__name__}", flow="?"
        )


_CALLABLE_FIELDS: Final = ("prompt", "validate", "clean", "next")


@attrs.frozen
class Verdict:
    """What a step made of a message: accepted (with the value), or a re-prompt."""

    ok: bool
    value: Any = None
    error: str = ""
    counts: bool = True  # an invalid answer counts toward max_attempts; a wrong kind does not


@attrs.define(eq=False)
class Step:
    """One question of a flow.

    Every callable may take the :class:`~chatstate.flow.Context` as a second
    positional parameter (``validate(answer, ctx)``); sync or async (async
    ones need :class:`~chatstate.flow.AsyncRouter`).

    Args:
        prompt: What to send: a str or a :data:`Screen` (both translated into
            the user's language), or a callable of the data collected so far
            that returns one (sync or async).
        validate: Gets the answer; returns an error message to re-prompt with,
            or ``None`` when the answer is fine; may raise :class:`Invalid`.
        clean: Turns the answer into the value to store; may raise
            :class:`Invalid` to re-prompt with its message, or ``ValueError``
            (as ``int`` does) to re-prompt with ``invalid_message``.
        next: Where to go: a step name, :data:`DONE`, a dict from the cleaned
            value to a target (``"*"`` for any other value), or a callable of
            the data (declare ``targets``).
        targets: The targets a callable ``next`` may return.
        key: The data key the value is stored under (default: the step's name).
        max_attempts: Invalid answers in a row before ``on_too_many`` happens.
        on_too_many: ``"cancel"`` the flow or ``"restart"`` it.
        invalid_message: The re-prompt when ``clean`` raises ``ValueError``.
        accepts: The kinds of message the step takes: ``"text"`` (typed text
            and button taps, the default), or any of ``"image"``, ``"audio"``,
            ``"video"``, ``"document"``, ``"sticker"``, ``"location"``,
            ``"contacts"``, ``"reaction"``. A media step's answer is the
            :class:`~chatstate.flow.Media` (a location step's the
            :class:`~chatstate.flow.Location`, ...); stored as a JSON object
            unless ``clean`` makes it something else.
        wrong_kind_message: The re-prompt for a message of another kind
            (default: "Please send text." or "Please send a photo." and so on);
            it does not count as an attempt.
        secret: The answer is a secret (a PIN, a password): it is stored
            encrypted in the flow's progress (``<flow_field>.data.<key>``)
            from the moment it is stored, and redacted by ``export()`` and in
            reprs; validators, hooks and ``next`` get it in plaintext. The
            router refuses to start unless the service's rules encrypt that
            path (``StateData(encryption=..., secret=[..., "flow.data.<key>"])``).
    """

    prompt: Prompt = attrs.field(validator=_check_prompt)
    validate: Validator | None = attrs.field(default=None, validator=_callable)
    clean: Cleaner | None = attrs.field(default=None, validator=_callable)
    next: str | Mapping[Any, str] | Brancher = attrs.field(default=DONE, validator=_check_next)
    targets: tuple[str, ...] = attrs.field(default=(), converter=_targets)
    key: str | None = attrs.field(default=None, validator=_check_key)
    max_attempts: int = attrs.field(default=3, validator=_check_attempts)
    on_too_many: Literal["cancel", "restart"] = attrs.field(
        default="cancel", validator=_on_too_many
    )
    invalid_message: str = attrs.field(default=INVALID_TEXT, validator=_check_text)
    accepts: tuple[str, ...] = attrs.field(default=("text",), converter=_accepts)
    wrong_kind_message: str | None = attrs.field(default=None, validator=_check_text)
    secret: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    name: str = attrs.field(default="", init=False)
    owners: list[tuple[type, str]] = attrs.field(factory=list, init=False, repr=False)
    _calls: dict[str, Call] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        for field in _CALLABLE_FIELDS:
            self._call(field)

    def _call(self, field: str) -> Call | None:
        """The user callable of ``field`` with its convention (re-read if it was replaced)."""
        fn = getattr(self, field)
        call = self._calls.get(field)
        if call is not None and call.fn is fn:
            return call
        if not callable(fn) or isinstance(fn, str | Mapping):
            self._calls.pop(field, None)
            return None
        call = self._calls[field] = Call(fn)
        return call

    def __set_name__(self, owner: type, name: str) -> None:
        self.owners.append((owner, name))
        if not self.name:
            self.name = name
            if self.key is None:
                self.key = name

    def copy(self) -> Step:
        """A fresh step with the same arguments (to use one definition in two flows)."""
        fields = attrs.fields(Step)
        kwargs = {f.name: getattr(self, f.name) for f in fields if f.init}
        kwargs["key"] = None if self.key == self.name else self.key
        return Step(**kwargs)

    def callables(self) -> list[tuple[str, Call]]:
        """The step's user callables, by argument name."""
        found = [(field, self._call(field)) for field in _CALLABLE_FIELDS]
        return [(field, call) for field, call in found if call is not None]

    def possible_targets(self) -> tuple[str, ...]:
        """Every target this step can lead to."""
        if isinstance(self.next, str):
            return (self.next,)
        if isinstance(self.next, Mapping):
            return tuple(dict.fromkeys(self.next.values()))
        return self.targets

    async def render(self, ctx: Context[Any]) -> Screen:
        """The prompt as a screen, for the data collected so far, in the user's language."""
        call = self._call("prompt")
        if call is not None:
            prompt = await call.run(ctx.data, ctx)
            return Text(prompt) if isinstance(prompt, str) else prompt
        if isinstance(self.prompt, str):
            return Text(ctx.t(self.prompt))
        return translate_screen(self.prompt, ctx.t)  # type: ignore[arg-type]

    def _wrong_kind(self, ctx: Context[Any]) -> str:
        if self.wrong_kind_message is not None:
            return ctx.t(self.wrong_kind_message)
        if self.accepts == ("text",):
            return ctx.t(SEND_TEXT)
        names = " / ".join(ctx.t(KIND_NAMES[k]) for k in self.accepts)
        return ctx.t(SEND_KIND_TEXT, kinds=names)

    def takes(self, message: Message) -> bool:
        """True when the message is of a kind this step accepts."""
        if message.is_text:
            return "text" in self.accepts
        return message.kind in self.accepts

    async def accept(self, message: Message, ctx: Context[Any]) -> Verdict:
        """Check and clean a message's answer."""
        if not self.takes(message):
            return Verdict(ok=False, error=self._wrong_kind(ctx), counts=False)
        answer: Any = message.answer if message.is_text else message.payload
        try:
            validate = self._call("validate")
            if validate is not None:
                error = await validate.run(answer, ctx)
                if error:
                    return Verdict(ok=False, error=str(error))
            value: Any = answer
            clean = self._call("clean")
            if clean is not None:
                try:
                    value = await clean.run(answer, ctx)
                except ValueError:
                    return Verdict(ok=False, error=ctx.t(self.invalid_message))
        except Invalid as exc:
            return Verdict(ok=False, error=exc.message)
        if isinstance(self.next, Mapping) and value not in self.next and "*" not in self.next:
            choices = ", ".join(str(k) for k in self.next if k != "*")
            return Verdict(ok=False, error=ctx.t(CHOICES_TEXT, choices=choices))
        return Verdict(ok=True, value=_to_json(value))

    async def target(self, value: Any, ctx: Context[Any]) -> str:
        """Where the flow goes after this step accepted ``value``."""
        if isinstance(self.next, str):
            return self.next
        if isinstance(self.next, Mapping):
            return self.next[value] if value in self.next else self.next["*"]
        call = self._call("next")
        assert call is not None
        target = await call.run(ctx.data, ctx)
        if target not in self.targets:
            raise InvalidFlowDefinition(
                f"step {self.name!r} branched to {target!r}, not one of its declared targets",
                flow=ctx.flow or "?",
            )
        return str(target)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


RESERVED: Final = frozenset(
    {
        "name", "first", "timeout", "reminder", "requires_auth", "cancel_words", "back_words",
        "restart_words", "steps", "on_complete", "on_cancel", "on_timeout", "on_reminder",
        "mermaid", "ctx", "turn", "hooks",
    }
)  # fmt: skip
HOOKS: Final = ("on_complete", "on_cancel", "on_timeout", "on_reminder")


def _hook_call(cls: type, name: str) -> bool:
    """True when the hook ``name`` of ``cls`` takes the context (decided from its signature)."""
    fn = inspect.getattr_static(cls, name)
    if isinstance(fn, staticmethod):
        return arity(fn.__func__) == 2
    if isinstance(fn, classmethod):
        return arity(getattr(cls, name)) == 2
    if inspect.isfunction(fn):
        return arity(types.MethodType(fn, object())) == 2
    return arity(getattr(cls, name)) == 2 if callable(getattr(cls, name)) else False


class Flow:
    """Base class of a multi-step conversation. Subclass it and declare :class:`Step` s.

    Class attributes a subclass may set:
        name: The flow's name in state and in menus (default: the class name in snake_case).
        first: The first step (default: the first declared).
        timeout: An idle flow ends after this long (``None``: never): at the
            user's next message, or at once when the bot collects due deadlines
            (:meth:`Router.due`).
        reminder: After this long idle, :meth:`Router.due` sends a reminder
            (``None``: never); must be shorter than ``timeout``.
        requires_auth: Only authenticated users may start it.
        cancel_words, back_words, restart_words: Commands understood at any step.

    Hooks (sync or async) receive the collected data, and the
    :class:`~chatstate.flow.Context` when they declare it
    (``def on_complete(self, data, ctx)``); they return replies (a str, a
    screen, a list of them, or ``None``). Whatever they stage on the context is
    written with the step's end, in one atomic write; if a hook raises, nothing
    is written and a redelivery of the message runs it again.
    """

    name: ClassVar[str] = ""
    first: ClassVar[str] = ""
    timeout: ClassVar[timedelta | None] = None
    reminder: ClassVar[timedelta | None] = None
    requires_auth: ClassVar[bool] = False
    cancel_words: ClassVar[frozenset[str]] = frozenset({"cancel", "stop", "quit"})
    back_words: ClassVar[frozenset[str]] = frozenset({"back"})
    restart_words: ClassVar[frozenset[str]] = frozenset({"restart", "start over"})
    steps: ClassVar[dict[str, Step]] = {}
    hooks: ClassVar[dict[str, bool]] = {}

    def __init__(self, ctx: Context[Any] | None = None) -> None:
        self.ctx = ctx
        """The context of the message being handled."""

    @property
    def turn(self) -> Turn | None:
        """The former name of :attr:`ctx`."""
        return self.ctx

    def __init_subclass__(cls, *, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        steps: dict[str, Step] = {}
        for klass in reversed(cls.__mro__):
            steps.update({a: v for a, v in vars(klass).items() if isinstance(v, Step)})
        cls.steps = steps
        if "name" not in cls.__dict__:
            cls.name = _snake(cls.__name__)
        cls.hooks = {hook: _hook_call(cls, hook) for hook in HOOKS}
        if abstract:
            return
        cls._check_definition()

    @classmethod
    def _check_definition(cls) -> None:  # noqa: C901, PLR0912 - one check per rule, in order
        steps = cls.steps
        flow = cls.__name__
        if not steps:
            raise InvalidFlowDefinition("declares no steps (a first step is required)", flow=flow)
        for name, step in steps.items():
            if name in RESERVED:
                raise InvalidFlowDefinition(
                    f"a step is named {name!r}, which Flow uses itself; rename the step "
                    "(set key= to keep the data key)",
                    flow=flow,
                )
            owner, first_name = step.owners[0]
            if owner not in cls.__mro__ or first_name != name:
                raise InvalidFlowDefinition(
                    f"step {name!r} is the same Step object as {owner.__name__}.{first_name}; "
                    "give each flow its own Step (Step.copy() makes one)",
                    flow=flow,
                )
        cls._check_attributes()
        for attr in ("timeout", "reminder"):
            value = getattr(cls, attr)
            if value is not None and (not isinstance(value, timedelta) or value <= timedelta(0)):
                raise InvalidFlowDefinition(
                    f"{attr} must be a positive timedelta or None", flow=flow
                )
        if cls.reminder is not None and cls.timeout is not None and cls.reminder >= cls.timeout:
            raise InvalidFlowDefinition("reminder must come before timeout", flow=flow)
        if "first" not in cls.__dict__ and cls.first not in steps:
            cls.first = next(iter(steps))
        if cls.first not in steps:
            raise InvalidFlowDefinition(f"first step {cls.first!r} is not a step", flow=flow)
        keys: dict[str, str] = {}
        for name, step in steps.items():
            if step.key in keys:
                raise InvalidFlowDefinition(
                    f"steps {keys[step.key]!r} and {name!r} both store {step.key!r}", flow=flow
                )
            keys[step.key or name] = name
            if not isinstance(step.next, str | Mapping) and not step.targets:
                raise InvalidFlowDefinition(
                    f"step {name!r} branches with a function: declare its targets=", flow=flow
                )
            for target in step.possible_targets():
                if target != DONE and target not in steps:
                    raise InvalidFlowDefinition(
                        f"step {name!r} leads to unknown step {target!r}", flow=flow
                    )
            if not isinstance(step.max_attempts, int) or step.max_attempts < 1:  # type: ignore[redundant-expr]  # callers may be untyped
                raise InvalidFlowDefinition(f"step {name!r} needs max_attempts >= 1", flow=flow)
        reached = {cls.first}
        todo = [cls.first]
        while todo:
            for target in steps[todo.pop()].possible_targets():
                if target in steps and target not in reached:
                    reached.add(target)
                    todo.append(target)
        unreachable = [name for name in steps if name not in reached]
        if unreachable:
            raise InvalidFlowDefinition(f"unreachable steps: {', '.join(unreachable)}", flow=flow)
        if DONE not in {t for s in steps.values() for t in s.possible_targets()}:
            raise InvalidFlowDefinition("no step leads to DONE: the flow never ends", flow=flow)

    @classmethod
    def _check_attributes(cls) -> None:
        """The class attributes a subclass may set: right types; command words casefolded."""
        flow = cls.__name__
        name: object = cls.name
        if not isinstance(name, str) or not name:
            raise InvalidFlowDefinition(f"name must be a non-empty str, not {name!r}", flow=flow)
        requires_auth: object = cls.requires_auth
        if not isinstance(requires_auth, bool):
            raise InvalidFlowDefinition(
                f"requires_auth must be True or False, not {requires_auth!r}", flow=flow
            )
        for attr in ("cancel_words", "back_words", "restart_words"):
            words = getattr(cls, attr)
            if isinstance(words, str) or not isinstance(words, Iterable):
                raise InvalidFlowDefinition(
                    f"{attr} must be a set of words, not {words!r} (a str would match letters)",
                    flow=flow,
                )
            words = frozenset(words)
            if not all(isinstance(w, str) and w.strip() for w in words):
                raise InvalidFlowDefinition(f"{attr} must hold non-empty str words", flow=flow)
            setattr(cls, attr, frozenset(w.strip().casefold() for w in words))

    @classmethod
    def async_callables(cls) -> list[str]:
        """Where this flow has async code (``"Flow.step.validate"``, ``"Flow.on_complete"``)."""
        found = [
            f"{cls.__name__}.{name}.{arg}"
            for name, step in cls.steps.items()
            for arg, call in step.callables()
            if call.is_async
        ]
        found += [
            f"{cls.__name__}.{hook}"
            for hook in HOOKS
            if inspect.iscoroutinefunction(getattr(cls, hook))
        ]
        return found

    async def run_hook(self, hook: str, ctx: Context[Any]) -> Any:
        """Call a hook with the data (and the context if it takes it); await it if needed."""
        fn = getattr(self, hook)
        result = fn(ctx.data, ctx) if self.hooks.get(hook) else fn(ctx.data)
        return await result if inspect.isawaitable(result) else result

    # -- hooks --------------------------------------------------------------

    def on_complete(self, data: dict[str, Any]) -> Replies | Awaitable[Replies]:  # noqa: ARG002
        """Called when the last step is answered, before anything is written; return replies."""
        return None

    def on_cancel(self, data: dict[str, Any], ctx: Context[Any]) -> Replies | Awaitable[Replies]:  # noqa: ARG002
        """Called when the user cancels (or runs out of attempts); return replies."""
        return Text(ctx.t("Cancelled."))

    def on_timeout(self, data: dict[str, Any], ctx: Context[Any]) -> Replies | Awaitable[Replies]:  # noqa: ARG002
        """Called when the flow times out; ``None`` sends the router's ``expired_text`` and menu."""
        return None

    def on_reminder(self, data: dict[str, Any], ctx: Context[Any]) -> Replies | Awaitable[Replies]:  # noqa: ARG002
        """Called when a reminder is due; ``None`` sends ``reminder_text`` and the prompt again."""
        return None

    # -- tooling --------------------------------------------------------------

    @classmethod
    def mermaid(cls) -> str:
        """The flow's graph as a Mermaid ``flowchart`` (paste it into any Mermaid viewer)."""
        lines = ["flowchart TD", f"    start(({cls.name})) --> {cls.first}"]
        for name, step in cls.steps.items():
            label = step.prompt if isinstance(step.prompt, str) else type(step.prompt).__name__
            if callable(step.prompt) and not isinstance(step.prompt, str):
                label = "(dynamic prompt)"
            label = str(label).replace('"', "'")[:40]
            lines.append(f'    {name}["{name}: {label}"]')
            if isinstance(step.next, Mapping):
                for value, target in step.next.items():
                    lines.append(f"    {name} -- {value} --> {_node(target)}")
            else:
                lines.extend(f"    {name} --> {_node(t)}" for t in step.possible_targets())
        lines.append("    done((done))")
        return "\n".join(lines)


def _node(target: str) -> str:
    return "done" if target == DONE else target
