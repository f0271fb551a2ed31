"""Type aliases shared across the packages."""

from __future__ import annotations

from typing import Any, TypeAlias

#: Any JSON value as produced by ``json.loads``.
JSON: TypeAlias = Any
#: A JSON object.
JSONObject: TypeAlias = dict[str, Any]
