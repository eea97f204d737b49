"""Tasks: what the per-example loss ``l_i`` is (method.md section 4).

A task turns raw examples (dict records) into a batch, runs the model, and returns the vector of
per-example losses, shape ``(b,)``. The collector sums that vector and backpropagates once; the
hooks then split the gradient by example. For that split to be right, **each example's loss must
depend on that example only**: per-example reductions (never a batch mean), padding masked out, no
batch statistics, noise seeded by the example (not by its position in the batch).

Built-in tasks:

* :class:`SequenceClassificationTask`: cross-entropy of the example's label.
* :class:`CausalLMTask`: mean NLL over the response tokens (prompt and padding masked), or over all
  non-padding tokens.
* :class:`DiffusionTask`: denoising MSE of a diffusers UNet at fixed timesteps, averaged.

Write your own by subclassing :class:`GradientTask` (``collate`` and ``per_example_loss``), and check it
with :func:`datainf.testing.check_per_example_gradients`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from datainf.errors import ConfigError, TaskInputError

__all__ = [
    "TaskBatch",
    "GradientTask",
    "SequenceClassificationConfig",
    "SequenceClassificationTask",
    "CausalLMConfig",
    "CausalLMTask",
    "DiffusionTaskConfig",
    "DiffusionTask",
    "DEFAULT_DIFFUSION_TIMESTEPS",
    "example_seed",
]

_MAX_LISTED = 10
_UNKNOWN_LIMIT = 1_000_000  # tokenizers without a known limit report ~1e30

DEFAULT_DIFFUSION_TIMESTEPS: tuple[int, ...] = (25, 225, 425, 525, 725, 925)
"""The six timesteps (of 1000) of the DataInf authors' diffusion notebook."""


def _list_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_MAX_LISTED])
    return shown + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    return value


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 for the loss; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class TaskBatch:
    """A collated batch of ``b`` examples.

    Attributes:
        ids: the examples' ids, length ``b`` (the order of the loss vector and of the gradients).
        inputs: tensors and other values the task's ``per_example_loss`` reads; tensors are moved to
            the model's device by the collector.
        truncated_ids: ids of examples that were cut to the length limit while collating.
    """

    ids: list[str]
    inputs: dict[str, Any]
    truncated_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> TaskBatch:
        """A copy with every tensor in ``inputs`` on ``device``."""
        return TaskBatch(ids=list(self.ids), inputs=_move(self.inputs, device), truncated_ids=list(self.truncated_ids))


