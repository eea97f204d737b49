"""What one command-line setting is: :class:`Option` (flag, converter, default, help) and the value converters."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datainf.errors import DataInfError

#: Options that change how a command runs, not what it computes: never written to config.json.
NOT_SAVED = frozenset({"config", "overwrite", "quiet", "verbose", "json"})


class _UsageError(DataInfError):
    """A command-line usage problem (unknown flag, bad value)."""


# ---------------------------------------------------------------------------------------------- value parsing


def _to_str(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return str(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {value}")
        return int(value)
    return int(str(value).strip())


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"expected a finite number, got {value}")
    return out


def _optional(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return conv(value)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _to_list(value: Any) -> list[str]:
    """A list from a JSON list, a comma-separated string, or repeated flags (a list of such strings)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for item in items:
        out.extend(part.strip() for part in str(item).split(",") if part.strip())
    return out


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _to_json_mapping(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    try:
        data = json.loads(str(value))
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data


def _to_path(value: Any) -> str:
    """An input path: absolute when it exists (relative paths are taken from the current folder);
    a path that does not exist is kept as given, so error messages show what was typed (e.g. a hub id)."""
    text = os.path.expanduser(_to_str(value))
    return str(Path(text).absolute()) if Path(text).exists() else text


def _to_out_path(value: Any) -> str:
    """An output path, always made absolute."""
    return str(Path(os.path.expanduser(_to_str(value))).absolute())


def _to_paths(value: Any) -> list[str]:
    return [_to_path(v) for v in _to_list(value)]


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One setting of a subcommand: its flag(s), converter, default and help text."""

    dest: str
    flags: tuple[str, ...]
    conv: Callable[[Any], Any]
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    action: str = "value"  # value | flag (--x) | switch (--x / --no-x) | append | positional
    saved: bool = True
    metavar: str | None = None


#: ``--out`` help of the commands that have a default output folder (the others require ``--out``).
