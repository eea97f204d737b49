"""``collect_gradients``: per-example LoRA gradients of a whole dataset into a :class:`GradientStore`.

One forward and one backward pass per batch (:class:`~datainf.gradients.hooks.PerExampleGradients`),
with the model in eval mode (LoRA dropout off) at its fine-tuned weights. The task decides what the
per-example loss is (:mod:`datainf.gradients.tasks`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datainf.errors import (
    BlockMismatchError,
    ConfigError,
    EmptyInputError,
    FingerprintMismatchError,
    NonFiniteGradientError,
    TaskInputError,
)
from datainf.gradients.hooks import PerExampleGradients
from datainf.gradients.lora import LoRABlocks, find_lora_blocks, gradient_mode, model_fingerprint
from datainf.gradients.tasks import GradientTask, TaskBatch
from datainf.store import GradientStore

__all__ = ["collect_gradients", "example_ids", "batch_gradients", "gradient_fingerprint"]

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
        raw = list(dataset["id"]) if "id" in columns else [None] * len(dataset)
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


def gradient_fingerprint(model: nn.Module, task: GradientTask, blocks: LoRABlocks) -> dict[str, str]:
    """The store fingerprint: ``{"model": hash of base model + adapter, "task": task.describe(), "adapter": name}``."""
    return {"model": model_fingerprint(model, blocks), "task": task.describe(), "adapter": blocks.adapter_name}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def _on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    current = _model_device(model)
    if device is None or torch.device(device) == current:
        yield current
        return
    target = torch.device(device)
    logger.info("Moving the model from %s to %s for gradient collection (moved back afterwards).", current, target)
    model.to(target)
    try:
        yield target
    finally:
        model.to(current)


def _non_finite_rows(g: torch.Tensor) -> list[int]:
    """Rows of ``g`` (b, d) holding NaN/inf. One cheap reduction per block; the exact elementwise test
    only runs when a row sum is not finite (NaN/inf propagate into the sum; a finite overflow does not
    count)."""
    if bool(torch.isfinite(g.sum(dim=1)).all()):
        return []
    return torch.nonzero(~torch.isfinite(g).all(dim=1)).flatten().tolist()


def batch_gradients(
    model: nn.Module,
    task: GradientTask,
    batch: TaskBatch,
    capture: PerExampleGradients,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + one backward pass: ``(losses (b,), {block: grads (b, d_l)})``.

    ``batch`` must already be on the model's device and ``capture`` open (inside its ``with``).

    Raises:
        TaskInputError: the task's loss vector has the wrong shape.
        NonFiniteGradientError: a loss or gradient is NaN/inf (the message names the example ids).
    """
    capture.clear()
    losses = task.per_example_loss(model, batch)
    if not isinstance(losses, torch.Tensor) or losses.shape != (len(batch),):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise TaskInputError(
            f"{type(task).__name__}.per_example_loss returned {shape} for {len(batch)} examples; it must return one "
            "loss per example, shape (b,) (a per-example mean, never a batch mean)."
        )
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = [batch.ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise NonFiniteGradientError(
            f"Non-finite loss for examples {_ids_text(bad)}. Check these examples (extreme inputs, empty targets) and "
            "the model's weights (a diverged fine-tune gives NaN losses)."
        )
    grads = capture.compute(losses)
    bad_blocks: dict[str, list[str]] = {}
    for name, g in grads.items():
        rows = _non_finite_rows(g)
        if rows:
            bad_blocks[name] = [batch.ids[i] for i in rows]
    if bad_blocks:
        bad_ids = sorted({i for ids in bad_blocks.values() for i in ids})
        first = next(iter(bad_blocks))
        raise NonFiniteGradientError(
            f"Non-finite gradients for examples {_ids_text(bad_ids)} in {len(bad_blocks)} block(s), e.g. {first!r}. "
            "The losses were finite: look for overflow (use a float32 model) or extreme inputs in these examples."
        )
    return losses.detach(), grads


def collect_gradients(
    model: nn.Module,
    task: GradientTask,
    dataset: Sequence[Mapping[str, Any]],
    *,
    store: GradientStore | str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    adapter_name: str | None = None,
    dtype: str = "float32",
    shard_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> GradientStore:
    """Per-example gradients ``g_il`` of every example and block, written into a gradient store.

    Args:
        model: the LoRA-tuned model (``PeftModel`` or a module with injected LoRA layers).
        task: what the per-example loss is (e.g. :class:`~datainf.gradients.SequenceClassificationTask`).
        dataset: a sequence of dict records; an example's id is its ``"id"`` field, else its index.
        store: ``None`` -> a new RAM store; a folder path -> a disk store there (an unfinished store
            with the same blocks and fingerprint is resumed: examples already stored are skipped);
            or an existing :class:`GradientStore` with the same blocks.
        batch_size: examples per forward/backward pass.
        device: where to compute; default the model's device (the model is moved there and back).
        adapter_name: the adapter to differentiate, when several are active.
        dtype: storage dtype of a newly created store.
        shard_size: examples per shard of a new disk store.
        overwrite: replace an existing disk store at ``store`` instead of resuming it.
        progress: show a tqdm progress bar.

    Returns:
        The finalized store; block ``name`` holds ``(n, d_l)`` gradients, rows in dataset order
        (after any resumed examples). Its fingerprint has keys ``"model"``, ``"task"``, ``"adapter"``.

    Raises:
        EmptyInputError: the dataset is empty.
        LoRAValidationError: no usable LoRA adapter (see :func:`find_lora_blocks`).
        TaskInputError: bad examples (label out of range, no response tokens, duplicate ids, ...).
        NonFiniteGradientError: a non-finite loss or gradient (names the examples).
        StoreMismatchError / FingerprintMismatchError / BlockMismatchError: the store belongs to another run.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; use a positive number of examples per batch.")
    n = len(dataset)
    if n == 0:
        raise EmptyInputError("The dataset is empty: there are no examples to compute gradients for.")
    ids = example_ids(dataset)
    blocks = find_lora_blocks(model, adapter_name=adapter_name)
    fingerprint = gradient_fingerprint(model, task, blocks)
    block_dims = blocks.block_dims

    if store is None or isinstance(store, (str, os.PathLike)):
        out = GradientStore.create(
            None if store is None else Path(store),
            block_dims=block_dims,
            dtype=dtype,
            fingerprint=fingerprint,
            shard_size=shard_size,
            overwrite=overwrite,
        )
    elif isinstance(store, GradientStore):
        out = store
        if out.block_dims != block_dims:
            raise BlockMismatchError(
                f"The given store has {len(out.block_dims)} blocks ({sum(out.block_dims.values())} parameters); the "
                f"model's adapter has {len(block_dims)} ({sum(block_dims.values())}). Create the store with "
                "block_dims from datainf.gradients.find_lora_blocks(model).block_dims."
            )
        stored_model = out.fingerprint.get("model")
        if stored_model and stored_model != fingerprint["model"]:
            raise FingerprintMismatchError(
                f"The given store was filled from another model/adapter (fingerprint {stored_model} vs "
                f"{fingerprint['model']}); use a new store."
            )
    else:
        raise ConfigError(f"store must be None, a folder path or a GradientStore, not {type(store).__name__}.")

    done = set(out.ids)
    pending = [i for i in range(n) if ids[i] not in done]
    if done:
        logger.info("%d of %d examples are already in the store; computing the other %d.", n - len(pending), n, len(pending))
    if not pending:
        out.finalize()
        return out

    truncated: list[str] = []
    try:
        with _on_device(model, device) as dev, gradient_mode(model, blocks):
            task.setup(model)
            _validate_all(task, dataset, ids, pending)
            with PerExampleGradients(blocks) as capture:
                bar = _progress(len(pending), progress)
                try:
                    for start in range(0, len(pending), batch_size):
                        chunk = pending[start : start + batch_size]
                        batch = task.collate([dataset[i] for i in chunk], [ids[i] for i in chunk])
                        truncated.extend(batch.truncated_ids)
                        _, grads = batch_gradients(model, task, batch.to(dev), capture)
                        out.append(batch.ids, grads)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
                unused = capture.never_called()
        if unused:
            logger.warning(
                "%d LoRA/head module(s) never ran in the forward pass, so their gradients are all zero: %s",
                len(unused),
                ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""),
            )
    except BaseException:
        out.flush()  # keep what was computed: a rerun with the same store folder resumes after it
        raise
    if truncated:
        limit = getattr(task, "max_length", None)
        logger.warning(
            "%d of %d examples were longer than the length limit%s and were truncated: %s",
            len(truncated),
            len(pending),
            f" ({limit} tokens)" if limit else "",
            _ids_text(truncated),
        )
    out.finalize()
    return out


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


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ex", desc="per-example gradients")
