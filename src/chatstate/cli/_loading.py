"""Objects named on the command line as ``package.module:NAME`` (``--rules``, ``mermaid``)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import attrs

from chatstate.cli._errors import CommandLineError
from chatstate.state import StateData

__all__ = ["load_object", "load_rules", "load_schema_rules", "reading_rules"]


def load_object(spec: str, what: str) -> Any:
    """The object ``spec`` names (``module:attr``; ``what`` when ``:attr`` is left out)."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise CommandLineError(f"expected module:{what}, got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` has it
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandLineError(f"cannot import {module_name!r}: {exc}") from exc
    return getattr(module, attr or what, None)


def load_rules(spec: str | None) -> StateData:
    """The :class:`~chatstate.state.StateData` of ``--rules`` (the defaults without it)."""
    if not spec:
        return StateData()
    rules = load_object(spec, "RULES")
    if not isinstance(rules, StateData):
        raise CommandLineError(f"{spec!r} is not a StateData")
    return rules


def load_schema_rules(spec: str) -> StateData:
    """The StateData named by ``spec``: the object itself, or what a factory of it returns."""
    found = load_object(spec, "RULES")
    if callable(found) and not isinstance(found, StateData):
        try:
            found = found()
        except TypeError as exc:  # a function that is not a factory of rules
            raise CommandLineError(f"{spec!r} is not a StateData: {exc}") from exc
    if not isinstance(found, StateData):
        raise CommandLineError(f"{spec!r} is not a StateData (nor a function returning one)")
    if found.schema_version is None:
        raise CommandLineError(f"{spec!r} has no schema_version: there is nothing to migrate to")
    return found


def reading_rules(rules: StateData) -> StateData:
    """``rules`` for a command that shows or copies documents, never changing them.

    No schema version, so a read migrates and writes nothing, and a document
    keeps the schema it is stored at; a key ring that also reads plaintext, so
    fingerprints match the ones the bot logs (of the token, not of its
    ciphertext) and an export with secrets holds plaintext to import.
    """
    rules = attrs.evolve(rules, schema_version=None, migrations={})
    if rules.encryption is not None:
        rules = attrs.evolve(rules, encryption=rules.encryption.accepting_plaintext())
    return rules
