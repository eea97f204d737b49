"""Fine-tuning and gradient collection runs (``datainf finetune``, ``datainf grads``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datainf.distributed import dist_context, on_every_rank, on_main
from datainf.errors import ConfigError, DatasetError
from datainf.runs import RunDir, removed_on_error
from datainf.workflows.settings import (
    FinetuneRunResult,
    FinetuneSettings,
    GradientsRunResult,
    GradientsSettings,
    _saved,
    _without_projection_defaults,
)
from datainf.workflows.steps import (
    _adapter_meta,
    _check_same_run,
    _compute_store,
    _load_data,
    _model_and_task,
    _resolve_model_settings,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- finetune


def finetune_run(settings: FinetuneSettings, *, overwrite: bool = False, progress: bool = True) -> FinetuneRunResult:
    """LoRA-fine-tune ``settings.model`` on ``settings.data``; writes ``<out>/adapter`` and ``<out>/config.json``.

    An adapter already trained in ``<out>`` with these settings is reused.

    Raises:
        ConfigError: no model, bad settings, ``<out>`` holds another configuration (without ``overwrite``).
        DatasetError: unreadable data, missing columns.
    """
    from datainf.data.labels import LabelEncoder
    from datainf.finetune import finetune_lora
    from datainf.models import load_model, resolve_model_dir
    from datainf.tasks import get_task_kind

    with removed_on_error(settings.out):
        settings = replace(
            settings,
            kind="classification" if settings.kind is None else settings.kind,
            max_length=128 if settings.max_length is None else settings.max_length,
        )
        if not settings.model:
            raise ConfigError("No base model given: pass --model DIR (a local folder written by save_pretrained).")
        resolve_model_dir(settings.model)
        ft = settings.finetune_config()
        records = _load_data(settings.data, settings, ft.kind, "--data")
        eval_records = _load_data(settings.eval_data, settings, ft.kind, "--eval-data") if settings.eval_data else None
        run = RunDir.claim(settings.out, kind="finetune", settings=_saved_finetune(settings), overwrite=overwrite)

        class_names = _class_label_names(settings) if get_task_kind(ft.kind).encodes_labels else None
        if class_names is not None:  # a datasets ClassLabel column: its values are class ids, its names the classes
            records = _labels_as_names(records, class_names, "--data")
            if eval_records is not None:
                eval_records = _labels_as_names(eval_records, class_names, "--eval-data")

        def train(adapter_dir: Path) -> Path:
            names: list[str] | None = None
            if class_names is not None:
                names = list(class_names)
            elif get_task_kind(ft.kind).encodes_labels:
                names = list(LabelEncoder.fit(records).names)
            model, tokenizer = load_model(
                str(settings.model),
                kind=ft.kind,
                num_labels=len(names) if names else None,
                device=settings.device,
                seed=ft.seed,
            )
            return finetune_lora(
                model,
                tokenizer,
                records,
                ft,
                output_dir=adapter_dir,
                label_names=names,
                overwrite=True,
                progress=progress,
                eval_records=eval_records,
                keep_best=settings.keep_best,
                checkpoint_dir=run.path,
                checkpoint_every=settings.checkpoint_every,
            )

        with run.timed("finetune"):
            adapter = run.cached(
                "adapter", train, load=lambda path: path, is_done=lambda path: (path / "adapter_config.json").is_file()
            )
        log = _read_log(adapter / "training_log.json")
        epochs = [dict(e) for e in log.get("epochs", []) if isinstance(e, dict)]
        kept = log.get("kept_epoch", len(epochs) or None)
        return FinetuneRunResult(
            out=run.path,
            adapter=adapter,
            reused="adapter" in run.reused,
            epoch_losses=[float(e["loss"]) for e in epochs],
            settings=settings,
            stage_seconds=run.stage_seconds,
            epochs=epochs,
            best_epoch=log.get("best_epoch"),
            kept_epoch=int(kept) if kept is not None else None,
        )


def _class_label_names(settings: FinetuneSettings) -> tuple[str, ...] | None:
    """The class names of the training data's label column when it is a ``datasets`` ``ClassLabel``."""
    from datainf.data.labels import class_label_names

    return class_label_names(settings.data, settings.label_column or "label") if settings.data else None


