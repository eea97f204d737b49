"""What every task shares: the :class:`GradientTask` contract, :class:`TaskBatch`, and the text base.

A task turns raw examples (dict records) into a batch, runs the model, and returns the vector of
per-example losses, shape ``(b,)``. The collector sums that vector and backpropagates once; the
hooks then split the gradient by example. For that split to be right, **each example's loss must
depend on that example only**: per-example reductions (never a batch mean), padding masked out, no
batch statistics, noise seeded by the example (not by its position in the batch).

The underscored helpers below (length limits, padding, token lists, ``_TextTask``) are shared by the
task modules of this package (:mod:`~datainf.tasks.classification`, :mod:`~datainf.tasks.causal_lm`,
:mod:`~datainf.tasks.diffusion`); they are not public API.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from datainf.errors import TaskInputError

__all__ = ["TaskBatch", "GradientTask"]

_MAX_LISTED = 10
_UNKNOWN_LIMIT = 1_000_000  # tokenizers without a known limit report ~1e30


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
        cfg_json = (
            json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
            if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
            else "{}"
        )
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
