"""Steps the runs share: same-run checks across processes, opening stores, model and task loading, data of a task kind."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from datainf.distributed import DistributedContext, check_same_settings, dist_context, on_main
from datainf.errors import ConfigError
from datainf.store import GradientStore
from datainf.workflows.settings import (
    GradientsSettings,
    ScoreSettings,
    _projection_of,
    _saved,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- shared steps


def _check_same_run(
    ctx: DistributedContext, command: str, settings: Any, data: Mapping[str, Sequence[Mapping[str, Any]]]
) -> None:
    """Under torchrun: stop every rank unless all were given the same settings and data (fingerprints)."""
    if not ctx.is_distributed:
        return
    from datainf.gradients import dataset_fingerprint, example_ids

    payload: dict[str, Any] = {k: v for k, v in _saved(settings).items() if k != "out"}
    for role, records in data.items():
        payload[f"data:{role}"] = dataset_fingerprint(records, example_ids(records))
    check_same_settings(ctx, f"settings of `datainf {command}`", payload)


def _open_store(path: str, flag: str) -> GradientStore:
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"{flag} {folder} does not exist; compute it first with `datainf grads --out {folder}`.")
    return GradientStore.open(folder)


def _adapter_meta(settings: GradientsSettings | ScoreSettings) -> dict[str, Any]:
    from datainf.models import read_adapter_metadata

    if not settings.adapter:
        raise ConfigError(
            "Gradients need a trained LoRA adapter: pass --adapter DIR (e.g. the --out of `datainf finetune`)."
        )
    if _own_loader(settings.kind):
        return {}  # a LoRA in another library's format carries no datainf metadata
    return read_adapter_metadata(settings.adapter)


def _own_loader(kind: str | None) -> bool:
    """Whether the task kind loads its model itself (e.g. ``text-to-image``: a diffusers pipeline and LoRA)."""
    from datainf.tasks import get_task_kind

    return kind is not None and get_task_kind(kind).model_loader is not None


_G = TypeVar("_G", GradientsSettings, ScoreSettings)


def _resolve_model_settings(settings: _G, meta: Mapping[str, Any]) -> _G:
    """``settings`` with ``kind`` and ``max_length`` filled from the adapter's training settings when
    not given; checks that the model and adapter folders exist (before any data is read)."""
    from datainf.models import resolve_adapter_dir, resolve_model_dir

    kind = settings.kind if settings.kind is not None else (meta.get("kind") or "classification")
    max_length = settings.max_length
    if max_length is None:
        trained = (meta.get("finetune_config") or {}).get("max_length")
        if trained:
            max_length = int(trained)
    if not settings.model:
        raise ConfigError("No base model given: pass --model DIR (a local folder written by save_pretrained).")
    if not _own_loader(kind):  # a kind with its own loader checks its folders when loading
        resolve_model_dir(settings.model)
        resolve_adapter_dir(str(settings.adapter))
    return replace(settings, kind=kind, max_length=max_length)


def _model_and_task(
    settings: _G, records: Mapping[str, list[dict[str, Any]]]
) -> tuple[Any, Any, dict[str, list[dict[str, Any]]]]:
    """Load the model with its adapter and build the gradient task.

    ``records`` maps a role (``data``, ``training``, ``test``: named in label errors) to its records;
    returned the same way, classification records with the integer labels of the model's head.
    """
    from datainf.data.labels import LabelEncoder
    from datainf.models import load_model
    from datainf.tasks import get_task_kind

    meta = _adapter_meta(settings)
    settings = _resolve_model_settings(settings, meta)
    kind = str(settings.kind)
    task_kind = get_task_kind(kind)
    device = dist_context().resolve_device(settings.device)  # "cuda" -> this rank's GPU under torchrun
    num_labels = settings.num_labels
    if num_labels is None and settings.label_names and task_kind.encodes_labels and not meta.get("num_labels"):
        num_labels = len(settings.label_names)
    model, tokenizer = load_model(
        str(settings.model),
        kind=kind,
        num_labels=num_labels,
        adapter=settings.adapter,
        device=str(device),
    )
    if task_kind.encodes_labels:
        encoder = LabelEncoder.from_model(model, meta, label_names=settings.label_names)
        records = {role: encoder.encode(recs, role) for role, recs in records.items()}
    head = getattr(model.config, "num_labels", None)
    task = task_kind.make_task(tokenizer, max_length=settings.max_length, num_labels=head)
    return model, task, dict(records)


def _compute_store(
    model: Any,
    task: Any,
    records: list[dict[str, Any]],
    path: Path,
    settings: GradientsSettings | ScoreSettings,
    ctx: DistributedContext,
    *,
    progress: bool,
    before_compute: Callable[[], Any] | None = None,
    collect_factors: bool = False,
) -> GradientStore:
    """Create (or reopen) the disk store at ``path`` and fill it with the records' gradients
    (and, with ``collect_factors``, the Kronecker factors of ``kfac`` / ``ekfac`` beside them).

    Under torchrun rank 0 alone creates the store (and runs ``before_compute``); every rank then
    computes its share of the missing examples (:func:`~datainf.gradients.collect_gradients`).
    """
    from datainf.gradients import collect_gradients, find_lora_blocks, gradient_fingerprint
    from datainf.gradients.records import gradient_block_dims

    blocks = find_lora_blocks(model)
    projection = _projection_of(settings)

    def prepare() -> GradientStore:
        store = GradientStore.create(
            path,
            block_dims=gradient_block_dims(blocks, task, projection),
            dtype=settings.dtype,
            fingerprint=gradient_fingerprint(model, task, blocks, projection),
            shard_size=int(settings.shard_size),
            overwrite=False,
            expected_examples=len(records),
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

        on_main(ctx, "Preparing the gradient store", prepare_on_main)
        target: Any = path  # every rank opens the folder; each writes its own part of it
    else:
        target = prepare()
    return collect_gradients(
        model,
        task,
        records,
        store=target,
        batch_size=int(settings.grad_batch_size),
        device=settings.device,
        dtype=settings.dtype,
        shard_size=int(settings.shard_size),
        progress=progress,
        collect_factors=collect_factors,
        projection=projection,
    )


# ---------------------------------------------------------------------------------------------- data of a task kind


def _column_map(settings: Any) -> dict[str, str]:
    """The record field -> file column renames given by the settings' ``*_column`` fields."""
    mapping = {
        "text": getattr(settings, "text_column", None),
        "label": getattr(settings, "label_column", None),
        "prompt": getattr(settings, "prompt_column", None),
        "response": getattr(settings, "response_column", None),
        "id": getattr(settings, "id_column", None),
    }
    return {ours: theirs for ours, theirs in mapping.items() if theirs}


def _load_data(path: str | None, settings: Any, kind: str, flag: str) -> list[dict[str, Any]]:
    """The records of ``path`` with the fields the task kind needs (its ``required_fields``)."""
    from datainf.data.tabular import load_records
    from datainf.tasks import get_task_kind

    if not path:
        raise ConfigError(f"No data given: pass {flag} PATH.")
    reader = get_task_kind(kind).records_reader
    if reader is not None:  # e.g. text-to-image: captioned image files
        return reader(path, _column_map(settings))
    return load_records(path, columns=_column_map(settings), required=list(get_task_kind(kind).required_fields))
