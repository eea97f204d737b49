"""The ``datainf`` command line: a thin layer over the library's functions.

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
stopped).

Exit codes: 0 success; 2 bad input or settings (one line ``datainf: error: <message>`` on stderr);
130 interrupted (every output is written atomically, so rerunning the same command resumes).

Sign convention of every score: positive influence = harmful (raises the test loss).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datainf.errors import ConfigError, DatasetError, DataInfError

__all__ = ["main", "build_parser", "resolve_config", "CONFIG_FILE", "COMMANDS"]

logger = logging.getLogger(__name__)

#: Name of the resolved-settings file written into every output folder.
CONFIG_FILE = "config.json"
_FORMAT = "datainf-cli-config"
_NOT_SAVED = {"config", "overwrite", "quiet", "verbose"}
_NOT_COMPARED = {"out", "datainf_version", "command", "format"}


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
    action: str = "value"  # value | flag | append
    saved: bool = True
    metavar: str | None = None


def _common() -> list[Option]:
    return [
        Option("out", ("--out", "-o"), _to_out_path, None, "output folder (required)", metavar="DIR"),
        Option("overwrite", ("--overwrite",), _to_bool, False, "replace results of a different configuration in --out", action="flag", saved=False),
        Option("quiet", ("--quiet", "-q"), _to_bool, False, "no progress bars", action="flag", saved=False),
        Option("verbose", ("--verbose", "-v"), _to_bool, False, "log at INFO level", action="flag", saved=False),
    ]


def _columns() -> list[Option]:
    return [
        Option("text_column", ("--text-column",), _optional(_to_str), None, "data column holding the text (default: text)"),
        Option("label_column", ("--label-column",), _optional(_to_str), None, "data column holding the label (default: label)"),
        Option("prompt_column", ("--prompt-column",), _optional(_to_str), None, "data column holding the prompt (causal LM; default: prompt)"),
        Option("response_column", ("--response-column",), _optional(_to_str), None, "data column holding the response (causal LM; default: response)"),
        Option("id_column", ("--id-column",), _optional(_to_str), None, "data column holding unique example ids (default: id, else the row number)"),
    ]


def _model_options(adapter_required: bool) -> list[Option]:
    kind_help = "task kind" + ("" if not adapter_required else " (default: the adapter's, else classification)")
    opts = [
        Option("model", ("--model",), _optional(_to_path), None, "local folder of the base model (save_pretrained)", metavar="DIR"),
        Option("kind", ("--kind",), _optional(_to_str), None, kind_help, choices=("classification", "causal-lm")),
        Option("max_length", ("--max-length",), _optional(_to_int), None, "longest token sequence (default: the adapter's training value, else the model's limit)"),
        Option("device", ("--device",), _to_str, "cpu", "cpu, cuda, cuda:1, ..."),
    ]
    if adapter_required:
        opts.insert(1, Option("adapter", ("--adapter",), _optional(_to_path), None, "folder of the trained LoRA adapter (or a `datainf finetune` output folder)", metavar="DIR"))
        opts.append(Option("num_labels", ("--num-labels",), _optional(_to_int), None, "classes of the classifier (default: the adapter's)"))
        opts.append(Option("grad_batch_size", ("--grad-batch-size",), _to_int, 16, "examples per forward/backward pass when computing gradients"))
        opts.append(Option("dtype", ("--dtype",), _to_str, "float32", "storage dtype of gradients", choices=("float32", "float64", "bfloat16", "float16")))
        opts.append(Option("shard_size", ("--shard-size",), _to_int, 1024, "examples per gradient shard file"))
    return opts


def _finetune_options() -> list[Option]:
    return [
        *_model_options(adapter_required=False),
        Option("data", ("--data",), _optional(_to_path), None, "training data: .jsonl/.json/.csv/.tsv/.parquet or a saved HF dataset folder", metavar="PATH"),
        *_columns(),
        Option("r", ("--r", "--rank"), _to_int, 8, "LoRA rank"),
        Option("alpha", ("--alpha",), _to_float, 16.0, "LoRA alpha"),
        Option("target_modules", ("--target-modules",), _to_list, ["query", "value"], "comma-separated layer names to adapt"),
        Option("dropout", ("--dropout",), _to_float, 0.1, "LoRA dropout"),
        Option("epochs", ("--epochs",), _to_int, 10, "training epochs (paper: 10)"),
        Option("lr", ("--lr",), _to_float, 3e-4, "AdamW learning rate (paper: 3e-4)"),
        Option("batch_size", ("--batch-size",), _to_int, 32, "training batch size (paper: 32)"),
        Option("warmup_ratio", ("--warmup-ratio",), _to_float, 0.06, "share of linear warm-up steps (paper: 0.06)"),
        Option("weight_decay", ("--weight-decay",), _to_float, 0.0, "AdamW weight decay"),
        Option("max_grad_norm", ("--max-grad-norm",), _optional(_to_float), 1.0, "gradient clipping norm (none: off)"),
        Option("seed", ("--seed",), _to_int, 0, "random seed"),
    ]


def _grads_options() -> list[Option]:
    return [
        *_model_options(adapter_required=True),
        Option("data", ("--data",), _optional(_to_path), None, "examples to differentiate", metavar="PATH"),
        *_columns(),
    ]


def _score_options() -> list[Option]:
    return [
        Option("train_grads", ("--train-grads",), _optional(_to_path), None, "gradient store of the training examples", metavar="DIR"),
        Option("test_grads", ("--test-grads",), _optional(_to_path), None, "gradient store of the test examples", metavar="DIR"),
        *_model_options(adapter_required=True),
        Option("train_data", ("--train-data",), _optional(_to_path), None, "training data (gradients computed into <out>/grads-train)", metavar="PATH"),
        Option("test_data", ("--test-data",), _optional(_to_path), None, "test data (gradients computed into <out>/grads-test)", metavar="PATH"),
        *_columns(),
        Option("method", ("--method",), _to_list, ["datainf"], "influence method(s): datainf, exact, lissa, hessian_free (repeat or comma list)", action="append"),
        Option("mode", ("--mode",), _to_str, "average", "average: one score per training example; pairwise: one per (test, train) pair", choices=("average", "pairwise")),
        Option("damping", ("--damping",), _to_float, 0.1, "lambda_l = damping * mean ||g_il||^2 / d_l (paper: 0.1)"),
        Option("fixed_lambda", ("--fixed-lambda",), _optional(_to_float), None, "one lambda for every block instead of --damping"),
        Option("method_options", ("--method-options",), _to_json_mapping, {}, "JSON object method -> options, e.g. '{\"lissa\": {\"scale\": \"trace\"}}'", metavar="JSON"),
        Option("score_batch_size", ("--score-batch-size",), _to_int, 1024, "training gradients read per batch while scoring"),
        Option("table_format", ("--table-format",), _to_str, "csv", "format of the per-method score table", choices=("csv", "parquet")),
    ]


def _report_options() -> list[Option]:
    return [
        Option("scores", ("--scores",), _to_paths, None, "scores file(s) written by `datainf score` (repeat or comma list)", action="append", metavar="FILE"),
        Option("data", ("--data",), _optional(_to_path), None, "the training data the scores are about", metavar="PATH"),
        Option("test_data", ("--test-data",), _optional(_to_path), None, "the test data (shows test texts for pairwise scores)", metavar="PATH"),
        *_columns(),
        Option("k", ("--k", "--top"), _to_int, 10, "examples per list"),
        Option("max_test", ("--max-test",), _to_int, 5, "pairwise: test examples that get their own lists"),
    ]


def _demo_options() -> list[Option]:
    return [
        Option("task", ("--task",), _to_str, "mislabel", "which demo to run: mislabel (BBC News, flipped labels), text-generation or text-to-image", choices=("mislabel", "text-generation", "text-to-image")),
        Option("dataset", ("--dataset",), _optional(_to_str), None, "text-generation: sentence|math|math-reason (default sentence); text-to-image: style|subject (default style)", metavar="NAME"),
        Option("seed", ("--seed",), _to_int, 0, "random seed"),
        Option("recompute", ("--recompute",), _to_bool, False, "ignore cached intermediate results", action="flag"),
    ]


COMMANDS: dict[str, tuple[str, Callable[[], list[Option]]]] = {
    "finetune": ("LoRA-fine-tune a local model on a dataset (writes <out>/adapter)", _finetune_options),
    "grads": ("per-example LoRA gradients of a dataset into a gradient store (<out>)", _grads_options),
    "score": ("influence scores of training examples on test examples (positive = harmful)", _score_options),
    "report": ("HTML report of the most harmful / helpful training examples", _report_options),
    "demo": ("the end-to-end demo (default: BBC News with flipped labels, four methods)", _demo_options),
}


def _options(command: str) -> list[Option]:
    return [*_common(), *COMMANDS[command][1]()]


# ---------------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser(*, with_demo_options: bool = False) -> argparse.ArgumentParser:
    """The argparse parser of every subcommand. Defaults are suppressed: :func:`resolve_config` fills
    them in after the ``--config`` file, so that only flags actually given override the file.

    With ``with_demo_options``, :mod:`datainf.demo` may add flags of its own to ``demo`` through an
    ``add_arguments(parser)`` function (imported only then)."""
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
        p = sub.add_parser(name, help=help_text, description=help_text + ("" if "positive = harmful" in help_text else ". Positive influence = harmful."), argument_default=argparse.SUPPRESS)
        p.add_argument("--config", type=str, metavar="FILE", help="settings file (.yaml/.yml/.json), e.g. a previous run's config.json")
        for opt in _options(name):
            shown = "" if opt.default in (None, False, [], {}) else f" [default: {','.join(map(str, opt.default)) if isinstance(opt.default, list) else opt.default}]"
            kwargs: dict[str, Any] = {"dest": opt.dest, "help": opt.help + shown}
            if opt.action == "flag":
                kwargs["action"] = "store_true"
            else:
                kwargs["action"] = "append" if opt.action == "append" else "store"
                if opt.choices:
                    kwargs["choices"] = opt.choices
                if opt.metavar:
                    kwargs["metavar"] = opt.metavar
            p.add_argument(*opt.flags, **kwargs)
        if name == "demo" and with_demo_options:
            _add_demo_module_arguments(p)
    return parser


def _add_demo_module_arguments(parser: argparse.ArgumentParser) -> None:
    """Let :mod:`datainf.demo` register further flags with ``add_arguments(parser)``, if it defines it."""
    if importlib.util.find_spec("datainf.demo") is None:
        return
    hook = getattr(importlib.import_module("datainf.demo"), "add_arguments", None)
    if callable(hook):
        hook(parser)


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
    options = {o.dest: o for o in _options(command)}
    resolved: dict[str, Any] = {d: o.default for d, o in options.items()}
    if config_file:
        data = _read_config_file(config_file)
        stored_command = data.pop("command", None)
        if stored_command is not None and stored_command != command:
            raise ConfigError(f"The config file {config_file} is for `datainf {stored_command}`, not `datainf {command}`.")
        for key in ("format", "datainf_version"):
            data.pop(key, None)
        unknown = sorted(k for k in data if k not in options or k in ("config",))
        if command == "demo":  # settings of flags that datainf.demo registers itself
            resolved.update({k: data.pop(k) for k in unknown})
            unknown = []
        if unknown:
            raise ConfigError(
                f"Unknown setting(s) {unknown} in {config_file} for `datainf {command}`; known: {sorted(d for d in options if d != 'config')}."
            )
        for key, value in data.items():
            resolved[key] = _convert(options[key], value, f"{key!r} in {config_file}")
    for key, value in explicit.items():
        if key in ("config", "command"):
            continue
        if key not in options:  # flags that datainf.demo registered itself
            resolved[key] = value
            continue
        opt = options[key]
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


# ---------------------------------------------------------------------------------------------- output folders


def _saved(command: str, config: Mapping[str, Any]) -> dict[str, Any]:
    from datainf import __version__

    out: dict[str, Any] = {"format": _FORMAT, "command": command, "datainf_version": __version__}
    out.update({k: v for k, v in config.items() if k not in _NOT_SAVED})
    return out


def _differences(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(stored) | set(new)) - _NOT_COMPARED)
    return [k for k in keys if stored.get(k) != new.get(k)]


def _write_json_atomic(path: Path, data: Any) -> None:
    from datainf.store import atomic_write_json

    atomic_write_json(path, data)


def _claim_out(command: str, config: Mapping[str, Any], *, allow_store: bool = False) -> tuple[Path, bool]:
    """Check ``<out>`` against the configuration; clear it for ``--overwrite``.

    Returns:
        ``(out, same)``: ``same`` is true when ``<out>`` already holds (possibly partial) results of
        this very configuration, so finished outputs can be reused.

    Raises:
        ConfigError: ``<out>`` holds results of another configuration and ``--overwrite`` was not
            given, or it is a non-empty folder that datainf did not write.
    """
    if not config.get("out"):
        raise ConfigError(f"`datainf {command}` needs --out DIR (or 'out' in the --config file).")
    out = Path(config["out"])
    new = _saved(command, config)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder.")
    marker = out / CONFIG_FILE
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        diffs = _differences(stored, new) if isinstance(stored, dict) else ["(unreadable config.json)"]
        if stored.get("command") not in (None, command):
            diffs = ["command"] + diffs
        if not diffs and not config.get("overwrite"):
            return out, True
        if diffs and not config.get("overwrite"):
            shown = ", ".join(f"{k} (stored {stored.get(k)!r}, now {new.get(k)!r})" for k in diffs[:5])
            raise ConfigError(
                f"{out} holds results of a different configuration: {shown}"
                f"{' ...' if len(diffs) > 5 else ''}. Pass --overwrite to replace them, or choose another --out."
            )
        logger.info("Clearing %s (--overwrite).", out)
        shutil.rmtree(out)
    elif out.is_dir() and any(out.iterdir()):
        is_store = (out / "manifest.json").is_file()
        if not (allow_store and is_store):
            raise ConfigError(
                f"{out} is not empty and was not written by `datainf {command}` (no {CONFIG_FILE}); choose a new or "
                "empty --out folder."
            )
        if config.get("overwrite"):
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, False


# ---------------------------------------------------------------------------------------------- data and models


def _column_map(config: Mapping[str, Any]) -> dict[str, str]:
    mapping = {
        "text": config.get("text_column"),
        "label": config.get("label_column"),
        "prompt": config.get("prompt_column"),
        "response": config.get("response_column"),
        "id": config.get("id_column"),
    }
    return {ours: theirs for ours, theirs in mapping.items() if theirs}


def _required_fields(kind: str) -> list[str]:
    return ["text", "label"] if kind == "classification" else ["response"]


def _load_data(path: str | None, config: Mapping[str, Any], kind: str, flag: str) -> list[dict[str, Any]]:
    from datainf.data.tabular import load_records

    if not path:
        raise ConfigError(f"No data given: pass {flag} PATH.")
    return load_records(path, columns=_column_map(config), required=_required_fields(kind))


def _norm_label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _label_ids(
    records: Sequence[Mapping[str, Any]], label_names: Sequence[str], role: str, train_labels: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Records with ``label`` replaced by its index in ``label_names`` (unknown labels -> DatasetError)."""
    index = {str(n): i for i, n in enumerate(label_names)}
    unseen = sorted({_norm_label(r.get("label")) for r in records} - set(index))
    if unseen:
        raise DatasetError(
            f"{role.capitalize()} labels {unseen[:10]} never occur in training (training labels: {list(label_names)[:20]}). "
            "The classifier cannot score unseen classes: fix the labels or drop those examples."
        )
    return [{**r, "label": index[_norm_label(r.get("label"))]} for r in records]


