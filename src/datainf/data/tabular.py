"""Load user datasets from disk as plain records.

A *record* is a ``dict[str, Any]`` with a string ``"id"`` field; every loader in
:mod:`datainf.data` returns a ``list`` of them. :func:`load_records` reads the formats people keep
small fine-tuning sets in (JSONL, JSON, CSV, Parquet, a folder written by
``datasets.Dataset.save_to_disk``) and renames the file's columns to the field names datainf expects
(``"text"``, ``"label"``, ``"prompt"``, ...).

Every problem is reported as a :class:`~datainf.errors.DatasetError` (a
:class:`MissingColumnsError` for absent columns, :class:`~datainf.errors.EmptyInputError` for a
dataset with no rows) whose message says what is wrong and how to fix it. :func:`encode_labels` is a
thin wrapper of :class:`~datainf.data.labels.LabelEncoder`, the one label encoder.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datainf.data.labels import LabelEncoder
from datainf.errors import DatasetError, EmptyInputError

__all__ = ["SUPPORTED_FORMATS", "MissingColumnsError", "load_records", "encode_labels"]

logger = logging.getLogger(__name__)

#: File suffix -> format read by :func:`load_records` (a folder means a saved HF dataset).
SUPPORTED_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

_MAX_LISTED = 10
#: Fields holding text: when required, a value that is "" or only whitespace is refused (it gives no tokens).
_TEXT_FIELDS = frozenset({"text", "prompt", "response"})


def _preview(items: Sequence[Any], limit: int = _MAX_LISTED) -> str:
    """Comma-separated ``repr`` of the first ``limit`` items, with a count of the rest."""
    shown = ", ".join(repr(x) for x in list(items)[:limit])
    rest = len(items) - limit
    return shown + (f", ... ({rest} more)" if rest > 0 else "")


def _is_missing(value: Any) -> bool:
    """True for ``None`` and float NaN (how pandas reports an empty CSV/Parquet cell)."""
    if value is None:
        return True
    try:
        return isinstance(value, float) and math.isnan(value)
    except TypeError:  # pragma: no cover - defensive
        return False


def _to_python(value: Any) -> Any:
    """Convert numpy/pandas scalars to plain Python values; map NaN to ``None``."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        value = item()
    if _is_missing(value):
        return None
    return value


