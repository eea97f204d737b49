"""JSON round trip shared by the settings dataclasses (fine-tuning, text generation, text to image).

Settings are written next to their artefacts (``config.json``) and read back from ``--config`` files,
so each settings dataclass needs the same two things: a JSON-able dict (tuples as lists) and a strict
constructor from such a dict that refuses unknown keys instead of silently ignoring a typo.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields, is_dataclass
from typing import Any, ClassVar

from datainf.errors import ConfigError

__all__ = ["DictSettings", "name_tuple"]


def name_tuple(value: str | Iterable[object]) -> tuple[str, ...]:
    """A settings field that lists names, as a tuple of strings.

    ``"query, value"`` (a comma-separated string, as typed on a command line) -> ``("query", "value")``;
    any other iterable -> its items as strings.
    """
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(str(item) for item in value)


class DictSettings:
    """Mixin for a settings dataclass: :meth:`to_dict` and a strict :meth:`from_dict`.

    Subclasses set ``_settings_name`` (e.g. ``"fine-tuning"``), which names them in error messages.
    Fields annotated as tuples are written as JSON lists and turned back into tuples on reading.
    """

    _settings_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (tuples as lists)."""
        assert is_dataclass(self), f"{type(self).__name__} must be a dataclass"
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Build from a dict such as :meth:`to_dict` returns, refusing unknown keys.

        Raises:
            ConfigError: a key is not a field (the message lists the known ones), or a value is refused
                by the dataclass's own checks.
        """
        assert is_dataclass(cls), f"{cls.__name__} must be a dataclass"
        declared = {f.name: str(f.type) for f in fields(cls)}
        unknown = sorted(set(data) - set(declared))
        if unknown:
            what = f"{cls._settings_name} setting(s)" if cls._settings_name else "setting(s)"
            raise ConfigError(f"Unknown {what} {unknown}; known: {sorted(declared)}.")
        values = {
            key: tuple(value) if isinstance(value, list) and declared[key].startswith("tuple") else value
            for key, value in data.items()
        }
        return cls(**values)
