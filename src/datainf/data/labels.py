"""Class labels <-> class ids: the one label encoder of datainf.

Records carry labels as strings (``"pos"``) or integers (``3``, or ``3.0`` as pandas reads an integer
column with gaps). A classification head needs class ids ``0..K-1``. :class:`LabelEncoder` holds the
``K`` class names in class-id order and maps records both ways; fine-tuning, gradient collection,
scoring and :class:`~datainf.tasks.SequenceClassificationTask` all use it, so a label means the same
class everywhere.

Where the names come from:

* :meth:`LabelEncoder.fit`: the distinct labels of the training records, sorted (numerically for
  integer labels, so integer labels ``0..K-1`` keep their values);
* :meth:`LabelEncoder.from_names`: names given by the caller;
* :meth:`LabelEncoder.from_model`: names given by the caller (``--label-names``), else the names an
  adapter was trained with (its ``datainf_adapter.json``), else the model's ``config.id2label``;
  integer labels are then taken as class ids. transformers' placeholder names (``LABEL_0``,
  ``LABEL_1``, ...) name nothing: string labels are then refused with a message asking for
  ``--label-names``;
* :func:`class_label_names`: the names of a Hugging Face ``datasets`` ``ClassLabel`` column (a
  ``Dataset`` / ``DatasetDict`` or a ``save_to_disk`` folder), whose values are class ids.

Labels are compared as strings after one normalisation: integral floats and booleans become
integers (``3.0`` -> ``"3"``, ``True`` -> ``"1"``), as :meth:`LabelEncoder.fit` counts them.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datainf.errors import ConfigError, DatasetError, EmptyInputError

__all__ = ["LabelEncoder", "class_label_names", "is_placeholder_names", "parse_label_names"]

_MAX_LISTED = 10
_PLACEHOLDER = re.compile(r"LABEL_(\d+)")


def is_placeholder_names(names: Sequence[Any]) -> bool:
    """Whether ``names`` are transformers' default class names ``LABEL_0, LABEL_1, ...`` (in id order),
    which a model config holds when nobody named the classes."""
    return bool(names) and all(
        (m := _PLACEHOLDER.fullmatch(str(n))) is not None and int(m.group(1)) == i for i, n in enumerate(names)
    )


def parse_label_names(value: str | Sequence[Any] | None) -> tuple[str, ...] | None:
    """Class names from ``"a,b,c"`` (the ``--label-names`` flag) or a sequence, in class-id order;
    ``None`` stays ``None``.

    Raises:
        ConfigError: an empty name, or no names.
    """
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p).strip() for p in value]
    if not parts or any(not p for p in parts):
        raise ConfigError(
            f"Label names {value!r} hold an empty name; give every class a name in class-id order, e.g. --label-names neg,pos."
        )
    return tuple(parts)


def class_label_names(source: Any, field: str = "label") -> tuple[str, ...] | None:
    """The class names of a ``datasets`` ``ClassLabel`` column, or ``None`` when ``field`` is not one.

    Args:
        source: a ``datasets.Dataset`` or single-split ``DatasetDict``, or the path of a folder written
            by ``save_to_disk`` (anything else, e.g. a JSONL path, gives ``None``).
        field: the column holding the labels (the file's column name, before any renaming).

    Returns:
        ``ClassLabel.names`` in class-id order (the column's integer values are class ids).
    """
    dataset = source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_dir() or not any(
            (path / m).exists() for m in ("dataset_info.json", "state.json", "dataset_dict.json")
        ):
            return None
        try:
            import datasets
        except ImportError:
            return None
        dataset = datasets.load_from_disk(str(path))
    splits = getattr(dataset, "values", None)
    if callable(splits) and not hasattr(dataset, "features"):  # a DatasetDict: the features of its splits
        values = list(splits())
        if len(values) != 1:
            return None
        dataset = values[0]
    feature = (getattr(dataset, "features", None) or {}).get(field)
    names = getattr(feature, "names", None)
    if isinstance(names, (list, tuple)) and names and type(feature).__name__ == "ClassLabel":
        return tuple(str(n) for n in names)
    return None


def _preview(items: Sequence[Any], limit: int = _MAX_LISTED) -> str:
    """Comma-separated ``repr`` of the first ``limit`` items, with a count of the rest."""
    shown = ", ".join(repr(x) for x in list(items)[:limit])
    rest = len(items) - limit
    return shown + (f", ... ({rest} more)" if rest > 0 else "")


def _is_missing(value: Any) -> bool:
    """True for ``None`` and float NaN (how pandas reports an empty cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _record_id(record: Mapping[str, Any], position: int) -> str:
    return str(record.get("id", position))


def _typed_label(value: Any, record_id: str, field: str) -> str | int:
    """A str or int label; booleans and integral floats become ints.

    Raises:
        DatasetError: the label is missing, a non-integral number, or of another type.
    """
    if _is_missing(value):
        raise DatasetError(f"Record {record_id!r} has no {field!r} value. Every record needs a label.")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise DatasetError(
            f"Record {record_id!r} has a non-integer numeric {field!r} {value!r}. Labels must be strings or integers."
        )
    if isinstance(value, str):
        return value
    raise DatasetError(
        f"Record {record_id!r} has a {field!r} of type {type(value).__name__}; labels must be strings or integers."
    )


def _typed_labels(records: Sequence[Mapping[str, Any]], field: str) -> list[str | int]:
    return [_typed_label(r.get(field), _record_id(r, i), field) for i, r in enumerate(records)]


def _label_key(value: Any) -> str:
    """The string a label is looked up by: integral floats and booleans as ints, then ``str``."""
    if isinstance(value, bool) or (isinstance(value, float) and value.is_integer()):
        value = int(value)
    return str(value)


def _is_class_id(value: Any) -> bool:
    """An int (not a bool) or an integral float."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


@dataclass(frozen=True)
class LabelEncoder:
    """The class names of a classifier, index = class id, and the mapping of record labels to ids.

    Attributes:
        names: the ``K`` class names as strings; ``names[i]`` is class ``i``.
        class_ids: integer labels are already class ids: when every label of the records passed to
            :meth:`encode` is an integer, they are kept as they are (the range is checked by the
            task against the model's head). Set by :meth:`from_model` when the model's names come
            from its ``config.label2id`` (no adapter label names).
        origin: where the names come from, for error messages: ``"training"`` (the labels of the
            training data: :meth:`fit`, :meth:`from_model`) or ``"given"`` (:meth:`from_names`). Not
            part of equality.
    """

    names: tuple[str, ...]
    class_ids: bool = False
    origin: Literal["training", "given"] = field(default="training", compare=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        object.__setattr__(self, "names", names)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"Label names {repeated} repeat in {list(names)[:20]}; every class needs its own name.")
        if self.origin not in ("training", "given"):
            raise ConfigError(f"origin={self.origin!r}; use 'training' or 'given'.")

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    # ------------------------------------------------------------------------------------ builders

    @classmethod
    def fit(
        cls,
        records: Sequence[Mapping[str, Any]],
        field: str = "label",
        *,
        held_out: Sequence[Mapping[str, Any]] = (),
    ) -> LabelEncoder:
        """The distinct labels of ``records``, sorted (numerically for integers, else alphabetically).

        Args:
            records: the training records, each carrying ``field``.
            field: name of the label field.
            held_out: records of another split (e.g. the test set) checked against the fitted
                classes: same label type, and no label the training records lack.

        Raises:
            EmptyInputError: ``records`` is empty.
            DatasetError: a label is missing or of an unsupported type, labels mix strings and
                integers, or held-out labels do not occur in ``records`` (the message names them).
        """
        if not records:
            raise EmptyInputError("The label encoder got no training records; the label set would be empty.")
        train = _typed_labels(records, field)
        other = _typed_labels(held_out, field)
        if len({type(x) for x in train + other}) > 1:
            examples = sorted(set(train + other), key=repr)
            raise DatasetError(
                f"Labels in {field!r} mix strings and integers ({_preview(examples, 6)}). Use one type for every "
                "record, e.g. convert all labels to strings."
            )
        known = set(train)
        classes = sorted(known)  # one label type, checked above
        unseen = sorted({x for x in other if x not in known})
        if unseen:
            raise DatasetError(
                f"Test labels {_preview(unseen)} never occur in the training records (training labels: "
                f"{_preview(classes)}). A classifier cannot predict unseen classes: add training examples for them "
                "or drop those test records."
            )
        return cls(tuple(str(c) for c in classes))

    @classmethod
    def from_names(cls, names: Sequence[Any], *, class_ids: bool = False) -> LabelEncoder:
        """An encoder for the class names ``names`` (index = class id), e.g. a head's label set.

        ``class_ids=True``: records whose labels are all integers keep them as class ids (e.g. the
        values of a ``ClassLabel`` column); name labels are looked up either way.
        """
        if isinstance(names, str):
            raise ConfigError(f"Label names must be a sequence of names, not the string {names!r}.")
        return cls(tuple(str(n) for n in names), class_ids=class_ids, origin="given")

    @classmethod
    def from_model(
        cls,
        model: Any,
        adapter_meta: Mapping[str, Any] | None = None,
        *,
        label_names: Sequence[Any] | None = None,
    ) -> LabelEncoder:
        """The classes a trained classifier predicts.

        Args:
            model: the classifier (its ``config.id2label`` is read when nothing else names the labels).
            adapter_meta: the adapter's ``datainf_adapter.json``
                (:func:`datainf.models.read_adapter_metadata`); ``{}`` or ``None`` for a foreign adapter.
            label_names: class names given by the caller (CLI: ``--label-names``), in class-id order;
                they win over the others. Their number must be the model's ``config.num_labels``.

        Returns:
            ``label_names`` when given (integer labels are class ids), else the adapter's
            ``label_names`` when it records them, else the model's ``config.id2label`` names in id
            order, with :attr:`class_ids` set: integer labels are taken as class ids, name labels
            are looked up (placeholder names ``LABEL_i`` match no real label: see the module docstring).

        Raises:
            ConfigError: ``label_names`` has another length than the model's head.
        """
        config = getattr(model, "config", None)
        if label_names is not None:
            given = cls.from_names(label_names, class_ids=True)
            head = getattr(config, "num_labels", None)
            if isinstance(head, int) and head != len(given.names):
                raise ConfigError(
                    f"{len(given.names)} label names were given ({list(given.names)[:10]}) but the classifier has "
                    f"{head} classes; give one name per class, in class-id order."
                )
            return given
        names = (adapter_meta or {}).get("label_names")
        if names:
            return cls(tuple(str(n) for n in names))
        label2id = getattr(config, "label2id", None) or {}
        by_label2id = tuple(n for n, _ in sorted(((str(k), int(v)) for k, v in label2id.items()), key=lambda kv: kv[1]))
        id2label = getattr(config, "id2label", None) or {}
        by_id2label = tuple(str(v) for _, v in sorted(((int(k), v) for k, v in id2label.items()), key=lambda kv: kv[0]))
        # real names win over transformers' LABEL_i placeholders, from whichever map holds them
        if (
            (not by_label2id or is_placeholder_names(by_label2id))
            and by_id2label
            and not is_placeholder_names(by_id2label)
        ):
            return cls(by_id2label, class_ids=True)
        return cls(by_label2id or by_id2label, class_ids=True)

    # ------------------------------------------------------------------------------------ mapping

    @property
    def num_labels(self) -> int:
        """``K``, the number of classes."""
        return len(self.names)

    def index(self, label: Any) -> int | None:
        """The class id of one label (after the normalisation in the module docstring), or ``None``."""
        return self._index.get(_label_key(label))

    def encode(self, records: Sequence[Mapping[str, Any]], role: str, *, field: str = "label") -> list[dict[str, Any]]:
        """Copies of ``records`` with ``field`` replaced by its class id.

        Args:
            records: records carrying ``field``.
            role: what the records are (``"training"``, ``"test"``, ``"data"``), for the error message.
            field: name of the label field.

        Raises:
            DatasetError: a label is missing, or some labels are not among :attr:`names` (the message
                lists them).
        """
        if self.class_ids and all(_is_class_id(r.get(field)) for r in records):
            return [{**r, field: int(r[field])} for r in records]
        missing = [_record_id(r, i) for i, r in enumerate(records) if _is_missing(r.get(field))]
        if missing:
            raise DatasetError(
                f"{role.capitalize()} record(s) {_preview(missing)} have no {field!r} value. Every record needs a label."
            )
        keys = [_label_key(r.get(field)) for r in records]
        unseen = sorted(set(keys) - set(self.names))
        if unseen:
            raise DatasetError(self._unknown_message(unseen, role))
        return [{**r, field: self._index[k]} for r, k in zip(records, keys)]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """The class names of class ids ``ids``.

        Raises:
            DatasetError: an id is not in ``[0, K)``.
        """
        bad = [i for i in ids if not _is_class_id(i) or not 0 <= int(i) < len(self.names)]
        if bad:
            raise DatasetError(
                f"Class ids {_preview(bad)} are outside [0, {len(self.names)}) for labels {list(self.names)[:20]}."
            )
        return [self.names[int(i)] for i in ids]

    def _unknown_message(self, unseen: Sequence[str], role: str) -> str:
        if not self.names:
            return (
                f"{role.capitalize()} labels {list(unseen)[:10]} are not class ids, and the model names no classes "
                "(no adapter label_names, no config.label2id): use integer labels in [0, num_labels)."
            )
        if is_placeholder_names(self.names):
            return (
                f"{role.capitalize()} labels {list(unseen)[:10]} are names, but the model names its classes only "
                f"{list(self.names)[:10]} (transformers' placeholders: the adapter was not trained by datainf, so "
                "nothing recorded which name is which class). Pass the names in class-id order, e.g. "
                f"--label-names {','.join(sorted(unseen)[: len(self.names)])} (Python: label_names=[...]), or use "
                "integer class ids as labels."
            )
        if self.origin == "given":
            return (
                f"{role.capitalize()} labels {list(unseen)[:10]} are not among the label names {list(self.names)[:10]}; "
                "fix the labels or the label names."
            )
        return (
            f"{role.capitalize()} labels {list(unseen)[:10]} never occur in training (training labels: "
            f"{list(self.names)[:20]}). The classifier cannot score unseen classes: fix the labels or drop those examples."
        )