def _import_optional(module: str, package: str, purpose: str, path: Path) -> Any:
    """Import an optional dependency or raise a DatasetError saying which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DatasetError(
            f"Reading {path} needs {purpose}, but the Python package {package!r} is not installed. "
            f"Install it with `pip install {package}`, or convert the file to JSONL or CSV."
        ) from exc


def _detect_format(path: Path) -> str:
    """Format name of ``path`` from its suffix, or ``"hf_disk"`` for a folder."""
    if path.is_dir():
        return "hf_disk"
    fmt = SUPPORTED_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(SUPPORTED_FORMATS))
        raise DatasetError(
            f"Cannot tell the format of {path}: unknown suffix {path.suffix or '(none)'!r}. "
            f"Supported suffixes: {known}, or a folder written by datasets' save_to_disk. "
            "Rename the file or convert it to one of these formats."
        )
    return fmt


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path}, line {line_no}: not valid JSON ({exc.msg}). Each line of a JSONL "
                    "file must hold one JSON object; fix or remove that line."
                ) from exc
            if not isinstance(row, dict):
                raise DatasetError(
                    f"{path}, line {line_no}: expected a JSON object ({{...}}), got "
                    f"{type(row).__name__}. Each line of a JSONL file must hold one object."
                )
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        hint = " If it holds one object per line, name it *.jsonl." if exc.lineno > 1 else ""
        raise DatasetError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}).{hint}") from exc
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: expected a JSON list of objects ([{{...}}, {{...}}]), got a "
            f"{type(data).__name__}. Write the records as a list, or as JSONL (one object a line)."
        )
    bad = [i for i, row in enumerate(data) if not isinstance(row, dict)]
    if bad:
        raise DatasetError(
            f"{path}: every list element must be a JSON object; elements at positions {_preview(bad)} are not."
        )
    return data


def _records_from_frame(frame: Any) -> list[dict[str, Any]]:
    """Rows of a pandas DataFrame as plain-Python dicts (NaN -> None)."""
    columns = [str(c) for c in frame.columns]
    return [
        {col: _to_python(val) for col, val in zip(columns, row, strict=True)}
        for row in frame.itertuples(index=False, name=None)
    ]


def _read_csv(path: Path, sep: str, id_column: str) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        # Ids stay strings ("007" must not become 7); other columns get pandas' type inference.
        frame = pd.read_csv(path, sep=sep, dtype={id_column: str})
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{path}: cannot be parsed as {'TSV' if sep == chr(9) else 'CSV'} ({exc}). "
            "Check the delimiter, quoting and that the file is UTF-8."
        ) from exc
    return _records_from_frame(frame)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    _import_optional("pyarrow", "pyarrow", "Parquet support", path)
    import pandas as pd

    return _records_from_frame(pd.read_parquet(path))


def _read_hf_disk(path: Path) -> list[dict[str, Any]]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        raise DatasetError(
            f"{path} is a folder but not one written by datasets' save_to_disk (none of "
            f"{', '.join(markers)} is in it). Pass a data file (JSONL, JSON, CSV, Parquet) or the "
            "folder of a saved dataset."
        )
    datasets = _import_optional("datasets", "datasets", "the Hugging Face `datasets` library", path)
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if len(splits) != 1:
            raise DatasetError(
                f"{path} holds a DatasetDict with splits {splits}; pass the folder of one split "
                f"instead, e.g. {path / splits[0]}."
            )
        loaded = loaded[splits[0]]
    return [dict(row) for row in loaded.to_list()]


def _read_rows(path: Path, fmt: str, id_column: str) -> list[dict[str, Any]]:
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "json":
        return _read_json(path)
    if fmt == "csv":
        return _read_csv(path, ",", id_column)
    if fmt == "tsv":
        return _read_csv(path, "\t", id_column)
    if fmt == "parquet":
        return _read_parquet(path)
    return _read_hf_disk(path)


def _column_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Union of the keys of all rows, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _mapping_hint(fields: Sequence[str]) -> str:
    """Say how to map ``fields`` to file columns."""
    python = ", ".join(f'"{f}": "<column>"' for f in fields)
    return f"columns={{{python}}}, using a column listed above."


class MissingColumnsError(DatasetError):
    """Fields datainf needs are not among the columns of a dataset file.

    The message names the fields and the columns the file has; the attributes carry the same facts
    so that a front end can add its own hint (e.g. the command-line option that maps a field).

    Attributes:
        path: the dataset file.
        missing: our field names that no column fills, e.g. ``("text", "label")``.
        columns: for the missing fields that were mapped to a file column that does not exist,
            field -> that column; empty when the fields were required but not mapped.
        found: the file's columns, in first-seen order.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Path,
        missing: Sequence[str],
        found: Sequence[str],
        columns: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.missing = tuple(missing)
        self.found = tuple(found)
        self.columns = dict(columns or {})