def _adapter_meta(config: Mapping[str, Any]) -> dict[str, Any]:
    from datainf.models import read_adapter_metadata

    if not config.get("adapter"):
        raise ConfigError("Gradients need a trained LoRA adapter: pass --adapter DIR (e.g. the --out of `datainf finetune`).")
    return read_adapter_metadata(config["adapter"])


def _resolve_model_settings(config: dict[str, Any], meta: Mapping[str, Any]) -> None:
    """Fill ``kind`` and ``max_length`` from the adapter's training settings when not given, and
    check that the model and adapter folders exist (before any data is read)."""
    from datainf.models import resolve_adapter_dir, resolve_model_dir

    if config.get("kind") is None:
        config["kind"] = meta.get("kind") or "classification"
    if config.get("max_length") is None:
        trained = (meta.get("finetune_config") or {}).get("max_length")
        if trained:
            config["max_length"] = int(trained)
    if not config.get("model"):
        raise ConfigError("No base model given: pass --model DIR (a local folder written by save_pretrained).")
    resolve_model_dir(config["model"])
    resolve_adapter_dir(config["adapter"])


def _make_task(kind: str, tokenizer: Any, config: Mapping[str, Any], num_labels: int | None) -> Any:
    from datainf.gradients import CausalLMConfig, CausalLMTask, SequenceClassificationConfig, SequenceClassificationTask

    if kind == "classification":
        return SequenceClassificationTask(tokenizer, SequenceClassificationConfig(max_length=config.get("max_length")), num_labels=num_labels)
    return CausalLMTask(tokenizer, CausalLMConfig(max_length=config.get("max_length")))


