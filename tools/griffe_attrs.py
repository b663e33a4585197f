"""A griffe extension that gives attrs classes the ``__init__`` attrs generates.

Griffe reads the source statically and knows dataclasses but not attrs, so an
``@attrs.frozen`` class would have no parameters and every ``Args:`` entry of its
docstring would be reported as unknown. This imports each class and, for attrs
classes, builds the ``__init__`` signature from ``attrs.fields()``: the alias (a
private ``_x`` is passed as ``x``), keyword-only flags, defaults and factories.
Used by mkdocs.yml; not part of the package.
"""

from __future__ import annotations

import ast
from typing import Any

import attrs
from griffe import (
    Class,
    Extension,
    Function,
    ObjectNode,
    Parameter,
    ParameterKind,
    Parameters,
    dynamic_import,
)


def _default(field: attrs.Attribute) -> str | None:
    default = field.default
    if default is attrs.NOTHING:
        return None
    if isinstance(default, attrs.Factory):
        factory = default.factory
        return f"{getattr(factory, '__name__', 'factory')}()"
    return repr(default)


class AttrsInit(Extension):
    """Add the attrs-generated ``__init__`` to attrs classes."""

    def on_class_members(
        self,
        *,
        node: ast.AST | ObjectNode,
        cls: Class,
        **kwargs: Any,  # noqa: ARG002
    ) -> None:
        """Give ``cls`` an ``__init__`` if it is an attrs class without one in source."""
        if isinstance(node, ObjectNode) or "__init__" in cls.members:
            return
        try:
            runtime = dynamic_import(cls.path)
        except ImportError:
            return
        if not (isinstance(runtime, type) and attrs.has(runtime)):
            return
        parameters = [Parameter("self", kind=ParameterKind.positional_or_keyword)]
        for field in attrs.fields(runtime):
            if not field.init:
                continue
            member = cls.members.get(field.name)
            annotation = getattr(member, "annotation", None) or (
                field.type if isinstance(field.type, str) else None
            )
            kind = (
                ParameterKind.keyword_only if field.kw_only else ParameterKind.positional_or_keyword
            )
            parameters.append(
                Parameter(field.alias, annotation=annotation, kind=kind, default=_default(field))
            )
        cls.set_member(
            "__init__",
            Function(
                "__init__",
                lineno=0,
                endlineno=0,
                parent=cls,
                parameters=Parameters(*parameters),
                returns="None",
            ),
        )
