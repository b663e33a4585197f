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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeAlias

import attrs

from chatstate.exceptions import InvalidFlowDefinition
from chatstate.flow._screens import Screen, Text

if TYPE_CHECKING:
    from chatstate.flow._router import Turn

__all__ = ["DONE", "Flow", "Invalid", "Step"]

DONE: Final = "__done__"
"""The target that completes a flow."""

Prompt: TypeAlias = (
    "str | Screen | Callable[[dict[str, Any]], str | Screen | Awaitable[str | Screen]]"
)
Validator: TypeAlias = Callable[[str], "str | Awaitable[str | None] | None"]
Cleaner: TypeAlias = Callable[[str], Any]
Brancher: TypeAlias = Callable[[dict[str, Any]], "str | Awaitable[str]"]
Replies: TypeAlias = "Screen | str | Sequence[Screen | str] | None"


class Invalid(Exception):  # noqa: N818 - reads as "the answer is invalid"
    """Raise from a ``clean`` function to re-prompt with ``message``."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@attrs.define(eq=False)
class Step:
    """One question of a flow.

    Args:
        prompt: What to send: a str, a :data:`Screen`, or a callable of the data
            collected so far that returns one (sync or async).
        validate: Gets the answer; returns an error message to re-prompt with,
            or ``None`` when the answer is fine (sync or async).
        clean: Turns the answer into the value to store (sync or async); may
            raise :class:`Invalid` to re-prompt with its message, or
            ``ValueError`` (as ``int`` does) to re-prompt with ``invalid_message``.
        next: Where to go: a step name, :data:`DONE`, a dict from the cleaned
            value to a target, or a callable of the data (declare ``targets``).
        targets: The targets a callable ``next`` may return.
        key: The data key the value is stored under (default: the step's name).
        max_attempts: Invalid answers in a row before ``on_too_many`` happens.
        on_too_many: ``"cancel"`` the flow or ``"restart"`` it.
        invalid_message: The re-prompt when ``clean`` raises ``ValueError``.
    """

    prompt: Prompt
    validate: Validator | None = None
    clean: Cleaner | None = None
    next: str | Mapping[Any, str] | Brancher = DONE
    targets: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    key: str | None = None
    max_attempts: int = 3
    on_too_many: Literal["cancel", "restart"] = "cancel"
    invalid_message: str = "Sorry, that is not a valid answer."
    name: str = attrs.field(default="", init=False)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        if self.key is None:
            self.key = name

    def possible_targets(self) -> tuple[str, ...]:
        """Every target this step can lead to."""
        if isinstance(self.next, str):
            return (self.next,)
        if isinstance(self.next, Mapping):
            return tuple(dict.fromkeys(self.next.values()))
        return self.targets

    async def render(self, data: dict[str, Any]) -> Screen:
        """The prompt as a screen, for the data collected so far."""
        prompt = self.prompt
        if callable(prompt):
            prompt = await _maybe_await(prompt(data))
        return Text(prompt) if isinstance(prompt, str) else prompt

    async def accept(self, answer: str) -> tuple[bool, Any]:
        """Check and clean an answer: ``(True, value)`` or ``(False, message)``."""
        if self.validate is not None:
            error = await _maybe_await(self.validate(answer))
            if error:
                return False, str(error)
        value: Any = answer
        if self.clean is not None:
            try:
                value = await _maybe_await(self.clean(answer))
            except Invalid as exc:
                return False, exc.message
            except ValueError:
                return False, self.invalid_message
        if isinstance(self.next, Mapping) and value not in self.next and "*" not in self.next:
            choices = ", ".join(str(k) for k in self.next if k != "*")
            return False, f"Please answer one of: {choices}."
        return True, value

    async def target(self, value: Any, data: dict[str, Any]) -> str:
        """Where the flow goes after this step accepted ``value``."""
        if isinstance(self.next, str):
            return self.next
        if isinstance(self.next, Mapping):
            return self.next[value] if value in self.next else self.next["*"]
        target = await _maybe_await(self.next(data))
        if target not in self.targets:
            raise InvalidFlowDefinition(
                f"step {self.name!r} branched to {target!r}, not one of its declared targets",
                flow="?",
            )
        return str(target)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Flow:
    """Base class of a multi-step conversation. Subclass it and declare :class:`Step` s.

    Class attributes a subclass may set:
        name: The flow's name in state and in menus (default: the class name in snake_case).
        first: The first step (default: the first declared).
        timeout: An idle flow expires after this long (``None``: never).
        requires_auth: Only authenticated users may start it.
        cancel_words, back_words, restart_words: Commands understood at any step.

    Hooks (sync or async) receive the collected data and may return screens:
    :meth:`on_complete`, :meth:`on_cancel`.
    """

    name: ClassVar[str] = ""
    first: ClassVar[str] = ""
    timeout: ClassVar[timedelta | None] = None
    requires_auth: ClassVar[bool] = False
    cancel_words: ClassVar[frozenset[str]] = frozenset({"cancel", "stop", "quit"})
    back_words: ClassVar[frozenset[str]] = frozenset({"back"})
    restart_words: ClassVar[frozenset[str]] = frozenset({"restart", "start over"})
    steps: ClassVar[dict[str, Step]] = {}

    def __init__(self, turn: Turn | None = None) -> None:
        self.turn = turn
        """The message being handled and the user's state, for hooks."""

    def __init_subclass__(cls, *, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        steps: dict[str, Step] = {}
        for klass in reversed(cls.__mro__):
            steps.update({a: v for a, v in vars(klass).items() if isinstance(v, Step)})
        cls.steps = steps
        if not cls.__dict__.get("name"):
            cls.name = _snake(cls.__name__)
        if abstract:
            return
        cls._check_definition()

    @classmethod
    def _check_definition(cls) -> None:  # noqa: C901, PLR0912 - one check per rule, in order
        steps = cls.steps
        flow = cls.__name__
        if not steps:
            raise InvalidFlowDefinition("declares no steps (a first step is required)", flow=flow)
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
            if step.max_attempts < 1:
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

    # -- hooks --------------------------------------------------------------

    def on_complete(self, data: dict[str, Any]) -> Replies | Awaitable[Replies]:  # noqa: ARG002
        """Called once the flow is done and its end is stored; return screens to send."""
        return None

    def on_cancel(self, data: dict[str, Any]) -> Replies | Awaitable[Replies]:  # noqa: ARG002
        """Called once the flow is cancelled and that is stored; return screens to send."""
        return Text("Cancelled.")

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