def _encode_for_model(
    records: list[dict[str, Any]], model: Any, meta: Mapping[str, Any], role: str
) -> list[dict[str, Any]]:
    """Classification records with integer labels matching the model's head."""
    names = meta.get("label_names")
    if names:
        return _label_ids(records, names, role)
    labels = [r.get("label") for r in records]
    if all(isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, float) and v.is_integer()) for v in labels):
        return [{**r, "label": int(r["label"])} for r in records]
    label2id = {str(k): int(v) for k, v in (getattr(getattr(model, "config", None), "label2id", None) or {}).items()}
    return _label_ids(records, [n for n, _ in sorted(label2id.items(), key=lambda kv: kv[1])], role) if label2id else records


def _compute_store(
    model: Any,
    task: Any,
    records: list[dict[str, Any]],
    path: Path,
    config: Mapping[str, Any],
    *,
    before_compute: Callable[[], None] | None = None,
) -> Any:
    """Create (or reopen) the disk store at ``path`` and fill it with the records' gradients.

    Under torchrun rank 0 alone creates the store (and runs ``before_compute``); every rank then
    computes its share of the missing examples (:func:`~datainf.gradients.collect_gradients`).
    """
    from datainf.distributed import dist_context
    from datainf.gradients import collect_gradients, find_lora_blocks, gradient_fingerprint
    from datainf.store import GradientStore

    ctx = dist_context()
    blocks = find_lora_blocks(model)

    def prepare() -> Any:
        store = GradientStore.create(
            path,
            block_dims=blocks.block_dims,
            dtype=config.get("dtype", "float32"),
            fingerprint=gradient_fingerprint(model, task, blocks),
            shard_size=int(config.get("shard_size", 1024)),
            overwrite=False,
        )
        foreign = sorted(set(store.ids) - {str(r["id"]) for r in records})
        if foreign:
            raise ConfigError(
                f"The gradient store {path} holds examples that are not in the data (e.g. {foreign[:5]}); pass --overwrite "
                "to recompute it."
            )
        if before_compute is not None:
            before_compute()
        return store

    if ctx.is_distributed:
        def prepare_on_main() -> None:
            prepare()

        _on_main(ctx, "Preparing the gradient store", prepare_on_main)
        target: Any = path  # every rank opens the folder; each writes its own part of it
    else:
        target = prepare()
    return collect_gradients(
        model,
        task,
        records,
        store=target,
        batch_size=int(config.get("grad_batch_size", 16)),
        device=config.get("device"),
        dtype=config.get("dtype", "float32"),
        shard_size=int(config.get("shard_size", 1024)),
        progress=not config.get("quiet"),
    )


