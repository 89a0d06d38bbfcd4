"""Logical edges and typed variables: how a recorded value is coerced, compared and routed on, without the LLM."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:  # the model imports this module to settle pass-through steps
    from .model import Edge, LogicalCondition, VariableSpec

_REJECTED = object()  # coerce's "this value does not fit the declared type"


def conditions_hold(conditions: Iterable["LogicalCondition"], variables: Mapping[str, Any]) -> bool:
    """Evaluate a logical edge left to right, `combine_with` joining each condition to the one before.

    That is how the web app's editor previews the conditions, so it is what the flow's author expects.
    """
    result: bool | None = None
    for condition in conditions:
        value = _condition_holds(condition, variables)
        if result is None:
            result = value
        elif (condition.combine_with or "and") == "or":
            result = result or value
        else:
            result = result and value
    return bool(result)


def first_true_logical_edge(edges: Iterable["Edge"], variables: Mapping[str, Any]) -> "Edge | None":
    for edge in edges:
        if edge.kind == "logical" and edge.logical_conditions and conditions_hold(edge.logical_conditions, variables):
            return edge
    return None


def coerce_variable(spec: "VariableSpec", value: Any) -> tuple[bool, Any]:
    """(ok, typed value) for an extracted value; not ok when it does not fit the declared type or enum."""
    coerced = _coerce(spec, value)
    return (False, None) if coerced is _REJECTED else (True, coerced)


def _coerce(spec: "VariableSpec", value: Any) -> Any:
    if spec.type in ("number", "integer"):
        if isinstance(value, str):  # spoken amounts arrive as "$1,250" as often as 1250
            value = value.replace(",", "").replace("_", "").strip().lstrip("$€£¥").strip()
        number = as_number(value)
        if number is None:
            return _REJECTED
        if float(number).is_integer():
            number = int(number)
        elif spec.type == "integer":
            return _REJECTED
        if spec.enum_values and not any(as_number(e) == number for e in spec.enum_values):
            return _REJECTED
        return number
    if spec.type == "boolean":
        flag = as_bool(value)
        return _REJECTED if flag is None else flag
    if isinstance(value, (dict, list)):
        return _REJECTED
    text = str(value).strip() if not isinstance(value, bool) else ("true" if value else "false")
    if not text:
        return _REJECTED
    if spec.enum_values:
        match = next((e for e in spec.enum_values if str(e).strip().casefold() == text.casefold()), None)
        return _REJECTED if match is None else match
    return text


def _condition_holds(condition: "LogicalCondition", variables: Mapping[str, Any]) -> bool:
    """An unset variable makes every comparison false: routing never fires on missing information."""
    actual = variables.get(condition.variable)
    if actual is None:
        return False
    expected = condition.value
    op = condition.operator
    if op == "==":
        return _loosely_equal(actual, expected)
    if op == "!=":
        return not _loosely_equal(actual, expected)
    if op in ("contains", "not_contains"):
        if isinstance(actual, (list, tuple, set)):
            found = any(_loosely_equal(item, expected) for item in actual)
        else:
            found = plain(expected).casefold() in plain(actual).casefold()
        return found if op == "contains" else not found
    if op in (">", "<", ">=", "<="):
        left, right = as_number(actual), as_number(expected)
        if left is None or right is None:
            if isinstance(actual, str) and isinstance(expected, str):
                left, right = actual.strip().casefold(), expected.strip().casefold()
            else:
                return False
        return {">": left > right, "<": left < right, ">=": left >= right, "<=": left <= right}[op]
    return False


def _loosely_equal(actual: Any, expected: Any) -> bool:
    left, right = as_number(actual), as_number(expected)
    if left is not None and right is not None:
        return left == right
    if isinstance(actual, bool) or isinstance(expected, bool):
        a, b = as_bool(actual), as_bool(expected)
        return a is not None and a == b
    return plain(actual).casefold() == plain(expected).casefold()


def plain(value: Any) -> str:
    """A value as it reads in a prompt or comparison (floats that are whole numbers lose the '.0')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def as_number(value: Any) -> int | float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        try:
            return value if math.isfinite(value) else None
        except OverflowError:  # an integer beyond any float (a model wrote hundreds of digits): not a number to use
            return None
    if isinstance(value, str) and value.strip():
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().casefold()
        if text in ("true", "yes", "y", "1"):
            return True
        if text in ("false", "no", "n", "0"):
            return False
    return None
