"""The parser of every subcommand and the settings it resolves: defaults, a ``--config`` file, then the flags.

:func:`resolve_config` merges the defaults, a ``--config`` file (``.yaml``/``.yml``/``.json``, e.g. a
previous run's ``config.json``) and the flags given, in that order of precedence (lowest first).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datainf.cli.option_types import (
    Option,
    _to_list,
    _UsageError,
)
from datainf.cli.options import (
    COMMANDS,
    options,
)
from datainf.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand. Defaults are suppressed: :func:`resolve_config` fills
    them in after the ``--config`` file, so that only flags actually given override the file."""
    from datainf import __version__

    parser = _Parser(
        prog="datainf",
        description="DataInf influence scores for LoRA-tuned models (Kwon et al., ICLR 2024). "
        "Sign convention: positive influence = harmful (raises the test loss). "
        "Every command takes --config FILE and writes <out>/config.json, which replays it.",
    )
    parser.add_argument("--version", action="version", version=f"datainf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text + ("" if "positive = harmful" in help_text else ". Positive influence = harmful."),
            argument_default=argparse.SUPPRESS,
        )
        p.add_argument(
            "--config",
            type=str,
            metavar="FILE",
            help="settings file (.yaml/.yml/.json), e.g. a previous run's config.json",
        )
        for opt in options(name):
            shown = (
                ""
                if opt.default in (None, False, [], {})
                else f" [default: {','.join(map(str, opt.default)) if isinstance(opt.default, list) else opt.default}]"
            )
            kwargs: dict[str, Any] = {"dest": opt.dest, "help": opt.help + shown}
            if opt.action == "positional":
                p.add_argument(opt.dest, choices=opt.choices, help=opt.help)
                continue
            if opt.action == "flag":
                kwargs["action"] = "store_true"
            elif opt.action == "switch":
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "append" if opt.action == "append" else "store"
                if opt.choices:
                    kwargs["choices"] = opt.choices
                if opt.metavar:
                    kwargs["metavar"] = opt.metavar
            p.add_argument(*opt.flags, **kwargs)
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"Config file {file} does not exist.")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"Config file {file}: use a .json, .yaml or .yml file.")
    except ConfigError:
        raise
    except Exception as err:  # yaml and json raise their own error types
        raise ConfigError(f"Config file {file} cannot be parsed ({type(err).__name__}: {err}).") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {file} must hold a mapping of settings, not a {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(command: str, explicit: Mapping[str, Any], config_file: str | None = None) -> dict[str, Any]:
    """Merge defaults, the ``--config`` file and explicit flags (in that order of precedence, lowest first).

    Every value goes through the option's converter (paths become absolute), unknown keys in the file
    are refused with the list of known ones.

    Returns:
        ``{dest: value}`` for every option of ``command``, the unsaved ones (``overwrite``, ``quiet``,
        ``verbose``) included.
    """
    known = {o.dest: o for o in options(command)}
    resolved: dict[str, Any] = {d: o.default for d, o in known.items()}
    if config_file:
        data = _read_config_file(config_file)
        stored_command = data.pop("command", None)
        if stored_command is not None and stored_command != command:
            raise ConfigError(
                f"The config file {config_file} is for `datainf {stored_command}`, not `datainf {command}`."
            )
        for key in ("format", "datainf_version"):
            data.pop(key, None)
        unknown = sorted(k for k in data if k not in known or k in ("config",))
        if unknown:
            raise ConfigError(
                f"Unknown setting(s) {unknown} in {config_file} for `datainf {command}`; known: {sorted(d for d in known if d != 'config')}."
            )
        for key, value in data.items():
            resolved[key] = _convert(known[key], value, f"{key!r} in {config_file}")
    for key, value in explicit.items():
        if key in ("config", "command"):
            continue
        opt = known[key]
        if opt.action == "append":
            value = [item for v in value for item in _to_list(v)]
        resolved[key] = _convert(opt, value, opt.flags[0])
    return resolved


def _convert(opt: Option, value: Any, where: str) -> Any:
    try:
        out = opt.conv(value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"Bad value {value!r} for {where}: {err}.") from err
    if opt.choices and out is not None and out not in opt.choices:
        raise ConfigError(f"Bad value {out!r} for {where}: choose one of {list(opt.choices)}.")
    return out
