"""The ``datainf`` command line: a thin layer over :mod:`datainf.workflows`.

Subcommands::

    datainf finetune  --model BASE --data train.jsonl --out RUN            LoRA fine-tuning -> RUN/adapter
    datainf grads     --model BASE --adapter RUN --data d.jsonl --out G    per-example gradients -> store G
    datainf score     --train-grads G1 --test-grads G2 --out S             influence scores
    datainf score     --model BASE --adapter RUN --train-data a --test-data b --out S
    datainf report    --scores S/scores-datainf.safetensors --data a --out R   HTML report
    datainf demo      ...                                                  the end-to-end demo

Every subcommand takes flags and/or ``--config file.yaml|json`` (flags win over the file, the file over
the defaults) and writes the fully resolved settings to ``<out>/config.json``, so
``datainf <cmd> --config <out>/config.json`` replays a run. An output folder that holds results of a
different configuration is refused unless ``--overwrite`` is given (which starts it afresh); rerunning
the same configuration resumes (finished outputs are kept, gradient stores continue where they
stopped). See :class:`datainf.runs.RunDir`.

Layout: :mod:`datainf.cli.options` (the option tables, parser and config resolution),
:mod:`datainf.cli.commands` (one short function per subcommand), and :func:`main` here.

Exit codes: 0 success; 2 bad input or settings, an unusable ``--device``, an ``--out`` that cannot be
written (read-only, disk full) or is locked by another run (one line ``datainf: error: <message>`` on
stderr); 130 interrupted (every output is written atomically, so rerunning the same command resumes).

Sign convention of every score: positive influence = harmful (raises the test loss).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from datainf.cli.commands import HANDLERS, cmd_demo
from datainf.cli.options import COMMANDS, CONFIG_FILE
from datainf.cli.parser import build_parser, resolve_config
from datainf.distributed import is_main_process
from datainf.errors import DataInfError
from datainf.runs import check_device, removed_on_error
from datainf.store import output_error

__all__ = ["main", "build_parser", "resolve_config", "CONFIG_FILE", "COMMANDS"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _logging_setup(verbose: bool, quiet: bool) -> Iterator[None]:
    """A stderr handler on the ``datainf`` logger (WARNING, or INFO with -v), quieter third-party libraries."""
    root = logging.getLogger("datainf")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = logging.INFO if verbose else logging.WARNING
    handler.setLevel(level)
    previous = root.level
    root.setLevel(level)
    root.addHandler(handler)
    transformers_state: tuple[Any, int] | None = None
    try:
        if "transformers" in sys.modules or importlib.util.find_spec("transformers") is not None:
            from transformers.utils import logging as hf_logging

            transformers_state = (hf_logging, hf_logging.get_verbosity())
            hf_logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)
            if quiet:
                hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is a dependency; be robust anyway
        transformers_state = None
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", FutureWarning)
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        if transformers_state is not None:
            hf_logging, verbosity = transformers_state
            hf_logging.set_verbosity(verbosity)
            if quiet:
                hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _write_failures_as_errors(out: str | None) -> Iterator[None]:
    """Turn a write that failed on a full disk or a read-only / forbidden folder into its DataInfError
    (:func:`datainf.store.output_error`), so that the user sees one line, not a traceback. Other
    errors pass unchanged."""
    try:
        yield
    except DataInfError:
        raise
    except Exception as err:
        if not isinstance(err, OSError) and type(err).__name__ != "SafetensorError":
            raise
        where = getattr(err, "filename", None) or out or "the output"
        converted = output_error(err, where)
        if converted is None:
            raise
        raise converted from err


def _one_line(message: str) -> str:
    """Fold a multi-line error message (e.g. a bullet list of problems) into one line."""
    out = ""
    for line in (ln.strip() for ln in message.splitlines()):
        if not line:
            continue
        line = line[2:] if line.startswith("- ") else line
        out = line if not out else out + (" " if out.endswith(":") else "; ") + line
    return out


#: the command-line flag that renames each record field's column
_COLUMN_FLAGS = {field: f"--{field}-column" for field in ("text", "label", "prompt", "response", "id")}


def _with_flag_hint(err: DataInfError) -> str:
    """The error's message; for missing data columns, followed by the flags that name other columns."""
    from datainf.data.tabular import MissingColumnsError

    if not isinstance(err, MissingColumnsError):
        return str(err)
    flags = [f"{_COLUMN_FLAGS[f]} <column>" for f in err.missing if f in _COLUMN_FLAGS]
    return f"{err} On the command line: {', '.join(flags)}." if flags else str(err)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``datainf`` command line; returns the exit code (0, 2 on bad input, 130 on Ctrl-C)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        command = getattr(args, "command", None)
        if command is None:
            parser.print_help(sys.stderr)
            return 2
        explicit = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        config = resolve_config(command, explicit, getattr(args, "config", None))
        check_device(config.get("device"))  # before any data is read or folder made
        started = time.perf_counter()
        with (
            _logging_setup(bool(config.get("verbose")), bool(config.get("quiet"))),
            removed_on_error(config.get("out")),
            _write_failures_as_errors(config.get("out")),
        ):
            code = cmd_demo(config, args) if command == "demo" else HANDLERS[command](config)
        logger.info("datainf %s finished in %.1f s", command, time.perf_counter() - started)
        return code
    except DataInfError as err:
        # under torchrun, errors every rank raises together (e.g. a configuration mismatch) are printed once, by rank 0
        main_process = is_main_process()
        if main_process or not getattr(err, "all_ranks", False):
            prefix = "" if main_process else f"[rank {os.environ.get('RANK', '?')}] "
            print(f"{prefix}datainf: error: {_one_line(_with_flag_hint(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("datainf: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