def _on_main(ctx: Any, what: str, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 only (writing outputs), and hand its result to every rank.

    A failure on rank 0 stops every rank (:meth:`~datainf.distributed.DistributedContext.raise_if_any`).
    In a single process this is just ``work()``.
    """
    if not ctx.is_distributed:
        return work()
    result, error = None, None
    if ctx.is_main:
        try:
            result = work()
        except Exception as err:
            error = err
    ctx.raise_if_any(error, what)
    return ctx.broadcast_object(result)


def _on_every_rank(ctx: Any, what: str, work: Callable[[], Any]) -> Any:
    """Run ``work`` on every rank; if it fails on any rank, every rank stops (no rank is left waiting
    in a collective). In a single process this is just ``work()``."""
    if not ctx.is_distributed:
        return work()
    try:
        result = work()
    except Exception as err:
        ctx.raise_if_any(err, what)
        raise
    ctx.raise_if_any(None, what)
    return result


def _check_same_command(ctx: Any, command: str, config: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """Under torchrun: stop every rank unless all were given the same settings and data (fingerprints)."""
    if not ctx.is_distributed:
        return
    from datainf.gradients import dataset_fingerprint, example_ids

    payload: dict[str, Any] = {k: v for k, v in _saved(command, config).items() if k not in _NOT_COMPARED}
    for role, records in data.items():
        payload[f"data:{role}"] = dataset_fingerprint(records, example_ids(records))
    ctx.check_same(payload, f"settings of `datainf {command}`")


def _open_store(path: str, flag: str) -> Any:
    from datainf.errors import StoreCorruptedError
    from datainf.store import GradientStore

    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"{flag} {folder} does not exist; compute it first with `datainf grads --out {folder}`.")
    try:
        return GradientStore.open(folder)
    except StoreCorruptedError:
        if (folder / "store" / "manifest.json").is_file():
            return GradientStore.open(folder / "store")
        raise


# ---------------------------------------------------------------------------------------------- commands


def cmd_finetune(config: dict[str, Any]) -> int:
    """``datainf finetune``: LoRA fine-tuning; writes ``<out>/adapter`` and ``<out>/config.json``."""
    from datainf.data.tabular import encode_labels
    from datainf.finetune import FinetuneConfig, finetune_lora
    from datainf.models import load_model, resolve_model_dir

    if config.get("kind") is None:
        config["kind"] = "classification"
    if config.get("max_length") is None:
        config["max_length"] = 128
    if not config.get("model"):
        raise ConfigError("No base model given: pass --model DIR (a local folder written by save_pretrained).")
    resolve_model_dir(config["model"])
    ft = FinetuneConfig.from_dict(
        {
            "kind": config["kind"],
            "r": config["r"],
            "alpha": config["alpha"],
            "target_modules": tuple(config["target_modules"]),
            "dropout": config["dropout"],
            "epochs": config["epochs"],
            "lr": config["lr"],
            "batch_size": config["batch_size"],
            "warmup_ratio": config["warmup_ratio"],
            "max_length": config["max_length"],
            "weight_decay": config["weight_decay"],
            "max_grad_norm": config["max_grad_norm"],
            "seed": config["seed"],
        }
    )
    records = _load_data(config.get("data"), config, ft.kind, "--data")
    out, same = _claim_out("finetune", config)
    adapter_dir = out / "adapter"
    if same and (adapter_dir / "adapter_config.json").is_file():
        print(f"adapter (already trained with these settings): {adapter_dir}")
        return 0
    _write_json_atomic(out / CONFIG_FILE, _saved("finetune", config))
    names: list[str] | None = None
    if ft.kind == "classification":
        names = encode_labels(records, [])[0]
    model, tokenizer = load_model(
        config["model"], kind=ft.kind, num_labels=len(names) if names else None, device=config["device"], seed=ft.seed
    )
    path = finetune_lora(
        model, tokenizer, records, ft, output_dir=adapter_dir, label_names=names, overwrite=True, progress=not config["quiet"]
    )
    log = json.loads((path / "training_log.json").read_text())
    losses = ", ".join(f"{e['loss']:.4f}" for e in log["epochs"])
    print(f"training loss per epoch: {losses}")
    print(f"adapter: {path}")
    return 0


def _load_for_grads(config: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    from datainf.models import load_model

    from datainf.distributed import dist_context

    meta = _adapter_meta(config)
    _resolve_model_settings(config, meta)
    device = dist_context().resolve_device(config["device"])  # "cuda" -> this rank's GPU under torchrun
    model, tokenizer = load_model(
        config["model"], kind=config["kind"], num_labels=config.get("num_labels"), adapter=config["adapter"], device=str(device)
    )
    return model, tokenizer, meta


def cmd_grads(config: dict[str, Any]) -> int:
    """``datainf grads``: per-example gradients of ``--data`` into the store folder ``<out>``.

    Under ``torchrun`` every rank runs the same command: rank 0 claims ``<out>``, each rank computes
    a share of the examples into its part of the store, rank 0 merges the parts and prints.
    """
    from datainf.distributed import dist_context

    ctx = dist_context()

    def read() -> list[dict[str, Any]]:
        _resolve_model_settings(config, _adapter_meta(config))
        return _load_data(config.get("data"), config, config["kind"], "--data")

    records = _on_every_rank(ctx, "Reading the data", read)
    _check_same_command(ctx, "grads", config, {"data": records})
    out, _ = _on_main(ctx, "Checking the output folder", lambda: _claim_out("grads", config, allow_store=True))
    model, tokenizer, meta = _load_for_grads(config)
    if config["kind"] == "classification":
        records = _encode_for_model(records, model, meta, "data")
    task = _make_task(config["kind"], tokenizer, config, getattr(model.config, "num_labels", None) if config["kind"] == "classification" else None)
    store = _compute_store(
        model, task, records, out, config, before_compute=lambda: _write_json_atomic(out / CONFIG_FILE, _saved("grads", config))
    )
    if ctx.is_main:
        processes = f" by {ctx.world_size} processes" if ctx.is_distributed else ""
        print(
            f"gradients: {store.num_examples} examples x {len(store.block_dims)} blocks "
            f"({sum(store.block_dims.values())} parameters){processes}"
        )
        print(f"store: {out}")
    return 0


def _methods(config: Mapping[str, Any]) -> list[str]:
    from datainf.methods import available_methods

    methods = list(dict.fromkeys(m.strip().lower().replace("-", "_") for m in config["method"]))
    known = list(available_methods())
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"Unknown method(s) {unknown}; choose from {known}.")
    if not methods:
        raise ConfigError(f"No method given; choose from {known}.")
    opts = config.get("method_options") or {}
    bad = [k for k in opts if k not in methods]
    if bad:
        raise ConfigError(f"--method-options names method(s) {bad} that are not being run ({methods}).")
    for name, value in opts.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"--method-options[{name!r}] must be a JSON object of options, got {value!r}.")
    return methods


def _write_table(scores: Any, path_stem: Path, table_format: str) -> Path:
    from datainf.store import atomic_write_bytes

    frame = scores.to_pandas()
    if table_format == "parquet":
        if importlib.util.find_spec("pyarrow") is None:
            raise ConfigError("--table-format parquet needs the pyarrow package (pip install pyarrow); use csv.")
        import io

        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        path = path_stem.with_suffix(".parquet")
        atomic_write_bytes(path, buffer.getvalue())
        return path
    path = path_stem.with_suffix(".csv")
    atomic_write_bytes(path, frame.to_csv(index=False).encode())
    return path


def _still_valid(scores: Any, train_store: Any, test_store: Any) -> bool:
    """Whether finished scores of this configuration were computed from these very gradients."""
    same = (
        scores.train_ids == train_store.ids
        and scores.test_ids == test_store.ids
        and scores.settings.get("fingerprint") == train_store.fingerprint
    )
    if not same:
        logger.info("The %s scores in the output folder came from other gradients; recomputing them.", scores.method)
    return bool(same)


def cmd_score(config: dict[str, Any]) -> int:
    """``datainf score``: influence of every training example; ``<out>/scores-<method>.safetensors`` + table.

    Under ``torchrun`` every rank runs the same command and computes a share of every sum; rank 0
    alone writes the outputs and prints.
    """
    from datainf.distributed import dist_context
    from datainf.influence import InfluenceConfig, influence_from_config
    from datainf.scores import SIGN_CONVENTION, Scores

    ctx = dist_context()
    methods = _methods(config)
    from_stores = bool(config.get("train_grads") or config.get("test_grads"))
    from_data = bool(config.get("train_data") or config.get("test_data"))
    if from_stores and from_data:
        raise ConfigError("Give either --train-grads/--test-grads (stores) or --train-data/--test-data (with --model/--adapter), not both.")
    if not from_stores and not from_data:
        raise ConfigError("Nothing to score: pass --train-grads and --test-grads, or --model, --adapter, --train-data and --test-data.")
    influence_configs = {  # built (and so validated) before any work
        name: InfluenceConfig(
            method=name,
            mode=config["mode"],
            damping=config["damping"],
            fixed_lambda=config.get("fixed_lambda"),
            method_options=dict((config.get("method_options") or {}).get(name, {})),
            batch_size=config["score_batch_size"],
            device=config["device"],
        )
        for name in methods
    }
    if from_stores:
        if not (config.get("train_grads") and config.get("test_grads")):
            raise ConfigError("Pass both --train-grads and --test-grads.")
        _check_same_command(ctx, "score", config, {})  # the gradients themselves are compared by influence
        train_store, test_store = _on_every_rank(
            ctx,
            "Opening the gradient stores",
            lambda: (_open_store(config["train_grads"], "--train-grads"), _open_store(config["test_grads"], "--test-grads")),
        )
        out, same = _on_main(ctx, "Checking the output folder", lambda: _claim_and_save_score_config(config))
    else:
        if not (config.get("train_data") and config.get("test_data")):
            raise ConfigError("Pass both --train-data and --test-data.")

        def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            _resolve_model_settings(config, _adapter_meta(config))
            train = _load_data(config["train_data"], config, config["kind"], "--train-data")
            test = _load_data(config["test_data"], config, config["kind"], "--test-data")
            if config["kind"] == "classification":
                from datainf.data.tabular import encode_labels

                encode_labels(train, test)  # test labels unseen in the training data -> DatasetError
            return train, test

        train, test = _on_every_rank(ctx, "Reading the data", read)
        _check_same_command(ctx, "score", config, {"train": train, "test": test})
        out, same = _on_main(ctx, "Checking the output folder", lambda: _claim_and_save_score_config(config))
        model, tokenizer, meta = _load_for_grads(config)
        if config["kind"] == "classification":
            train = _encode_for_model(train, model, meta, "training")
            test = _encode_for_model(test, model, meta, "test")
        num_labels = getattr(model.config, "num_labels", None) if config["kind"] == "classification" else None
        task = _make_task(config["kind"], tokenizer, config, num_labels)
        train_store = _compute_store(model, task, train, out / "grads-train", config)
        test_store = _compute_store(model, task, test, out / "grads-test", config)

    rows = []
    for name in methods:
        target = out / f"scores-{name}.safetensors"

        def finished(target: Path = target) -> Any:
            scores = Scores.load(target) if same and target.is_file() else None
            return scores if scores is not None and _still_valid(scores, train_store, test_store) else None

        # rank 0 decides (every rank must then take the same branch: influence runs collectives)
        reused_scores = _on_main(ctx, "Reading finished scores", finished)
        if reused_scores is not None:
            scores, reused = reused_scores, True
        else:
            scores = influence_from_config(train_store, test_store, influence_configs[name], progress=not config["quiet"])
            reused = False
        if ctx.is_main:
            table = _write_table(scores, out / f"scores-{name}", config["table_format"])
            if not reused:
                scores.save(target)  # last: its presence marks the method as done
            rows.append((name, scores, target, table, reused))
    ctx.barrier()  # no rank exits before rank 0 has written everything
    if not ctx.is_main:
        return 0

    print(f"# {SIGN_CONVENTION}")
    print(f"{'method':<14} {'seconds':>8}  most harmful training examples")
    for name, scores, _, _, reused in rows:
        top = ", ".join(f"{tid} ({value:+.3g})" for tid, value in scores.top_harmful(3))
        seconds = scores.diagnostics.get("seconds")
        shown = "reused" if reused else (f"{seconds:.2f}" if isinstance(seconds, (int, float)) else "-")
        print(f"{name:<14} {shown:>8}  {top}")
    for name, _, target, table, _ in rows:
        print(f"scores ({name}): {target}  table: {table}")
    return 0


def _claim_and_save_score_config(config: Mapping[str, Any]) -> tuple[Path, bool]:
    out, same = _claim_out("score", config)
    _write_json_atomic(out / CONFIG_FILE, _saved("score", config))
    return out, same


def cmd_report(config: dict[str, Any]) -> int:
    """``datainf report``: ``<out>/index.html`` with the top harmful / helpful training examples."""
    from datainf.data.tabular import load_records
    from datainf.report import write_scores_report
    from datainf.scores import Scores

    files = config.get("scores") or []
    if not files:
        raise ConfigError("Pass --scores FILE (a scores-<method>.safetensors written by `datainf score`).")
    if not config.get("data"):
        raise ConfigError("Pass --data PATH: the training data the scores are about (to show the texts).")
    loaded: dict[str, Any] = {}
    for file in files:
        if not Path(file).is_file():
            raise ConfigError(f"Scores file {file} does not exist.")
        scores = Scores.load(file)
        key = scores.method if scores.method not in loaded else f"{scores.method} ({Path(file).name})"
        loaded[key] = scores
    records = load_records(config["data"], columns=_column_map(config))
    test_records = load_records(config["test_data"], columns=_column_map(config)) if config.get("test_data") else None
    ids = {str(r["id"]) for r in records}
    for name, scores in loaded.items():
        missing = [t for t in scores.train_ids if t not in ids]
        if len(missing) == len(scores.train_ids):
            raise DatasetError(
                f"None of the {len(missing)} training ids of the {name} scores (e.g. {missing[:3]}) is in {config['data']}; "
                "pass the training data the scores were computed on (and the same --id-column)."
            )
    out, _ = _claim_out("report", config)
    _write_json_atomic(out / CONFIG_FILE, _saved("report", config))
    path = write_scores_report(out, loaded, records, k=config["k"], test_records=test_records, max_test_examples=config["max_test"])
    print(f"report: {path}")
    return 0


def cmd_demo(config: dict[str, Any], args: argparse.Namespace) -> int:
    """``datainf demo``: delegates to :func:`datainf.demo.main_demo`."""
    if importlib.util.find_spec("datainf.demo") is None:
        raise ConfigError("The demo is not available in this installation (datainf.demo is missing).")
    demo = importlib.import_module("datainf.demo")
    namespace = argparse.Namespace(**config, config=getattr(args, "config", None))
    result = demo.main_demo(namespace)
    return int(result) if isinstance(result, int) else 0


_HANDLERS: dict[str, Callable[[dict[str, Any]], int]] = {
    "finetune": cmd_finetune,
    "grads": cmd_grads,
    "score": cmd_score,
    "report": cmd_report,
}


# ---------------------------------------------------------------------------------------------- main


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


def _has_progress(out: Path) -> bool:
    """Whether ``out`` holds finished work worth keeping (gradient shards, scores, an adapter)."""
    patterns = ("shard-*.safetensors", "scores-*.safetensors", "adapter_model.safetensors")
    return any(next(out.rglob(p), None) is not None for p in patterns)


def _is_main_process() -> bool:
    from datainf.distributed import is_main_process

    return is_main_process()


def _one_line(message: str) -> str:
    """Fold a multi-line error message (e.g. a bullet list of problems) into one line."""
    out = ""
    for line in (ln.strip() for ln in message.splitlines()):
        if not line:
            continue
        line = line[2:] if line.startswith("- ") else line
        out = line if not out else out + (" " if out.endswith(":") else "; ") + line
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``datainf`` command line; returns the exit code (0, 2 on bad input, 130 on Ctrl-C)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(with_demo_options=bool(argv) and argv[0] == "demo")
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
        started = time.perf_counter()
        out = Path(config["out"]) if config.get("out") else None
        fresh = out is not None and (not out.exists() or (out.is_dir() and not any(out.iterdir())))
        with _logging_setup(bool(config.get("verbose")), bool(config.get("quiet"))):
            try:
                if command == "demo":
                    code = cmd_demo(config, args)
                else:
                    code = _HANDLERS[command](config)
            except DataInfError:
                if fresh and out is not None and out.is_dir() and not _has_progress(out) and _is_main_process():
                    shutil.rmtree(out, ignore_errors=True)  # leave no claimed-but-empty folder behind
                raise
        logger.info("datainf %s finished in %.1f s", command, time.perf_counter() - started)
        return code
    except DataInfError as err:
        # under torchrun, errors every rank raises together (e.g. a configuration mismatch) are printed once, by rank 0
        main_process = _is_main_process()
        if main_process or not getattr(err, "all_ranks", False):
            prefix = "" if main_process else f"[rank {os.environ.get('RANK', '?')}] "
            print(f"{prefix}datainf: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("datainf: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
