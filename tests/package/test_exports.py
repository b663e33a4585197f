"""The public face: __all__ lists exactly what each public module exports."""

from __future__ import annotations

import importlib

import pytest

import chatstate

PUBLIC = [
    "chatstate",
    "chatstate.state",
    "chatstate.exceptions",
    "chatstate.typing",
    "chatstate.flow",
    "chatstate.auth",
    "chatstate.testing",
    "chatstate.observe",
    "chatstate.integrations",
    "chatstate.integrations.aiogram",
    "chatstate.integrations.telegram",
    "chatstate.integrations.starlette",
    "chatstate.integrations.prometheus",
    "chatstate.integrations.otel",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_all_names_exist_and_are_documented(name: str) -> None:
    """Every name in __all__ exists, and every public class or function has a docstring."""
    module = importlib.import_module(name)
    for attr in module.__all__:
        obj = getattr(module, attr)
        if type(obj).__module__ == "typing":
            continue  # a type alias (MessageKind): documented where it is defined
        if callable(obj) and not attr.startswith("__"):
            assert (obj.__doc__ or "").strip(), f"{name}.{attr} has no docstring"


def test_top_level_exports_every_public_name() -> None:
    """What chatstate defines publicly without an underscore is in __all__."""
    exported = {n for n in dir(chatstate) if not n.startswith("_")}
    modules = {
        "exceptions",
        "state",
        "typing",
        "flow",
        "auth",
        "testing",
        "integrations",
        "observe",
        "cli",
    }
    assert exported - modules == set(chatstate.__all__) - {"__version__"}


def test_version_comes_from_metadata() -> None:
    """__version__ is the installed distribution's version."""
    from importlib.metadata import version

    assert chatstate.__version__ == version("chatstate")


def test_errors_subclass_the_builtins_they_resemble() -> None:
    """Validation errors are ValueErrors; unavailability is a ConnectionError."""
    assert issubclass(chatstate.exceptions.SerializationError, ValueError)
    assert issubclass(chatstate.exceptions.BackendUnavailable, ConnectionError)
    assert issubclass(chatstate.exceptions.OutcomeUnknown, chatstate.exceptions.BackendUnavailable)
    assert issubclass(chatstate.exceptions.StateError, chatstate.ChatstateError)


def test_redis_py_loads_only_with_a_redis_backend() -> None:
    """A bot on the memory backend never imports redis-py (it is most of the import time)."""
    import subprocess
    import sys

    code = (
        "import sys, chatstate, chatstate.flow, chatstate.auth, chatstate.testing\n"
        "from chatstate import StateService\n"
        "StateService().update('u', {'a': 1})\n"
        "assert 'redis' not in sys.modules, 'redis-py was imported'\n"
        "from chatstate import RedisBackend\n"
        "from chatstate.state import AsyncRedisBackend\n"
        "assert 'redis' in sys.modules and 'RedisBackend' in dir(chatstate)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_moved_names_still_resolve_with_a_warning_that_says_where() -> None:
    """An error or manager name the top level exported before resolves, deprecated."""
    with pytest.warns(DeprecationWarning, match=r"import it from chatstate\.exceptions"):
        moved = chatstate.UsageError  # type: ignore[attr-defined]
    assert moved is chatstate.exceptions.UsageError
    with pytest.warns(DeprecationWarning, match=r"import it from chatstate\.state"):
        assert chatstate.StateManager is chatstate.state.StateManager  # type: ignore[attr-defined]
    assert len(chatstate.__all__) <= 25, "the top level keeps the everyday names only"
    with pytest.raises(AttributeError):
        chatstate.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
