"""Validation helpers for the YAML config: typed access with key paths, and value checkers.

Every checker raises ValueError (or MetricError) on bad input; :class:`Section` turns that into a problem line
with the key path, so all problems of a config are collected and reported at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ckptd.errors import MetricError
from ckptd.metric_sources import ValueSource, parse_source


class Problems:
    """Collects problems with their key paths (borgmatic style: ``At 'watches[0].root': …``)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        # a key with a newline or other control character must not break the one-problem-per-line format
        if not path.isprintable():
            path = repr(path)[1:-1]
        self.items.append(f"{path or '(top level)'}: {message}")


MISSING = object()


class Section:
    """Typed access to one mapping of the YAML tree; records unknown keys and type errors."""

    def __init__(self, data: Any, path: str, problems: Problems, known: tuple[str, ...]) -> None:
        self.path, self.problems = path, problems
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            problems.add(path, f"expected a mapping, got {type(data).__name__}")
            data = {}
        self.data = data
        for key in data:
            if key not in known:
                problems.add(f"{path}.{key}" if path else str(key),
                             f"unknown key (known: {', '.join(known)})")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, default: Any, check: Callable[[Any], Any], expected: str) -> Any:
        value = self.data.get(name, MISSING)
        if value is MISSING:
            return default
        try:
            return check(value)
        except (ValueError, TypeError, MetricError) as exc:
            detail = str(exc) if str(exc) and not str(exc).startswith("expected") else ""
            self.problems.add(self.key(name), f"expected {expected}" + (f" ({detail})" if detail else ""))
            return default

    def required(self, name: str, check: Callable[[Any], Any], expected: str) -> Any:
        if name not in self.data:
            self.problems.add(self.key(name), "is required")
            return None
        return self.get(name, None, check, expected)


def check_str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected")
    return v


def check_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected")
    return v


def check_int(minimum: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError("expected")
        return v

    return check


def check_choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError("expected")
        return v

    return check


def check_str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("expected")
    return tuple(v)


def check_regex_safe_sources(v: Any) -> tuple[ValueSource, ...]:
    if not isinstance(v, list):
        raise ValueError("expected")
    return tuple(parse_source(item) for item in v)


def check_commands(v: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(v, list) or not all(isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in v):
        raise ValueError("expected")
    return tuple(tuple(c) for c in v)


def check_formats(v: Any) -> tuple[str, ...]:
    items = check_str_list(v)
    if not items or any(x not in ("safetensors", "pt") for x in items):
        raise ValueError("expected")
    return items


def check_shape(v: Any) -> tuple[Any, ...]:
    """Fixed dims are ints; a flexible dim is [min, max] (max -1 = unbounded)."""
    if not isinstance(v, list) or not v:
        raise ValueError("expected")
    out: list[Any] = []
    for d in v:
        if isinstance(d, int) and not isinstance(d, bool) and d > 0:
            out.append(d)
        elif isinstance(d, list) and len(d) == 2 and all(isinstance(x, int) for x in d) and d[0] > 0 \
                and (d[1] == -1 or d[1] >= d[0]):
            out.append((d[0], d[1]))
        else:
            raise ValueError("expected")
    return tuple(out)


def check_listen(v: Any) -> str:
    if v in ("", None):
        return ""
    _host, sep, port = str(v).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("expected")
    return str(v)


def check_mapping(v: Any) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ValueError("expected")
    return v
