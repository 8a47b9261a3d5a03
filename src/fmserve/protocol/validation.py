"""Turning untrusted JSON into request models, with errors that name the field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fmserve.errors import InvalidParameterValue

M = TypeVar("M", bound=BaseModel)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not parts:
            parts.append(str(item))
        else:
            parts.append(f".{item}")
    return "".join(parts) or "body"


def parse_model(model: type[M], body: Any) -> M:
    """Validate ``body`` (parsed JSON) as ``model``.

    Raises:
        InvalidParameterValue: 400, message naming the first offending field,
            e.g. ``"Invalid value for 'n': Input should be less than or equal to 5"``.
    """
    if not isinstance(body, dict):
        raise InvalidParameterValue("Request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        # Union members add their type name to the location; drop those parts.
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p[:1].isupper()))
        loc = tuple(p for p in loc if p not in ("str", "list[str]", "function-after[...]"))
        field = _field_path(loc)
        msg = first["msg"]
        if first["type"] == "missing":
            raise InvalidParameterValue(f"Missing required parameter '{field}'.") from None
        raise InvalidParameterValue(f"Invalid value for '{field}': {msg}") from None


# Deepest nesting of arrays/objects a request body may have. Real requests nest a few
# levels (a JSON Schema in a tool a dozen or two); without a bound, a body nested
# thousands deep reaches recursion limits in validation, error rendering and storage.
MAX_JSON_DEPTH = 64


def json_depth_over(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON ``value`` nests arrays/objects deeper than ``limit`` levels
    (the top-level object is level 1). Iterative: no recursion, whatever the depth."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False