def _labels_as_names(records: list[dict[str, Any]], names: Sequence[str], flag: str) -> list[dict[str, Any]]:
    """``records`` with ``ClassLabel`` class ids replaced by the class names (names are kept as they are)."""
    from datainf.data.labels import LabelEncoder

    encoder = LabelEncoder.from_names(names)
    out = []
    for record in records:
        label = record.get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(names):
                raise DatasetError(
                    f"{flag}: record {record.get('id')!r} has label {label}, outside the ClassLabel's {len(names)} "
                    f"classes {list(names)[:10]}."
                )
            record = {**record, "label": encoder.names[label]}
        out.append(record)
    return out


def _saved_finetune(settings: FinetuneSettings) -> dict[str, Any]:
    """:class:`FinetuneSettings` as ``config.json`` holds them: without ``checkpoint_every`` (how often
    to checkpoint changes no result), and the options added later (``eval_data``, ``keep_best``) only
    when set, so folders written before they existed still resume (a missing key reads as unset)."""
    saved = _saved(settings)
    del saved["checkpoint_every"]
    if saved.get("eval_data") is None:
        del saved["eval_data"]
    if saved.get("keep_best") is False:
        del saved["keep_best"]
    return saved


def _read_log(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------- gradients


def gradients_run(settings: GradientsSettings, *, overwrite: bool = False, progress: bool = True) -> GradientsRunResult:
    """Per-example LoRA gradients of ``settings.data`` into the gradient store folder ``<out>``.

    Under ``torchrun`` every rank calls this with the same settings: rank 0 claims ``<out>``, each
    rank computes a share of the examples into its part of the store, rank 0 merges the parts.
    A store already in ``<out>`` (with this configuration) is resumed.

    Raises:
        ConfigError: no model or adapter, ``<out>`` holds another configuration or a store of other
            examples (without ``overwrite``).
        DatasetError: unreadable data, missing columns, labels the classifier does not know.
    """
    ctx = dist_context()
    with removed_on_error(settings.out):

        def read() -> tuple[GradientsSettings, list[dict[str, Any]]]:
            resolved = _resolve_model_settings(settings, _adapter_meta(settings))
            return resolved, _load_data(resolved.data, resolved, str(resolved.kind), "--data")

        settings, records = on_every_rank(ctx, "Reading the data", read)
        _check_same_run(ctx, "grads", settings, {"data": records})
        run = on_main(
            ctx,
            "Checking the output folder",
            lambda: RunDir.claim(
                settings.out,
                kind="grads",
                settings=_without_projection_defaults(_saved_grads(settings)),
                overwrite=overwrite,
                write_config=False,
                compare_ignore=("out", "factors"),
                allow_foreign=lambda path: (path / "manifest.json").is_file(),  # a bare gradient store
            ),
        )
        model, task, encoded = _model_and_task(settings, {"data": records})
        with run.timed("gradients"):
            store = _compute_store(
                model,
                task,
                encoded["data"],
                run.path,
                settings,
                ctx,
                progress=progress,
                before_compute=run.write_config,
                collect_factors=settings.factors,
            )
        return GradientsRunResult(
            out=run.path,
            store=store,
            world_size=ctx.world_size,
            settings=settings,
            stage_seconds=run.stage_seconds,
            resumed_examples=store.resumed_examples,
        )


def _saved_grads(settings: GradientsSettings) -> dict[str, Any]:
    """:class:`GradientsSettings` as ``config.json`` holds them: ``factors`` only when on, so folders written
    before it existed read the same."""
    saved = _saved(settings)
    if saved.get("factors") is False:
        del saved["factors"]
    return saved
