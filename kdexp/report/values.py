"""Config values as the report compares, sorts and prints them.

Records come from JSON and from W&B, so the same setting can arrive as ``8`` or
``8.0``, and lists as lists: everything here turns them into one comparable form.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from kdexp.report.errors import ReportError


def normalize(value: Any) -> Any:
    """A hashable form in which equal settings compare equal (``8`` == ``8.0``)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(normalize(v) for v in value)
    if isinstance(value, dict):  # an empty group, e.g. `scheduler: {}`
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA: an axis the run does not have."""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN and pd.NA are the only values unequal to themselves
    except (TypeError, ValueError):
        return False


def format_value(value: Any) -> str:
    """How a setting is printed: ``8`` not ``8.0``, ``0.9``, ``true``, ``[40]``, ``—`` when absent."""
    if is_missing(value):
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def sort_key(value: Any) -> tuple:
    """Sorts absent values first, then numbers numerically, then text."""
    if is_missing(value):
        return (0,)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return (1, float(value))
    return (2, format_value(value))


def parse_scalar(text: str) -> Any:
    """``"8"`` → 8, ``"0.9"`` → 0.9, ``"true"`` → True, ``"null"`` → None, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def matches(actual: Any, wanted: str) -> bool:
    """Whether a run's setting equals the text a user typed (numbers compared as numbers)."""
    if is_missing(actual):
        return wanted.strip().lower() in ("null", "none")
    target = normalize(parse_scalar(wanted))
    actual = normalize(actual)
    if isinstance(actual, float) and isinstance(target, float):
        return math.isclose(actual, target, rel_tol=1e-9, abs_tol=1e-12)
    return actual == target or format_value(actual) == wanted.strip()


def parse_assignments(items: Iterable[str], option: str, example: str = "kd.alpha=0.9") -> list[tuple[str, str]]:
    """``["kd.alpha=0.9"]`` → ``[("kd.alpha", "0.9")]`` (key and value stripped)."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ReportError(f"{option} '{item}' must look like key=value, e.g. {option} {example}.")
        out.append((key.strip(), value.strip()))
    return out
