"""The examples' side of a gradient pass: ids, fingerprints of the data and the gradients, block sizes, checks.

:func:`example_ids` (an example's ``"id"`` field, else its index; unique), :func:`dataset_fingerprint`
(what every process must have been given alike), :func:`gradient_fingerprint` (what a store records
of the model, adapter, task and projection), :func:`gradient_block_dims` (the stored block sizes:
per labelled row, projected) and the task's checks over every pending example.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from datainf.errors import (
    TaskInputError,
)
from datainf.gradients.hooks import split_block_dims
from datainf.gradients.lora import LoRABlocks, model_fingerprint
from datainf.gradients.projection import PROJECTION_KEY, GradientProjector, ProjectionConfig
from datainf.tasks import GradientTask

logger = logging.getLogger(__name__)


_LISTED = 10


def _ids_text(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_LISTED])
    return shown + (f" and {len(ids) - _LISTED} more" if len(ids) > _LISTED else "")


def example_ids(dataset: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each example's id: its ``"id"`` field when present, else its index in ``dataset`` (as a string).

    Raises:
        TaskInputError: when two examples share an id.
    """
    columns = getattr(dataset, "column_names", None)  # a datasets.Dataset: read one column, decode nothing
    if isinstance(columns, list):
        table: Any = dataset  # a datasets.Dataset: indexing by a column name gives the whole column
        raw = list(table["id"]) if "id" in columns else [None] * len(dataset)
        ids = [str(i) if value is None else str(value) for i, value in enumerate(raw)]
    else:
        ids = []
        for index in range(len(dataset)):
            ex = dataset[index]
            if not isinstance(ex, Mapping):
                raise TaskInputError(
                    f"Dataset item {index} is a {type(ex).__name__}; examples must be dict records "
                    "(e.g. {'text': ..., 'label': ...})."
                )
            ids.append(str(ex["id"]) if "id" in ex and ex["id"] is not None else str(index))
    seen: set[str] = set()
    dupes = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if dupes:
        raise TaskInputError(f"Example ids must be unique; repeated: {_ids_text(dupes)}. Fix the 'id' fields.")
    return ids


def dataset_fingerprint(dataset: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> str:
    """A short hash of a dataset, to check that every process was given the same one.

    Hashes the ids and, for plain sequences of dict records, every field holding a string, number,
    bool or ``None`` (other values, e.g. images, are skipped). A ``datasets.Dataset`` contributes its
    own ``_fingerprint`` instead (nothing is decoded).
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(list(ids)).encode())
    hf_fingerprint = getattr(dataset, "_fingerprint", None)
    if isinstance(getattr(dataset, "column_names", None), list) and isinstance(hf_fingerprint, str):
        digest.update(hf_fingerprint.encode())
        return digest.hexdigest()[:16]
    plain = (str, int, float, bool, type(None))
    for index in range(len(dataset)):
        record = dataset[index]
        fields = sorted((str(k), v) for k, v in record.items() if isinstance(v, plain))
        digest.update(json.dumps(fields, default=str).encode())
    return digest.hexdigest()[:16]


def gradient_fingerprint(
    model: nn.Module, task: GradientTask, blocks: LoRABlocks, projection: ProjectionConfig | None = None
) -> dict[str, str]:
    """The store fingerprint: ``{"model": hash of base model + adapter, "task": task.describe(), "adapter": name}``,
    plus ``"projection"`` (:meth:`ProjectionConfig.describe`) for projected gradients."""
    fingerprint = {"model": model_fingerprint(model, blocks), "task": task.describe(), "adapter": blocks.adapter_name}
    if projection is not None:
        fingerprint[PROJECTION_KEY] = projection.describe()
    return fingerprint


def gradient_block_dims(
    blocks: LoRABlocks, task: GradientTask, projection: ProjectionConfig | None = None
) -> dict[str, int]:
    """The ``block_dims`` of the gradients of ``blocks`` under ``task``: per row label when the task labels
    rows, projected sizes with ``projection``."""
    dims = blocks.block_dims if projection is None else GradientProjector(projection, blocks.blocks).block_dims()
    return split_block_dims(dims, task.row_labels())


def _validate_all(task: GradientTask, dataset: Sequence[Mapping[str, Any]], ids: list[str], pending: list[int]) -> None:
    """Run the task's checks over every pending example; raise one error listing every problem."""
    messages: list[str] = []
    step = 2048
    for start in range(0, len(pending), step):
        chunk = pending[start : start + step]
        try:
            task.validate([dataset[i] for i in chunk], [ids[i] for i in chunk])
        except TaskInputError as err:
            messages.append(str(err))
    if messages:
        raise TaskInputError("\n".join(messages))
