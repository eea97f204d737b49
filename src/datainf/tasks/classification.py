"""Sequence classification: the cross-entropy of each example's label (docs/gradients.md section 4.2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datainf.data.labels import LabelEncoder
from datainf.errors import ConfigError, DatasetError, TaskInputError
from datainf.tasks.base import (
    _MAX_LISTED,
    TaskBatch,
    _as_token_list,
    _list_ids,
    _model_config,
    _pad,
    _TextTask,
    _upcast,
)

__all__ = ["SequenceClassificationConfig", "SequenceClassificationTask", "training_records"]


@dataclass
class SequenceClassificationConfig:
    """Knobs of :class:`SequenceClassificationTask`.

    Attributes:
        text_field: record key of the text (records may instead hold pre-tokenized ``input_ids``).
        text_pair_field: record key of a second text (sentence pairs), or ``None``.
        label_field: record key of the label: an int in ``[0, num_labels)`` or a name in the model's
            ``config.label2id`` (looked up by :class:`~datainf.data.labels.LabelEncoder`).
        max_length: longest token sequence; longer examples are truncated (counted, and reported as
            a warning). ``None``: the model's / tokenizer's limit.
        pad_token_id: padding id when the tokenizer has none (or no tokenizer is given).
    """

    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    max_length: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is too short; use at least 2 tokens (or None).")


class SequenceClassificationTask(_TextTask):
    """Sequence classification: ``l_i = cross_entropy(logits_i, y_i)``, one loss per example.

    Reduction: none across examples (each example's loss is its own cross-entropy); the model sees
    right-padded ``input_ids`` with an ``attention_mask`` so padding does not change any example's
    logits. Labels are not passed to the model (HF's built-in loss is a batch mean).

    Records: ``{"text": str, "label": int | str}`` (field names configurable), or pre-tokenized
    ``{"input_ids": list[int], "label": ...}`` (cut from the right when too long).

    Args:
        tokenizer: a Hugging Face tokenizer (needed for text records).
        config: a :class:`SequenceClassificationConfig`.
        num_labels: number of classes; default: the model's ``config.num_labels``.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        config: SequenceClassificationConfig | None = None,
        *,
        num_labels: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config or SequenceClassificationConfig()
        self._given_num_labels = num_labels
        self._num_labels = num_labels
        self._labels = LabelEncoder(())
        self._max_length: int | None = None

    def describe(self) -> str:
        return f"{super().describe()}|tokenizer={self._tokenizer_name()}|num_labels={self._given_num_labels}"

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        cfg = _model_config(model)
        self._num_labels = self._given_num_labels
        if self._num_labels is None and cfg is not None and getattr(cfg, "num_labels", None):
            self._num_labels = int(cfg.num_labels)
        self._labels = LabelEncoder.from_model(model)  # the model's label2id names (string labels)

    def _label(self, example: Mapping[str, Any], ex_id: str) -> tuple[int | None, str | None]:
        key = self.config.label_field
        if key not in example:
            return None, f"{ex_id!r}: no {key!r} field"
        raw = example[key]
        if isinstance(raw, str):
            index = self._labels.index(raw)
            if index is not None:
                return index, None
            return None, f"{ex_id!r}: label {raw!r} is not in the model's label2id {sorted(self._labels.names)[:10]}"
        try:
            label = int(raw)
        except (TypeError, ValueError):
            return None, f"{ex_id!r}: label {raw!r} is not an integer"
        if isinstance(raw, float) and raw != label:
            return None, f"{ex_id!r}: label {raw!r} is not an integer"
        if label < 0 or (self._num_labels is not None and label >= self._num_labels):
            return None, f"{ex_id!r}: label {label} is out of range [0, {self._num_labels})"
        return label, None

    def validate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> None:
        """Every example needs a text (or ``input_ids``) and a label in range."""
        problems: list[str] = []
        bad: list[str] = []
        for ex, ex_id in zip(examples, ids):
            _, problem = self._label(ex, ex_id)
            if problem is None and "input_ids" not in ex:
                if self.config.text_field not in ex:
                    problem = f"{ex_id!r}: no {self.config.text_field!r} field (nor input_ids)"
                elif self.tokenizer is None:
                    problem = f"{ex_id!r}: text given but the task has no tokenizer"
            if problem is not None:
                problems.append(problem)
                bad.append(ex_id)
        if problems:
            raise TaskInputError(
                f"{len(bad)} example(s) cannot be used for classification: {_list_ids(bad)}."
                + "".join(f"\n  - {p}" for p in problems[:_MAX_LISTED])
                + "\nFix or drop these examples (labels must be integers in [0, num_labels))."
            )

    def _tokenize(
        self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]
    ) -> tuple[list[dict[str, list[int]]], list[str]]:
        limit = self.max_length
        encoded: list[dict[str, list[int]] | None] = [None] * len(examples)
        truncated: list[str] = []
        text_rows = [i for i, ex in enumerate(examples) if "input_ids" not in ex]
        for i, ex in enumerate(examples):
            if "input_ids" in ex:
                toks = _as_token_list(ex["input_ids"], "input_ids", ids[i])
                row = {"input_ids": toks}
                if "token_type_ids" in ex:
                    row["token_type_ids"] = _as_token_list(ex["token_type_ids"], "token_type_ids", ids[i])
                if limit is not None and len(toks) > limit:
                    truncated.append(ids[i])
                    row = {k: v[:limit] for k, v in row.items()}
                encoded[i] = row
        if text_rows:
            if self.tokenizer is None:
                raise TaskInputError(
                    f"Examples {_list_ids([ids[i] for i in text_rows])} hold text but the task has no tokenizer; "
                    "pass tokenizer=... or pre-tokenized input_ids."
                )
            texts = [str(examples[i][self.config.text_field]) for i in text_rows]
            pairs = (
                [str(examples[i][self.config.text_pair_field]) for i in text_rows]
                if self.config.text_pair_field
                else None
            )
            if limit is None:
                enc = self.tokenizer(texts, pairs, truncation=False)
                too_long: list[int] = []
            else:
                # one token of slack tells truncated examples apart without tokenizer warnings
                enc = self.tokenizer(texts, pairs, truncation=True, max_length=limit + 1)
                too_long = [j for j, row in enumerate(enc["input_ids"]) if len(row) > limit]
                if too_long:
                    redo = self.tokenizer(
                        [texts[j] for j in too_long],
                        [pairs[j] for j in too_long] if pairs else None,
                        truncation=True,
                        max_length=limit,
                    )
            for j, i in enumerate(text_rows):
                row = {k: list(enc[k][j]) for k in ("input_ids", "token_type_ids") if k in enc}
                encoded[i] = row
            for pos, j in enumerate(too_long):
                encoded[text_rows[j]] = {k: list(redo[k][pos]) for k in ("input_ids", "token_type_ids") if k in redo}
                truncated.append(ids[text_rows[j]])
        return [e for e in encoded if e is not None], truncated

    def _pad_id(self) -> int:
        for value in (getattr(self.tokenizer, "pad_token_id", None), self.config.pad_token_id):
            if value is not None:
                return int(value)
        return 0

    def collate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> TaskBatch:
        """Tokenize, truncate to :attr:`max_length`, right-pad.

        Returns:
            ``inputs``: ``input_ids`` (b, s), ``attention_mask`` (b, s), optionally ``token_type_ids``
            (b, s), and ``labels`` (b,).
        """
        ids = [str(i) for i in ids]
        labels: list[int] = []
        for ex, ex_id in zip(examples, ids):
            label, problem = self._label(ex, ex_id)
            if problem is not None:
                raise TaskInputError(f"Example {problem}. Fix or drop it.")
            labels.append(int(label))  # type: ignore[arg-type]
        rows, truncated = self._tokenize(examples, ids)
        input_ids, mask = _pad([r["input_ids"] for r in rows], self._pad_id())
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if all("token_type_ids" in r for r in rows):
            inputs["token_type_ids"], _ = _pad([r["token_type_ids"] for r in rows], 0)
        inputs["labels"] = torch.tensor(labels, dtype=torch.long)
        return TaskBatch(ids=ids, inputs=inputs, truncated_ids=truncated)

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """``(b,)`` cross-entropies of the model's logits ``(b, C)`` against the labels."""
        labels = batch.inputs["labels"]
        model_inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
        logits = model(**model_inputs).logits
        if logits.dim() != 2:
            raise TaskInputError(
                f"The model returned logits of shape {tuple(logits.shape)}; sequence classification needs (b, C). "
                "Use an AutoModelForSequenceClassification model."
            )
        n_classes = logits.shape[-1]
        bad = [batch.ids[i] for i in torch.nonzero((labels < 0) | (labels >= n_classes)).flatten().tolist()]
        if bad:
            raise TaskInputError(
                f"Examples {_list_ids(bad)} have labels outside [0, {n_classes}) (the model has {n_classes} classes). "
                "Fix the labels or load the model with the right num_labels."
            )
        return F.cross_entropy(_upcast(logits), labels, reduction="none")


def training_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Fine-tuning records ``{"id", "text", "label"}`` (label as given; ids and texts as strings).

    Raises:
        DatasetError: a record has no ``"text"``.
    """
    missing = [str(r.get("id", i)) for i, r in enumerate(records) if r.get("text") is None]
    if missing:
        raise DatasetError(
            f"{len(missing)} training record(s) have no 'text' field, e.g. ids {missing[:5]}. Map the file's text "
            "column to 'text' (datainf.data.load_records(path, columns={'text': '<column>'}))."
        )
    return [{"id": str(r.get("id", i)), "text": str(r["text"]), "label": r.get("label")} for i, r in enumerate(records)]