def load_records(
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    required: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Read a dataset file into records with a string ``"id"`` and datainf's field names.

    Args:
        path: a ``.jsonl``/``.ndjson`` file (one JSON object a line), a ``.json`` file (a list of
            objects), a ``.csv``/``.tsv`` file with a header row, a ``.parquet`` file (needs
            ``pyarrow``), or a folder written by ``datasets.Dataset.save_to_disk`` (needs
            ``datasets``).
        columns: maps *our* field name to the file's column name, e.g.
            ``{"text": "sentence", "label": "y"}``. Mapped columns appear in the records under our
            name only; unmapped columns are kept under their own name. A file column that would be
            shadowed by a mapped field of the same name is dropped (logged at DEBUG).
        required: our field names every record must have, with a value that is not missing; a
            required text field (``text``, ``prompt``, ``response``) must not be ``""`` or only whitespace.

    Returns:
        One dict per row, in file order. ``"id"`` comes from the ``"id"`` field (after mapping) if
        the file has one, converted to ``str``; otherwise it is the 0-based row index as a string.

    Raises:
        MissingColumnsError: a mapped or required column does not exist (the message lists the
            columns that do; the error carries them as attributes).
        DatasetError: the file is missing, its format is unknown or unreadable, a required value
            is missing (or a required text is blank; the message lists the ids), an id is missing, or ids repeat.
        EmptyInputError: the file holds no rows.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"Dataset file {path} does not exist. Check the path (cwd: {Path.cwd()}).")
    fmt = _detect_format(path)
    mapping = dict(columns or {})
    rows = _read_rows(path, fmt, mapping.get("id", "id"))
    if not rows:
        raise EmptyInputError(f"Dataset {path} holds no rows. Point to a file with at least one example.")

    present = _column_names(rows)
    present_set = set(present)
    missing_mapped = {ours: theirs for ours, theirs in mapping.items() if theirs not in present_set}
    if missing_mapped:
        wanted = ", ".join(f"{theirs!r} (for field {ours!r})" for ours, theirs in missing_mapped.items())
        raise MissingColumnsError(
            f"{path}: column {wanted} not found. Columns in the file: {present}. Map the field "
            "with " + _mapping_hint(list(missing_mapped)),
            path=path,
            missing=list(missing_mapped),
            found=present,
            columns=missing_mapped,
        )
    sources = set(mapping.values())
    if len(sources) < len(mapping):
        reused = sorted(c for c in sources if list(mapping.values()).count(c) > 1)
        raise DatasetError(
            f"columns maps several fields to the same file column(s) {reused}: {mapping}. Map "
            "each field to its own column."
        )
    renamed = {theirs: ours for ours, theirs in mapping.items()}
    out_fields = [renamed.get(c, c) for c in present if c in sources or c not in mapping]
    missing_required = [f for f in required if f not in out_fields and f != "id"]
    if missing_required:
        raise MissingColumnsError(
            f"{path}: required field(s) {missing_required} not found. Columns in the file: "
            f"{present}. If the data is there under another name, map it with " + _mapping_hint(missing_required),
            path=path,
            missing=missing_required,
            found=present,
        )
    shadowed = [c for c in present if c in mapping and c not in sources]
    if shadowed:
        logger.debug("%s: columns %s are shadowed by mapped fields and dropped", path, shadowed)

    records: list[dict[str, Any]] = []
    has_id = "id" in out_fields
    for index, row in enumerate(rows):
        fields: dict[str, Any] = {}
        for col, value in row.items():
            col = str(col)
            if col in sources:
                fields[renamed[col]] = value
            elif col not in mapping:
                fields[col] = value
        raw_id = fields.pop("id", None) if has_id else index
        if _is_missing(raw_id) or raw_id == "":
            raise DatasetError(
                f"{path}: row {index} has no id. Fill in every id, or drop the id column to number rows automatically."
            )
        if isinstance(raw_id, float) and raw_id.is_integer():
            raw_id = int(raw_id)
        records.append({"id": str(raw_id), **fields})

    counts = Counter(r["id"] for r in records)
    dupes = [i for i, c in counts.items() if c > 1]
    if dupes:
        raise DatasetError(
            f"{path}: ids must be unique, but {len(dupes)} repeat: {_preview(dupes)}. Fix the id "
            "column, or drop it to number rows automatically."
        )
    for field in required:
        empty = [r["id"] for r in records if _is_missing(r.get(field))]
        if empty:
            raise DatasetError(
                f"{path}: required field {field!r} is missing in {len(empty)} record(s), ids "
                f"{_preview(empty)}. Fill them in or remove those rows."
            )
    for field in (f for f in required if f in _TEXT_FIELDS):
        blank = [r["id"] for r in records if isinstance(r.get(field), str) and not r[field].strip()]
        if blank:
            raise DatasetError(
                f"{path}: required text field {field!r} is empty or only whitespace in {len(blank)} record(s), ids "
                f"{_preview(blank)}. Fill them in or remove those rows."
            )
    logger.info("Loaded %d records from %s (%s)", len(records), path, fmt)
    return records


def encode_labels(
    train_records: Sequence[Mapping[str, Any]],
    test_records: Sequence[Mapping[str, Any]],
    field: str = "label",
) -> tuple[list[str], list[int], list[int]]:
    """Map string or integer labels to contiguous class indices ``0..K-1``.

    A thin wrapper of :class:`~datainf.data.labels.LabelEncoder`: the classes are
    ``LabelEncoder.fit(train_records, field, held_out=test_records).names``, the distinct labels of the
    *training* records, sorted (numerically for integer labels, alphabetically for strings), so
    integer labels ``0..K-1`` keep their values.

    Args:
        train_records: records carrying ``field``; define the label set.
        test_records: records carrying ``field``; every label must occur in ``train_records``.
        field: name of the label field.

    Returns:
        ``(label_names, train_label_ids, test_label_ids)``: the class names as strings (index =
        class id) and the class id of each record, in input order.

    Raises:
        EmptyInputError: ``train_records`` is empty.
        DatasetError: a label is missing or of an unsupported type, labels mix strings and
            integers, or test labels do not occur in training (the message names them).
    """
    encoder = LabelEncoder.fit(train_records, field, held_out=test_records)
    train_ids = [r[field] for r in encoder.encode(train_records, "training", field=field)]
    test_ids = [r[field] for r in encoder.encode(test_records, "test", field=field)]
    return list(encoder.names), train_ids, test_ids
