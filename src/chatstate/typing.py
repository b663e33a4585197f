"""Public type aliases for the values chatstate stores."""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["JSON", "JSONObject", "Path"]

JSON: TypeAlias = "str | int | float | bool | list[JSON] | dict[str, JSON] | None"
"""A JSON value as Python holds it after ``json.loads``."""

JSONObject: TypeAlias = dict[str, Any]
"""One user's state document: a JSON object. Values are typed ``Any`` so that
callers can index into nested data without casts."""

Path: TypeAlias = tuple[str, ...]
"""A location in a document as the keys from the root, ``("profile", "name")``."""