class GradientTask(ABC):
    """What is differentiated: turns raw examples into a batch and a batch into per-example losses.

    Contract (checked by :func:`datainf.testing.check_per_example_gradients`):

    * :meth:`per_example_loss` returns a tensor of shape ``(b,)`` whose entry ``i`` depends on
      example ``i`` only (per-example means, padding masked, noise seeded by the example id); the
      collector differentiates ``losses.sum()`` once.
    * The model must run with gradients enabled. If it is run on ``k`` rows per example (e.g. ``k``
      timesteps), the rows must be ordered example-major.
    * A task that names its rows (:meth:`row_labels`, e.g. one label per diffusion timestep) gets one
      gradient block per row, ``"<block>@<label>"``, instead of their sum. It also implements
      :meth:`per_row_loss`, whose row sums are :meth:`per_example_loss` (the slow reference
      differentiates each row's entry on its own).

    Subclasses implement :meth:`collate` and :meth:`per_example_loss`; :meth:`setup`,
    :meth:`validate` and :meth:`describe` have defaults.
    """

    config: Any = None

    def setup(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Read what the task needs from the model (label count, length limit); called once by the
        collector before :meth:`validate` and :meth:`collate`."""

    def validate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> None:  # noqa: B027
        """Check every example before any gradient is computed; raise one
        :class:`~datainf.errors.TaskInputError` naming all bad example ids. Default: no checks."""

    @abstractmethod
    def collate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> TaskBatch:
        """Turn ``b`` raw examples (with their ids) into a :class:`TaskBatch` (tensors on the CPU)."""

    @abstractmethod
    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """Run ``model`` on ``batch`` (already on the model's device) and return the losses, shape ``(b,)``."""

    def row_labels(self) -> tuple[str, ...]:
        """Labels of the ``k`` rows the model runs per example whose gradients are kept apart.

        Empty (default): each block holds the example's gradient (summed over its rows).
        """
        return ()

    def per_row_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """``(b, k)`` each row's share of the example's loss (rows in :meth:`row_labels` order; the row
        sums equal :meth:`per_example_loss`). Only tasks with :meth:`row_labels` implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not label its rows; it has no per_row_loss.")

    def describe(self) -> str:
        """A string identifying the task and its configuration (stored in the gradient store's fingerprint)."""
        cfg = self.config
        cfg_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str) if dataclasses.is_dataclass(cfg) else "{}"
        return f"{type(self).__name__}{cfg_json}"


# ---------------------------------------------------------------------------------------------------
# helpers shared by the text tasks


def _model_config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow, if known."""
    cfg = _model_config(model)
    if cfg is None:
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            if "roberta" in str(getattr(cfg, "model_type", "")) or getattr(cfg, "model_type", "") == "camembert":
                # RoBERTa-style positions start after the padding index
                value -= int(getattr(cfg, "pad_token_id", 1) or 0) + 1
            return value
    return None


def _tokenizer_limit(tokenizer: Any) -> int | None:
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < _UNKNOWN_LIMIT else None


def _min_limit(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _pad(rows: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ``(ids (b, s), attention_mask (b, s))``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _as_token_list(value: Any, what: str, ex_id: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError) as err:
        raise TaskInputError(f"Example {ex_id!r}: {what} must be a list of token ids ({err}).") from err
    return out


# ---------------------------------------------------------------------------------------------------
# sequence classification


class _TextTask(GradientTask):
    """What the tokenized text tasks share: a tokenizer, a ``config.max_length`` and the length limit
    in effect (the smallest of ``config.max_length``, the tokenizer's and, after :meth:`setup`, the
    model's position limit)."""

    tokenizer: Any
    config: Any
    _max_length: int | None = None

    def _tokenizer_name(self) -> str | None:
        return getattr(self.tokenizer, "name_or_path", None) if self.tokenizer is not None else None

    def setup(self, model: nn.Module) -> None:
        self._max_length = _min_limit(self.config.max_length, _position_limit(model), _tokenizer_limit(self.tokenizer))

    @property
    def max_length(self) -> int | None:
        """The length limit in effect (after :meth:`setup`, the model's limit is included)."""
        if self._max_length is not None:
            return self._max_length
        return _min_limit(self.config.max_length, _tokenizer_limit(self.tokenizer))


@dataclass
class SequenceClassificationConfig:
    """Knobs of :class:`SequenceClassificationTask`.

    Attributes:
        text_field: record key of the text (records may instead hold pre-tokenized ``input_ids``).
        text_pair_field: record key of a second text (sentence pairs), or ``None``.
        label_field: record key of the label: an int in ``[0, num_labels)`` or a name in the model's
            ``config.label2id``.
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
        self._label2id: dict[str, int] = {}
        self._max_length: int | None = None

    def describe(self) -> str:
        return f"{super().describe()}|tokenizer={self._tokenizer_name()}|num_labels={self._given_num_labels}"

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        cfg = _model_config(model)
        self._num_labels = self._given_num_labels
        if self._num_labels is None and cfg is not None and getattr(cfg, "num_labels", None):
            self._num_labels = int(cfg.num_labels)
        label2id = getattr(cfg, "label2id", None) or {}
        self._label2id = {str(k): int(v) for k, v in label2id.items()}

    def _label(self, example: Mapping[str, Any], ex_id: str) -> tuple[int | None, str | None]:
        key = self.config.label_field
        if key not in example:
            return None, f"{ex_id!r}: no {key!r} field"
        raw = example[key]
        if isinstance(raw, str):
            if raw in self._label2id:
                return self._label2id[raw], None
            return None, f"{ex_id!r}: label {raw!r} is not in the model's label2id {sorted(self._label2id)[:10]}"
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

    def _tokenize(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> tuple[list[dict[str, list[int]]], list[str]]:
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


# ---------------------------------------------------------------------------------------------------
# causal language modelling


@dataclass
class CausalLMConfig:
    """Knobs of :class:`CausalLMTask`.

    Attributes:
        prompt_field: record key of the prompt text (or pre-tokenized ``prompt_ids``).
        response_field: record key of the response text (or pre-tokenized ``response_ids``).
        loss_on: ``"response"`` (default): mean NLL of the response tokens only, prompt and padding
            masked out; ``"all"``: mean NLL of every non-padding token after the first.
        max_length: longest sequence (prompt + response); longer ones are cut from the right
            (counted, reported as a warning). ``None``: the model's / tokenizer's limit.
        append_eos: end the response with the tokenizer's EOS token (when it has one).
        pad_token_id: padding id when the tokenizer has none (any id works: padding is masked).
    """

    prompt_field: str = "prompt"
    response_field: str = "response"
    loss_on: Literal["response", "all"] = "response"
    max_length: int | None = None
    append_eos: bool = True
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.loss_on not in ("response", "all"):
            raise ConfigError(f"loss_on={self.loss_on!r}; use 'response' or 'all'.")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is too short; use at least 2 tokens (or None).")


class CausalLMTask(_TextTask):
    """Causal language modelling: ``l_i`` = mean over example ``i``'s loss tokens of ``-log p(token | prefix)``.

    Reduction: the NLL of each predicted token is averaged over that example's own loss tokens
    (HF's per-sequence default), never over the batch. Loss tokens are the response tokens
    (``loss_on="response"``: prompt and padding masked out) or every non-padding token after the
    first (``loss_on="all"``). Sequences are right-padded with an ``attention_mask``, so an example's
    logits do not depend on the other examples in its batch.

    Records: ``{"prompt": str, "response": str}`` (field names configurable), or pre-tokenized
    ``{"prompt_ids": list[int], "response_ids": list[int]}``. The prompt is tokenized with the
    tokenizer's special tokens (e.g. BOS), the response without, followed by EOS (``append_eos``).

    Args:
        tokenizer: a Hugging Face tokenizer (needed for text records).
        config: a :class:`CausalLMConfig`.
    """

    def __init__(self, tokenizer: Any = None, config: CausalLMConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or CausalLMConfig()
        self._max_length: int | None = None
        self._keep_logits: bool | None = None  # whether the model takes logits_to_keep (None: not tried yet)

    def describe(self) -> str:
        return f"{super().describe()}|tokenizer={self._tokenizer_name()}"

    def _encode(self, example: Mapping[str, Any], ex_id: str) -> tuple[list[int], list[int]]:
        """``(token ids, loss-mask)`` before truncation; the mask marks tokens that count in the loss."""
        cfg = self.config
        if "prompt_ids" in example or "response_ids" in example:
            prompt = _as_token_list(example.get("prompt_ids", []), "prompt_ids", ex_id)
            response = _as_token_list(example.get("response_ids", []), "response_ids", ex_id)
        else:
            if self.tokenizer is None:
                raise TaskInputError(
                    f"Example {ex_id!r} holds text but the task has no tokenizer; pass tokenizer=... or "
                    "pre-tokenized prompt_ids/response_ids."
                )
            if cfg.prompt_field not in example and cfg.response_field not in example:
                raise TaskInputError(
                    f"Example {ex_id!r} has neither {cfg.prompt_field!r} nor {cfg.response_field!r}; "
                    "records need a prompt and a response."
                )
            prompt_text = example.get(cfg.prompt_field)
            response_text = example.get(cfg.response_field)
            prompt = list(self.tokenizer(str(prompt_text or ""), add_special_tokens=True)["input_ids"])
            response = (
                list(self.tokenizer(str(response_text), add_special_tokens=False)["input_ids"])
                if response_text
                else []
            )
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if cfg.append_eos and eos is not None and response:
                response.append(int(eos))
        tokens = prompt + response
        if cfg.loss_on == "response":
            mask = [0] * len(prompt) + [1] * len(response)
        else:
            mask = [1] * len(tokens)
        return tokens, mask

    def _encode_all(
        self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]
    ) -> tuple[list[list[int]], list[list[int]], list[str], list[str]]:
        limit = self.max_length
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        truncated: list[str] = []
        empty: list[str] = []
        for ex, ex_id in zip(examples, ids):
            tokens, mask = self._encode(ex, ex_id)
            if limit is not None and len(tokens) > limit:
                tokens, mask = tokens[:limit], mask[:limit]
                truncated.append(ex_id)
            if sum(mask[1:]) == 0:  # position 0 is never predicted
                empty.append(ex_id)
            rows.append(tokens)
            masks.append(mask)
        return rows, masks, truncated, empty

    def _empty_error(self, empty: Sequence[str]) -> TaskInputError:
        what = "response tokens" if self.config.loss_on == "response" else "tokens after the first"
        return TaskInputError(
            f"{len(empty)} example(s) have no {what} left to score after masking and truncation to "
            f"{self.max_length} tokens: {_list_ids(empty)}. Give them a non-empty response, shorten the prompt, "
            "or raise max_length."
        )

    def validate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> None:
        """Every example must keep at least one loss token after masking and truncation."""
        empty: list[str] = []
        for start in range(0, len(examples), 256):
            _, _, _, bad = self._encode_all(examples[start : start + 256], ids[start : start + 256])
            empty.extend(bad)
        if empty:
            raise self._empty_error(empty)

    def _pad_id(self) -> int:
        for value in (
            getattr(self.tokenizer, "pad_token_id", None),
            self.config.pad_token_id,
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if value is not None:
                return int(value)
        return 0

    def collate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> TaskBatch:
        """Tokenize prompt + response, truncate, right-pad.

        Returns:
            ``inputs``: ``input_ids`` (b, s), ``attention_mask`` (b, s), ``loss_mask`` (b, s) (1 on
            tokens whose prediction counts).
        """
        ids = [str(i) for i in ids]
        rows, masks, truncated, empty = self._encode_all(examples, ids)
        if empty:
            raise self._empty_error(empty)
        input_ids, attention = _pad(rows, self._pad_id())
        loss_mask, _ = _pad(masks, 0)
        return TaskBatch(
            ids=ids,
            inputs={"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask},
            truncated_ids=truncated,
        )

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """``(b,)`` mean next-token NLL over each example's loss tokens.

        Token ``t`` (``t >= 1``) is predicted from the logits at position ``t - 1``; only positions with
        ``loss_mask[:, t] == 1`` count, and each example's sum is divided by its own count.
        """
        input_ids = batch.inputs["input_ids"]
        loss_mask = batch.inputs["loss_mask"]
        select = loss_mask[:, 1:].bool()  # (b, s-1)
        counts = select.sum(dim=1)
        if bool((counts == 0).any()):
            raise self._empty_error([batch.ids[i] for i in torch.nonzero(counts == 0).flatten().tolist()])
        targets = input_ids[:, 1:][select]  # (M,)
        rows = torch.nonzero(select)[:, 0]
        picked = self._scored_logits(model, batch, select, counts)  # (M, V)
        nll = F.cross_entropy(_upcast(picked), targets, reduction="none")  # (M,)
        total = torch.zeros(len(batch), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
        return total / counts.to(total.dtype)

    def _scored_logits(self, model: nn.Module, batch: TaskBatch, select: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``(M, V)`` logits of the scored positions, in the row-major order of ``select`` ``(b, s-1)``.

        Models that accept Hugging Face's ``logits_to_keep`` (BERT, GPT-2, Llama, ... in transformers
        5) get a ``(b, K)`` tensor of positions, ``K`` = the most scored tokens of any example (shorter
        rows repeat their last position; the repeats are dropped here), so the vocabulary projection
        runs on ``b * K`` positions instead of ``b * s``: with short responses after long prompts that
        is most of a training step. Each example keeps its own row, so per-example gradient hooks on
        the LM head still see ``(b, K, h)`` inputs, and an example's logits do not depend on its batch.
        Other models are run in full and sliced here.
        """
        input_ids = batch.inputs["input_ids"]
        attention = batch.inputs["attention_mask"]
        if self._keep_logits is not False:
            k = int(counts.max())
            order = torch.arange(select.shape[1], device=select.device).expand_as(select)
            # positions t-1 whose next token t is scored, in order, padded with the row's last one
            ranked = torch.where(select, order, torch.full_like(order, select.shape[1]))
            positions = ranked.sort(dim=1).values[:, :k]
            last = positions.gather(1, (counts - 1).clamp(min=0)[:, None])
            valid = torch.arange(k, device=select.device)[None, :] < counts[:, None]  # (b, K)
            positions = torch.where(valid, positions, last)
            try:
                logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=positions).logits
            except TypeError:
                self._keep_logits = False
            else:
                if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(positions.shape):
                    self._keep_logits = True
                    return logits[valid]
                if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(input_ids.shape):
                    self._keep_logits = False  # the model ignored logits_to_keep
                    return logits[:, :-1][select]
                raise TaskInputError(
                    f"The model returned logits of shape {tuple(logits.shape)}; causal LM needs (b, s, V). "
                    "Use an AutoModelForCausalLM model."
                )
        logits = model(input_ids=input_ids, attention_mask=attention).logits  # (b, s, V)
        if logits.dim() != 3:
            raise TaskInputError(
                f"The model returned logits of shape {tuple(logits.shape)}; causal LM needs (b, s, V). "
                "Use an AutoModelForCausalLM model."
            )
        return logits[:, :-1][select]  # (M, V): only the scored positions


# ---------------------------------------------------------------------------------------------------
# diffusion


@dataclass
class DiffusionTaskConfig:
    """Knobs of :class:`DiffusionTask`.

    Attributes:
        timesteps: the fixed diffusion timesteps at which the denoising loss is taken (default: the
            DataInf notebook's 25, 225, 425, 525, 725, 925 of 1000).
        seed: base seed of the per-example noise (combined with the example id).
        image_field: record key of the image; records may also hold ``"image"`` (PIL / uint8 array),
            ``"pixel_values"`` (tensor (C, H, W) in [-1, 1]) or ``"latents"`` (tensor (c, h, w), used as is).
        prompt_field: record key of the prompt (``"caption"`` is accepted too); needs ``text_encoder``
            and ``tokenizer``. Records may instead hold ``"encoder_hidden_states"`` (tensor (L, D)).
        class_field: record key of the class label for class-conditional UNets.
        prompt_max_length: prompts are padded/truncated to this many tokens (fixed, so that the
            cross-attention context does not depend on the batch). ``None``: the tokenizer's limit.
        timestep_blocks: keep each timestep's gradient as its own block ``"<block>@t<t>"`` (default),
            so that the block-diagonal Hessian of DataInf / Exact / LiSSA has one block per
            (tensor, timestep); ``False``: one block per tensor holding the mean over the timesteps.
    """

    timesteps: tuple[int, ...] = DEFAULT_DIFFUSION_TIMESTEPS
    seed: int = 0
    image_field: str = "pixel_values"
    prompt_field: str = "prompt"
    class_field: str = "class_label"
    prompt_max_length: int | None = None
    timestep_blocks: bool = True

    def __post_init__(self) -> None:
        self.timesteps = tuple(int(t) for t in self.timesteps)
        if not self.timesteps:
            raise ConfigError("timesteps is empty; give at least one diffusion timestep (e.g. (25, 225, 425, 525, 725, 925)).")
        if any(t < 0 for t in self.timesteps) or len(set(self.timesteps)) != len(self.timesteps):
            raise ConfigError(f"timesteps={self.timesteps} must be distinct non-negative integers.")
        if self.prompt_max_length is not None and self.prompt_max_length < 1:
            raise ConfigError(f"prompt_max_length={self.prompt_max_length} must be positive (or None).")


def example_seed(seed: int, example_id: str) -> int:
    """Deterministic 63-bit seed for one example's noise (independent of its batch)."""
    digest = hashlib.sha256(f"{seed}\x00{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _to_pixels(value: Any, ex_id: str) -> torch.Tensor:
    """An image as a float tensor (C, H, W) in [-1, 1]."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.uint8:
            t = t.float() / 127.5 - 1.0
        return t.float() if t.dim() == 3 else t.float().unsqueeze(0)
    try:
        import numpy as np

        arr = np.asarray(value)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise TaskInputError(f"Example {ex_id!r}: the image cannot be read as an array ({err}).") from err
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 127.5 - 1.0
    else:
        arr = arr.astype(np.float32) * 2.0 - 1.0  # float images are taken to be in [0, 1]
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    else:
        raise TaskInputError(f"Example {ex_id!r}: the image has shape {arr.shape}; expected (H, W) or (H, W, C).")
    return torch.from_numpy(np.ascontiguousarray(arr))


class DiffusionTask(GradientTask):
    """Denoising loss of a diffusers UNet at fixed timesteps with per-example seeded noise.

    For example ``i`` with clean sample ``x0`` (VAE latents, or pixels when no VAE is given), timesteps
    ``t_1..t_T`` (:attr:`DiffusionTaskConfig.timesteps`) and noise ``eps_it ~ N(0, I)`` drawn from a
    generator seeded by ``(config.seed, id_i)``:

        l_i = (1/T) sum_t  mean_{c,h,w} ( unet(add_noise(x0, eps_it, t), t, cond_i) - target_it )^2

    where ``target`` is ``eps`` (``prediction_type="epsilon"``), the velocity (``"v_prediction"``) or
    ``x0`` (``"sample"``), following the scheduler's config. Reduction rule: mean over pixels/latent
    entries, then mean over the timesteps. Noise and timesteps depend only on the example, so its
    gradient is deterministic and independent of its batch. The ``T`` timesteps run as ``b*T`` rows
    of one forward pass (memory grows with ``T``; lower the batch size if needed).

    Gradient blocks (:attr:`DiffusionTaskConfig.timestep_blocks`): by default each timestep keeps
    its own block, ``"<block>@t<t>"`` holding ``(1/T) grad mse_it`` (the ``T`` blocks of a tensor sum
    to ``grad l_i``). This is the DataInf notebook's concatenation of the ``T`` gradients, with each
    timestep a block of the block-diagonal Hessian approximation. The gradient norm fell 20-40x from
    t = 25 to t = 925 in our style and subject experiments (a known bias of diffusion influence), so
    in one mean gradient the smallest timesteps drown the rest; a block per timestep lets DataInf's
    per-block damping and inverse weigh each timestep on its own scale. With
    ``timestep_blocks=False`` each block is the mean over the timesteps.

    Conditioning: ``UNet2DConditionModel`` gets ``encoder_hidden_states`` from the record or from
    ``text_encoder(tokenizer(prompt, padding="max_length"))`` (run without gradients);
    ``UNet2DModel`` with class embeddings gets ``class_labels``.

    Args:
        noise_scheduler: the diffusers scheduler the model was trained with (``add_noise``,
            ``config.num_train_timesteps``, ``config.prediction_type``), e.g. ``DDPMScheduler``.
        config: a :class:`DiffusionTaskConfig`.
        vae: an ``AutoencoderKL`` for latent diffusion; images are encoded to the latent mean (no
            sampling), times ``vae.config.scaling_factor``. ``None``: pixel-space model.
        text_encoder: text encoder for prompts (e.g. CLIP); its output ``[0]`` is the context.
        tokenizer: its tokenizer.
    """

    def __init__(
        self,
        noise_scheduler: Any,
        config: DiffusionTaskConfig | None = None,
        *,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        if not hasattr(noise_scheduler, "add_noise"):
            raise ConfigError(
                f"noise_scheduler is a {type(noise_scheduler).__name__} without add_noise(); pass the diffusers "
                "scheduler the model was trained with, e.g. DDPMScheduler.from_pretrained(path, subfolder='scheduler')."
            )
        self.noise_scheduler = noise_scheduler
        self.config = config or DiffusionTaskConfig()
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._num_classes: int | None = None
        sched_cfg = getattr(noise_scheduler, "config", {})
        self._num_train_timesteps = int(_cfg_get(sched_cfg, "num_train_timesteps", 1000))
        self._prediction_type = str(_cfg_get(sched_cfg, "prediction_type", "epsilon"))
        if self._prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"Unsupported prediction_type {self._prediction_type!r}; use epsilon, v_prediction or sample.")
        too_big = [t for t in self.config.timesteps if t >= self._num_train_timesteps]
        if too_big:
            raise ConfigError(
                f"timesteps {too_big} are outside the scheduler's range [0, {self._num_train_timesteps}); pick smaller ones."
            )

    def describe(self) -> str:
        sched_cfg = getattr(self.noise_scheduler, "config", {})
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
        sched = json.dumps({k: _cfg_get(sched_cfg, k, None) for k in keys}, sort_keys=True, default=str)
        encoder = None
        if self.text_encoder is not None:
            encoder = getattr(getattr(self.text_encoder, "config", None), "_name_or_path", None) or type(self.text_encoder).__name__
        return (
            f"{super().describe()}|scheduler={type(self.noise_scheduler).__name__}{sched}"
            f"|vae={self.vae is not None}|text_encoder={encoder}"
        )

    def row_labels(self) -> tuple[str, ...]:
        """``("t25", "t225", ...)`` with :attr:`DiffusionTaskConfig.timestep_blocks`, else ``()``."""
        return tuple(f"t{t}" for t in self.config.timesteps) if self.config.timestep_blocks else ()

    def setup(self, model: nn.Module) -> None:
        cfg = _model_config(model)
        n = _cfg_get(cfg, "num_class_embeds", None) if cfg is not None else None
        self._num_classes = int(n) if n else None

    def _image(self, example: Mapping[str, Any], ex_id: str) -> tuple[str, torch.Tensor]:
        if "latents" in example:
            t = example["latents"]
            return "latents", (t if isinstance(t, torch.Tensor) else torch.as_tensor(t)).float()
        for key in (self.config.image_field, "pixel_values", "image"):
            if key in example:
                return "pixel_values", _to_pixels(example[key], ex_id)
        raise TaskInputError(
            f"Example {ex_id!r} has no image: give {self.config.image_field!r}, 'pixel_values', 'image' or 'latents'."
        )

    def _prompt(self, example: Mapping[str, Any]) -> str | None:
        for key in (self.config.prompt_field, "caption"):
            if key in example and example[key] is not None:
                return str(example[key])
        return None

    def validate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> None:
        """Every example needs an image; a prompt needs a text encoder; class labels must be in range."""
        problems: list[str] = []
        bad: list[str] = []
        for ex, ex_id in zip(examples, ids):
            problem = None
            if not any(k in ex for k in ("latents", self.config.image_field, "pixel_values", "image")):
                problem = f"{ex_id!r}: no image"
            elif self._prompt(ex) is not None and "encoder_hidden_states" not in ex and (
                self.text_encoder is None or self.tokenizer is None
            ):
                problem = f"{ex_id!r}: has a prompt but the task has no text_encoder/tokenizer"
            elif self.config.class_field in ex:
                try:
                    label = int(ex[self.config.class_field])
                except (TypeError, ValueError):
                    label = -1
                if label < 0 or (self._num_classes is not None and label >= self._num_classes):
                    problem = f"{ex_id!r}: class label {ex[self.config.class_field]!r} is out of range [0, {self._num_classes})"
            if problem:
                problems.append(problem)
                bad.append(ex_id)
        if problems:
            raise TaskInputError(
                f"{len(bad)} example(s) cannot be used for the diffusion loss: {_list_ids(bad)}."
                + "".join(f"\n  - {p}" for p in problems[:_MAX_LISTED])
                + "\nFix or drop these examples."
            )

    def collate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> TaskBatch:
        """Stack images and conditioning.

        Returns:
            ``inputs``: ``pixel_values`` (b, C, H, W) or ``latents`` (b, c, h, w); optionally
            ``prompt_ids`` (b, L) (fixed length ``L``), ``encoder_hidden_states`` (b, L, D),
            ``class_labels`` (b,).
        """
        ids = [str(i) for i in ids]
        kinds, images = zip(*(self._image(ex, ex_id) for ex, ex_id in zip(examples, ids)))
        if len(set(kinds)) > 1 or len({tuple(im.shape) for im in images}) > 1:
            shapes = {ex_id: tuple(im.shape) for ex_id, im in zip(ids, images)}
            raise TaskInputError(
                f"Examples {_list_ids(ids)} mix image kinds/shapes ({set(kinds)}, {shapes}); resize all images to one "
                "size (and give either pixels or latents for all)."
            )
        inputs: dict[str, Any] = {kinds[0]: torch.stack(list(images))}
        truncated: list[str] = []
        if any("encoder_hidden_states" in ex for ex in examples):
            missing = [i for ex, i in zip(examples, ids) if "encoder_hidden_states" not in ex]
            if missing:
                raise TaskInputError(f"Examples {_list_ids(missing)} lack encoder_hidden_states while others have it.")
            inputs["encoder_hidden_states"] = torch.stack(
                [torch.as_tensor(ex["encoder_hidden_states"]).float() for ex in examples]
            )
        else:
            prompts = [self._prompt(ex) for ex in examples]
            if any(p is not None for p in prompts):
                missing = [i for p, i in zip(prompts, ids) if p is None]
                if missing:
                    raise TaskInputError(f"Examples {_list_ids(missing)} have no prompt while others have one.")
                if self.tokenizer is None or self.text_encoder is None:
                    raise TaskInputError(
                        f"Examples {_list_ids(ids)} have prompts but the task has no text_encoder/tokenizer."
                    )
                length = self.config.prompt_max_length or _tokenizer_limit(self.tokenizer)
                if length is None:
                    raise ConfigError("The tokenizer has no length limit; set DiffusionTaskConfig.prompt_max_length.")
                full = self.tokenizer(list(prompts), truncation=True, max_length=length + 1)["input_ids"]
                truncated = [i for row, i in zip(full, ids) if len(row) > length]
                enc = self.tokenizer(
                    list(prompts), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
                )
                inputs["prompt_ids"] = enc["input_ids"]
        if any(self.config.class_field in ex for ex in examples):
            try:
                inputs["class_labels"] = torch.tensor([int(ex[self.config.class_field]) for ex in examples], dtype=torch.long)
            except (KeyError, TypeError, ValueError) as err:
                raise TaskInputError(
                    f"Examples {_list_ids(ids)}: every example of a class-conditional batch needs an integer "
                    f"{self.config.class_field!r} ({err})."
                ) from err
        return TaskBatch(ids=ids, inputs=inputs, truncated_ids=truncated)

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """``(b,)`` denoising MSE averaged over the configured timesteps (see the class docstring)."""
        return self.per_row_loss(model, batch).sum(dim=1)

    def per_row_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """``(b, T)``: ``mse_it / T``, each timestep's share of the example's loss (timesteps in config order)."""
        first = next(model.parameters())
        device, dtype = first.device, first.dtype
        b, n_t = len(batch), len(self.config.timesteps)
        with torch.no_grad():
            if "latents" in batch.inputs:
                x0 = batch.inputs["latents"]
            elif self.vae is not None:
                px = batch.inputs["pixel_values"].to(device=device, dtype=next(self.vae.parameters()).dtype)
                x0 = self.vae.encode(px).latent_dist.mean
                vcfg = self.vae.config
                x0 = (x0 - (_cfg_get(vcfg, "shift_factor", None) or 0.0)) * _cfg_get(vcfg, "scaling_factor", 1.0)
            else:
                x0 = batch.inputs["pixel_values"]
            context = batch.inputs.get("encoder_hidden_states")
            if context is None and "prompt_ids" in batch.inputs:
                assert self.text_encoder is not None
                context = self.text_encoder(batch.inputs["prompt_ids"].to(device))[0]
        x0 = x0.to(device=device, dtype=dtype)
        shape = tuple(x0.shape[1:])
        noise = torch.stack(
            [
                torch.randn((n_t, *shape), generator=torch.Generator().manual_seed(example_seed(self.config.seed, i)))
                for i in batch.ids
            ]
        ).to(device=device, dtype=dtype)  # (b, T, c, h, w)
        rows = b * n_t  # example-major: rows j*T .. j*T+T-1 belong to example j
        x0_rows = x0.repeat_interleave(n_t, dim=0)
        noise_rows = noise.reshape(rows, *shape)
        t_rows = torch.tensor(self.config.timesteps, dtype=torch.long, device=device).repeat(b)
        noisy = self.noise_scheduler.add_noise(x0_rows, noise_rows, t_rows)
        if self._prediction_type == "epsilon":
            target = noise_rows
        elif self._prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0_rows, noise_rows, t_rows)
        else:
            target = x0_rows
        kwargs: dict[str, Any] = {}
        if context is not None:
            kwargs["encoder_hidden_states"] = context.to(device=device, dtype=dtype).repeat_interleave(n_t, dim=0)
        if "class_labels" in batch.inputs:
            labels = batch.inputs["class_labels"]
            if self._num_classes is not None:
                bad = [batch.ids[i] for i in torch.nonzero((labels < 0) | (labels >= self._num_classes)).flatten().tolist()]
                if bad:
                    raise TaskInputError(
                        f"Examples {_list_ids(bad)} have class labels outside [0, {self._num_classes}); fix the labels."
                    )
            kwargs["class_labels"] = labels.repeat_interleave(n_t, dim=0)
        out = model(noisy, t_rows, **kwargs)
        pred = out.sample if hasattr(out, "sample") else out[0]
        err = (_upcast(pred) - _upcast(target)).pow(2).reshape(rows, -1).mean(dim=1)  # (b*T,)
        return err.reshape(b, n_t) / n_t


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)

