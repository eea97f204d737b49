"""Relabel suggestions for flagged classification examples (issue 16, item 4).

A mislabel detector (self-influence, the training loss, an influence score) flags ``k`` suspects.
For each of them, :func:`suggest_labels` tries every one of the task's ``C`` classes as its label
and proposes the class that makes the example look least suspicious:

* ``criterion="self_influence"``: the candidate gradient ``g_k(c)`` (the per-example gradient of the
  loss with label ``c``) scored as ``s_k(c) = sum_l g_kl(c)^T P_l g_kl(c)``, where ``P_l`` is the
  method's stand-in for ``(G_l + lambda_l I)^-1`` built from the *training store* (its ``lambda_l``
  from ``damping``, its ``G_l``): the same quantity as ``influence(train_store, mode="self")`` for
  the example's given label. The candidates' gradients come from the hooks of
  :mod:`datainf.gradients` (one forward and one backward pass per batch of ``k x C`` candidate
  records), and ``P_l`` is applied by the method's own ``precondition`` (one streaming pass over the
  store for DataInf and Diagonal, none for Hessian-free): no store gradient is recomputed.
* ``criterion="loss"``: the candidate's cross-entropy under the model (forward passes only).

The suggestion is the candidate with the *lowest* score. Only sequence classification has a
finite label set: causal-LM and diffusion tasks are refused.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from datainf.errors import (
    BlockMismatchError,
    ConfigError,
    EmptyInputError,
    FingerprintMismatchError,
    TaskInputError,
)
from datainf.store import GradientStore
from datainf.tasks import GradientTask, SequenceClassificationTask

__all__ = ["CRITERIA", "RelabelSuggestion", "RelabelResult", "suggest_labels"]

logger = logging.getLogger(__name__)

#: The accepted ``criterion`` values of :func:`suggest_labels`.
CRITERIA = ("self_influence", "loss")

#: Separates an example id from its candidate class in the candidates' ids.
_CANDIDATE_SEP = "#relabel-"


@dataclass(frozen=True)
class RelabelSuggestion:
    """One flagged example.

    Attributes:
        id: the example's id.
        given_label: its label as a class id (what the model was trained on).
        suggested_label: the class id with the lowest score.
        scores: the criterion's score of every candidate class, index = class id (length ``C``):
            self-influence (``>= 0`` for a positive definite preconditioner) or loss.
        losses: the candidates' losses under the model (length ``C``; computed in both criteria).
        label_names: the class names, index = class id (``"0"``, ``"1"``, ... when the model names none).
    """

    id: str
    given_label: int
    suggested_label: int
    scores: tuple[float, ...]
    losses: tuple[float, ...]
    label_names: tuple[str, ...]

    @property
    def changed(self) -> bool:
        """Whether the suggestion differs from the given label."""
        return self.suggested_label != self.given_label

    @property
    def given_name(self) -> str:
        return self.label_names[self.given_label]

    @property
    def suggested_name(self) -> str:
        return self.label_names[self.suggested_label]


@dataclass
class RelabelResult:
    """What :func:`suggest_labels` returns: one :class:`RelabelSuggestion` per asked id, in the asked order.

    Attributes:
        suggestions: the rows.
        criterion: ``self_influence`` or ``loss``.
        method: the influence method of the self-influence criterion (``None`` for ``loss``).
        settings: damping, batch size, the lambdas, the store fingerprint.
        seconds: wall time of the whole call.
    """

    suggestions: list[RelabelSuggestion]
    criterion: str
    method: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.suggestions)

    def suggested(self) -> dict[str, int]:
        """``{id: suggested class id}``."""
        return {s.id: s.suggested_label for s in self.suggestions}

    def to_rows(self) -> list[dict[str, Any]]:
        """Plain dicts (a table): id, given / suggested label and name, changed, one ``score_<name>`` per class."""
        rows = []
        for s in self.suggestions:
            row: dict[str, Any] = {
                "id": s.id,
                "given_label": s.given_label,
                "given_name": s.given_name,
                "suggested_label": s.suggested_label,
                "suggested_name": s.suggested_name,
                "changed": s.changed,
            }
            row.update({f"score_{name}": value for name, value in zip(s.label_names, s.scores, strict=True)})
            rows.append(row)
        return rows


def _check_task(task: GradientTask) -> None:
    if not isinstance(task, SequenceClassificationTask):
        raise ConfigError(
            f"Relabel suggestions need a classification task (a finite set of labels to try); got "
            f"{type(task).__name__}. Causal-LM and diffusion examples have no label to swap: use the influence "
            "scores to review or drop those examples instead."
        )


def _num_classes(model: nn.Module) -> int:
    count = getattr(getattr(model, "config", None), "num_labels", None)
    if not isinstance(count, int) or count < 2:
        raise ConfigError(
            f"The model's config.num_labels is {count!r}; relabel suggestions need a classifier with at least 2 classes."
        )
    return count


def _label_names(model: nn.Module, count: int) -> tuple[str, ...]:
    from datainf.data.labels import LabelEncoder

    names = LabelEncoder.from_model(model).names
    return tuple(names) if len(names) == count else tuple(str(c) for c in range(count))


def _select(records: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> list[Mapping[str, Any]]:
    from datainf.gradients import example_ids

    if not ids:
        raise EmptyInputError("No example ids given: pass the ids of the flagged examples to relabel.")
    asked = [str(i) for i in ids]
    repeated = sorted({i for i in asked if asked.count(i) > 1})
    if repeated:
        raise ConfigError(f"Example ids {repeated[:10]} are asked more than once; ask each flagged example once.")
    position = {rid: k for k, rid in enumerate(example_ids(records))}
    missing = [i for i in asked if i not in position]
    if missing:
        raise TaskInputError(
            f"{len(missing)} asked id(s) are not among the {len(records)} records, e.g. {missing[:5]}; "
            "pass the records the ids come from (an id is a record's 'id' field, else its row number)."
        )
    return [records[position[i]] for i in asked]


def suggest_labels(
    model: nn.Module,
    task: GradientTask,
    records: Sequence[Mapping[str, Any]],
    ids: Sequence[str],
    *,
    train_store: GradientStore | None = None,
    criterion: Literal["self_influence", "loss"] = "self_influence",
    damping: float = 0.1,
    method: str = "datainf",
    method_options: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> RelabelResult:
    """For each flagged example, the class whose label makes it least suspicious (module docstring).

    Args:
        model: the fine-tuned classifier (LoRA adapter), the one the training store was collected from.
        task: its :class:`~datainf.tasks.SequenceClassificationTask` (others are refused).
        records: the records the ids refer to (usually the training set).
        ids: the ``k`` flagged examples' ids.
        train_store: the training gradients (``n`` examples): ``lambda_l`` and the method's
            preconditioner come from them. Required for ``criterion="self_influence"``.
        criterion: ``self_influence`` (lowest ``s_k(c)``) or ``loss`` (lowest loss).
        damping: ``lambda_l = damping * mean_i ||g_il||^2 / d_l`` of the store, as in
            :func:`datainf.influence`.
        method: a registered influence method (its ``precondition`` supplies ``P_l``).
        method_options: the method's options.
        batch_size: candidate records per forward/backward pass, also the store's read batch.
        progress: progress bars of the store pass.

    Returns:
        A :class:`RelabelResult`: per id, the given and suggested class and the ``C`` candidates'
        scores and losses (computed for ``k x C`` candidate records only).

    Raises:
        ConfigError: not a classification task, bad criterion / damping / batch size, unknown method,
            no store for the self-influence criterion.
        EmptyInputError / TaskInputError: no ids, repeated ids, ids not among the records, bad records.
        FingerprintMismatchError / BlockMismatchError: the store comes from another model or adapter.
    """
    from datainf.gradients import batch_gradients, example_ids, find_lora_blocks, gradient_fingerprint, gradient_mode
    from datainf.gradients.hooks import PerExampleGradients, split_block_dims
    from datainf.methods import get_method

    started = time.perf_counter()
    _check_task(task)
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    use_influence = criterion == "self_influence"
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise ConfigError(f"damping must be a finite number > 0 (the paper uses 0.1), got {damping!r}.")
    if use_influence and train_store is None:
        raise ConfigError(
            "criterion='self_influence' needs the training gradient store (train_store=...): the preconditioner "
            "and the damping come from it. Use criterion='loss' to rank candidates by their loss alone."
        )
    influence_method = get_method(method, method_options) if use_influence else None
    count = _num_classes(model)
    names = _label_names(model, count)
    flagged = _select(records, ids)
    flagged_ids = example_ids(flagged)
    task.setup(model)
    task.validate(flagged, flagged_ids)

    field_name = task.config.label_field  # checked above: a SequenceClassificationTask
    candidates = [{**dict(rec), field_name: c} for rec in flagged for c in range(count)]
    candidate_ids = [f"{rid}{_CANDIDATE_SEP}{c}" for rid in flagged_ids for c in range(count)]
    given = task.collate(flagged, flagged_ids).inputs["labels"].tolist()

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    blocks = find_lora_blocks(model)
    losses = torch.empty(len(candidates), dtype=torch.float64)
    grads: dict[str, list[torch.Tensor]] = {}
    if use_influence:
        assert train_store is not None
        fingerprint = gradient_fingerprint(model, task, blocks)
        stored = train_store.fingerprint.get("model")
        if stored and stored != fingerprint["model"]:
            raise FingerprintMismatchError(
                f"The training store was collected from another model/adapter (fingerprint {stored} vs "
                f"{fingerprint['model']}); pass the store of this model's training gradients."
            )
        dims = split_block_dims(blocks.block_dims, task.row_labels())
        if dims != train_store.block_dims:
            raise BlockMismatchError(
                f"The training store has {len(train_store.block_dims)} blocks ({sum(train_store.block_dims.values())} "
                f"parameters) but this model's adapter has {len(dims)} ({sum(dims.values())}); pass the store collected "
                "from this model."
            )
        with gradient_mode(model, blocks), PerExampleGradients(blocks.blocks, row_labels=task.row_labels()) as capture:
            for start in range(0, len(candidates), batch_size):
                part = slice(start, start + batch_size)
                batch = task.collate(candidates[part], candidate_ids[part]).to(device)
                batch_losses, batch_grads = batch_gradients(model, task, batch, capture)
                losses[part] = batch_losses.double().cpu()
                for name, g in batch_grads.items():
                    grads.setdefault(name, []).append(g.detach())
    else:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(candidates), batch_size):
                    part = slice(start, start + batch_size)
                    batch = task.collate(candidates[part], candidate_ids[part]).to(device)
                    losses[part] = task.per_example_loss(model, batch).detach().double().cpu()
        finally:
            model.train(was_training)

    settings: dict[str, Any] = {"criterion": criterion, "batch_size": batch_size, "num_classes": count}
    if use_influence:
        assert train_store is not None and influence_method is not None
        values, extra = _candidate_self_influence(
            {name: torch.cat(parts) for name, parts in grads.items()},
            train_store,
            influence_method,
            damping=damping,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        settings.update(extra)
    else:
        values = losses
    table = values.reshape(len(flagged), count)
    loss_table = losses.reshape(len(flagged), count)
    suggestions = [
        RelabelSuggestion(
            id=rid,
            given_label=int(given[k]),
            suggested_label=int(torch.argmin(table[k])),
            scores=tuple(float(v) for v in table[k]),
            losses=tuple(float(v) for v in loss_table[k]),
            label_names=names,
        )
        for k, rid in enumerate(flagged_ids)
    ]
    seconds = time.perf_counter() - started
    logger.info(
        "Relabel (%s%s): %d of %d flagged examples get a different label (%.1f s)",
        criterion,
        f", {influence_method.name}" if influence_method is not None else "",
        sum(s.changed for s in suggestions),
        len(suggestions),
        seconds,
    )
    return RelabelResult(
        suggestions=suggestions,
        criterion=criterion,
        method=influence_method.name if influence_method is not None else None,
        settings=settings,
        seconds=seconds,
    )


def _candidate_self_influence(
    candidates: Mapping[str, torch.Tensor],
    train_store: GradientStore,
    influence_method: Any,
    *,
    damping: float,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``s(c) = sum_l g_l(c)^T P_l g_l(c)`` of the candidate gradients ``{block: (k C, d_l)}``: float64 ``(k C,)``.

    ``lambda_l`` and ``P_l`` are those of ``influence(train_store, mode="self", damping=damping)``;
    the candidates are preconditioned as test vectors (the method's ``precondition``), so a candidate
    equal to a stored training row gets exactly that row's self-influence.
    """
    from datainf.influence import block_lambdas
    from datainf.methods import MethodContext

    lambdas = block_lambdas(train_store, damping=damping)
    blocks = sorted(b for b in train_store.block_dims if lambdas[b] > 0)
    if not blocks:
        raise EmptyInputError("Every training gradient is zero: there is no preconditioner to score candidates with.")
    compute_dtype = torch.float64 if train_store.torch_dtype == torch.float64 else torch.float32  # as influence()
    ctx = MethodContext(
        train=train_store,
        lambdas=lambdas,
        blocks=blocks,
        batch_size=batch_size,
        compute_dtype=compute_dtype,
        device=device,
        progress=progress,
        total_examples=train_store.num_examples,
    )
    vectors = {name: candidates[name].to(device=device, dtype=compute_dtype) for name in blocks}
    preconditioned = influence_method.precondition(vectors, ctx)
    size = next(iter(vectors.values())).shape[0]
    values = torch.zeros(size, dtype=torch.float64)
    for name in blocks:
        values += (vectors[name] * preconditioned.vectors[name]).sum(dim=1).to("cpu", torch.float64)
    extra = {
        "method": influence_method.name,
        "method_options": influence_method.settings(),
        "damping": damping,
        "lambdas": {b: lambdas[b] for b in train_store.block_dims},
        "passes": ctx.passes,
        "fingerprint": train_store.fingerprint,
    }
    return values, extra
