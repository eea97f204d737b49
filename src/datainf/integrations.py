"""From a notebook: influence for a Hugging Face ``Trainer`` (or TRL ``SFTTrainer``) run, as it is.

The trainer already holds everything: the LoRA-tuned model, the tokenised train / eval datasets, the
data collator that pads them and builds ``labels`` (``-100`` = not in the loss), the batch size.
:func:`from_trainer` takes the per-example gradients of the trainer's own loss through those pieces,
so nobody rebuilds the tokenisation by hand, and :func:`scores_from_trainer` scores the training
examples against the eval set::

    trainer = SFTTrainer(model=peft_model, train_dataset=train, eval_dataset=test, ...)
    trainer.train()
    scores = datainf.scores_from_trainer(trainer)          # (n_eval, n_train) pairwise, positive = harmful
    store = datainf.from_trainer(trainer, split="train")  # or just the gradient store

What is differentiated (:class:`TrainerTask`): each example's mean next-token NLL over the tokens
whose ``labels`` are not ``-100`` after the trainer's collator (a causal LM: ``labels`` ``(b, s)``,
shifted by one as Hugging Face's loss does), or the cross-entropy of its class (a sequence
classifier: ``labels`` ``(b,)``). The collator runs on the examples of one batch, so its padding must
not leak into the loss: right padding with an attention mask (the default; left padding is refused
for position-embedding models in :meth:`TrainerTask.validate`), and no packing (rows holding several
examples, TRL ``packing=True`` / ``padding_free=True``, are refused).

Columns the model's forward does not take are dropped first, as the trainer does
(``remove_unused_columns``); an ``"id"`` column, when present, names the examples (else their
position). The gradients are taken in eval mode (dropout off), as everywhere in datainf.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from datainf.data.formats import check_not_packed, lm_format
from datainf.errors import ConfigError, DatasetError, TaskInputError
from datainf.gradients import CausalLMTask, GradientTask, TaskBatch, collect_gradients
from datainf.influence import influence
from datainf.scores import Scores
from datainf.store import GradientStore

__all__ = ["TrainerTask", "trainer_records", "from_trainer", "scores_from_trainer"]

logger = logging.getLogger(__name__)

Split = Literal["train", "eval"]
#: Fields a collated batch may hold that are model inputs (everything else but ``labels`` is dropped).
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")


class TrainerTask(GradientTask):
    """The loss of a ``Trainer``'s model on batches built by the trainer's data collator.

    Reduction: per example, never over the batch. Causal LM (``labels`` of shape ``(b, s)``): mean
    over the example's own tokens with ``labels[:, t] != -100`` of ``-log p(labels[t] | tokens < t)``
    (logits at ``t - 1`` predict token ``t``). Classification (``labels`` ``(b,)``, logits ``(b, C)``):
    the example's cross-entropy.

    Args:
        collator: the trainer's ``data_collator`` (list of feature dicts -> batch of tensors).
        description: identifies the run in gradient-store fingerprints (default: the collator's class).
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], Mapping[str, Any]], description: str = "") -> None:
        self.collator = collator
        self.description = description or type(collator).__name__

    def describe(self) -> str:
        return f"TrainerTask[{self.description}]"

    def validate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> None:
        """Refuse packed rows, and collate one small batch to check it has ``labels``.

        Raises:
            DatasetError: packed rows.
            TaskInputError: the collator gives no ``labels`` or left-pads.
        """
        check_not_packed(examples, ids)
        if not examples:
            return
        batch = self._collate_raw(examples[:2], ids[:2])
        if "labels" not in batch:
            raise TaskInputError(
                f"The trainer's data collator ({self.description}) returned no 'labels' (keys: {sorted(batch)}), so "
                "there is no loss to differentiate. Use a collator that builds labels (e.g. "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False)), or give the rows a 'labels' column."
            )
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool((mask[:, 0] == 0).any()):
            raise TaskInputError(
                "The trainer's collator pads on the left, so an example's positions depend on the longest example "
                "of its batch. Set tokenizer.padding_side = 'right' for the influence computation."
            )

    def _collate_raw(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> dict[str, Any]:
        features = [{k: v for k, v in ex.items() if k != "id"} for ex in examples]
        try:
            out = self.collator(features)
        except (KeyError, ValueError, TypeError) as err:
            raise TaskInputError(
                f"The trainer's data collator ({self.description}) failed on examples {list(ids)[:3]} "
                f"({type(err).__name__}: {str(err)[:300]}). Pass the tokenised dataset the trainer trains on."
            ) from err
        return dict(out)

    def collate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> TaskBatch:
        """The collator's batch: model inputs (``input_ids`` ``(b, s)``, ``attention_mask`` ...) and ``labels``."""
        batch = self._collate_raw(examples, ids)
        inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS or k == "labels"}
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.shape[0] != len(ids):
            raise TaskInputError(
                f"The collator returned {labels.shape[0]} label rows for {len(ids)} examples: it packs or flattens "
                "examples (TRL padding_free=True?). Use a padding collator for the influence computation."
            )
        return TaskBatch(ids=[str(i) for i in ids], inputs=inputs)

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """``(b,)`` per-example loss (see the class docstring)."""
        inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
        labels = batch.inputs["labels"]
        logits = model(**inputs).logits
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if labels.dim() == 1:
            return F.cross_entropy(logits, labels.to(logits.device), reduction="none")
        targets = labels[:, 1:].to(logits.device)
        select = targets != -100
        counts = select.sum(dim=1)
        if bool((counts == 0).any()):
            empty = [batch.ids[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
            raise TaskInputError(
                f"{len(empty)} example(s) have no token in the loss after the collator (every label is -100): "
                f"{empty[:10]}. Their response was cut away by the length limit or is empty; drop them or raise "
                "max_length."
            )
        nll = F.cross_entropy(
            logits[:, :-1][select], targets[select], reduction="none"
        )  # (M,), rows in row-major order
        rows = torch.nonzero(select)[:, 0]
        total = torch.zeros(len(batch), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
        return total / counts.to(total.dtype)


def _forward_columns(model: nn.Module) -> set[str] | None:
    target = model
    for attr in ("get_base_model",):
        getter = getattr(target, attr, None)
        if callable(getter):
            target = getter()
    try:
        params = inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names = set(params) - {"kwargs"}
    else:
        names = set(params)
    return names | {"label", "labels", "label_ids", "completion_mask", "assistant_masks"}


def trainer_records(
    trainer: Any, split: Split | Sequence[Mapping[str, Any]] = "train", *, drop_unused: bool = True
) -> list[dict[str, Any]]:
    """The rows of the trainer's train or eval dataset (or of ``split`` when it is a dataset), with an
    ``"id"`` and, with ``drop_unused``, only the columns the model's forward (and the collator's masks)
    take, as the trainer keeps them.

    Raises:
        DatasetError: the trainer has no such dataset, or it is empty / not indexable.
    """
    if isinstance(split, str):
        if split not in ("train", "eval"):
            raise ConfigError(f"split={split!r}; use 'train', 'eval' or pass the dataset itself.")
        dataset = getattr(trainer, f"{split}_dataset", None)
        if dataset is None:
            raise DatasetError(
                f"The trainer has no {split}_dataset. Pass it to the Trainer ({split}_dataset=...) or give the "
                "dataset itself."
            )
        if isinstance(dataset, Mapping):
            raise DatasetError(
                f"The trainer's {split}_dataset is a dict of {len(dataset)} datasets ({sorted(dataset)}); pass one of "
                "them as the dataset."
            )
    else:
        dataset = split
    try:
        n = len(dataset)
        rows = [dict(dataset[i]) for i in range(n)]
    except TypeError as err:
        raise DatasetError(
            f"The dataset ({type(dataset).__name__}) is not indexable (an IterableDataset?); materialise it, e.g. "
            "datasets.Dataset.from_list(list(it))."
        ) from err
    if not rows:
        raise DatasetError("The trainer's dataset is empty.")
    keep = (
        _forward_columns(trainer.model)
        if drop_unused and getattr(trainer.args, "remove_unused_columns", True)
        else None
    )
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        ex_id = str(row.get("id", i))
        fields = {k: v for k, v in row.items() if k != "id" and (keep is None or k in keep)}
        out.append({"id": ex_id, **fields})
    dropped = sorted(set(rows[0]) - set(out[0]) - {"id"})
    if dropped:
        logger.info("Dropping dataset columns the model does not take (as the Trainer does): %s", dropped)
    return out


def from_trainer(
    trainer: Any,
    *,
    split: Split | Sequence[Mapping[str, Any]] = "train",
    store: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    dtype: str = "float32",
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> GradientStore:
    """Per-example gradients of the trainer's loss on its train (or eval) dataset.

    Args:
        trainer: a ``transformers.Trainer`` (TRL trainers are subclasses) whose ``model`` has a LoRA
            adapter; its ``data_collator`` and datasets are used as they are.
        split: ``"train"``, ``"eval"``, or a dataset of rows in the trainer's format.
        store: a folder for a disk store (resumable); ``None``: in memory.
        batch_size: examples per batch (default: the trainer's ``per_device_eval_batch_size``).
        dtype: stored gradient dtype, ``float32`` or ``float64``.
        device: where to compute (default: the model's device).
        overwrite / progress: as in :func:`datainf.collect_gradients`.

    Rows the trainer holds as text (``messages``, ``prompt``/``completion``, ``prompt``/``response``,
    ``text``; no ``input_ids``) are tokenised by the trainer's ``processing_class`` with
    :class:`~datainf.gradients.CausalLMTask` instead of the collator.

    Returns:
        The :class:`~datainf.store.GradientStore` ``(n, d_l)`` per block, ids as in :func:`trainer_records`.
    """
    raw = trainer_records(trainer, split, drop_unused=False)
    name = split if isinstance(split, str) else "dataset"
    task: GradientTask
    if "input_ids" not in raw[0] and lm_format(raw[0]) not in (None, "tokenized", "token-ids"):
        # untokenised text / conversations: the processing class tokenises them as CausalLMTask does
        tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(
                f"The trainer's {name} rows are text ({lm_format(raw[0])}) and the trainer has no processing_class "
                "(tokenizer) to tokenise them; pass Trainer(processing_class=tokenizer) or a tokenised dataset."
            )
        logger.info(
            "The %s rows are %s records: tokenising them with the trainer's processing class.", name, lm_format(raw[0])
        )
        records = raw
        task = CausalLMTask(tokenizer)
    else:
        records = trainer_records(trainer, split)
        collator = trainer.data_collator
        if collator is None:
            raise ConfigError("The trainer has no data_collator; build it with one (Trainer(data_collator=...)).")
        task = TrainerTask(collator, description=f"{type(trainer).__name__}:{type(collator).__name__}")
    size = int(batch_size or getattr(trainer.args, "per_device_eval_batch_size", 8) or 8)
    logger.info("Collecting per-example gradients of the trainer's %s set (%d examples).", name, len(records))
    return collect_gradients(
        trainer.model,
        task,
        records,
        store=store,
        batch_size=size,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
    )


def scores_from_trainer(
    trainer: Any,
    *,
    train: Split | Sequence[Mapping[str, Any]] = "train",
    test: Split | Sequence[Mapping[str, Any]] = "eval",
    method: str = "datainf",
    mode: Literal["average", "pairwise"] = "pairwise",
    damping: float = 0.1,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Scores:
    """Influence of each training example of the trainer on each eval example (positive = harmful).

    Gradients are collected in memory (:func:`from_trainer`); for large runs collect them into disk
    stores with :func:`from_trainer` and call :func:`datainf.influence`.

    Returns:
        :class:`~datainf.scores.Scores`: ``(m, n)`` with ``mode="pairwise"`` (one row per eval
        example), ``(n,)`` with ``mode="average"``.
    """
    train_store = from_trainer(trainer, split=train, batch_size=batch_size, device=device, progress=progress)
    test_store = from_trainer(trainer, split=test, batch_size=batch_size, device=device, progress=progress)
    return influence(
        train_store,
        test_store,
        method=method,
        mode=mode,
        damping=damping,
        device=device or "cpu",
        progress=progress,
    )
