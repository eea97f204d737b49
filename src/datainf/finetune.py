"""LoRA fine-tuning with peft and a plain torch loop (the DataInf paper's recipe by default).

Recipe (docs/method.md section 13.1): AdamW, learning rate 3e-4, batch 32, linear schedule with 6 % warm-up,
maximum length 128, LoRA on ``query`` / ``value``. The loss of each batch is the mean of the same
per-example losses the gradient collector differentiates: the task of the configured kind
(:mod:`datainf.tasks.kinds`), built by :meth:`~datainf.tasks.TaskKind.make_task`:

* ``classification``: cross-entropy; peft's ``SEQ_CLS`` task type keeps the classifier head
  trainable through ``modules_to_save``; labels become class ids through
  :class:`~datainf.data.labels.LabelEncoder`;
* ``causal-lm``: mean NLL over each example's *response* tokens (prompt and padding masked out).

Training is seeded (LoRA initialisation, dropout, shuffling) and deterministic on the CPU. The
adapter is written with ``save_pretrained`` (safetensors) into a temporary folder that is renamed
into place at the end, so an interrupted run leaves nothing half-written. Next to the adapter:
``datainf_adapter.json`` (base model, its digest, kind, label names, the resolved
:class:`FinetuneConfig`) and ``training_log.json`` (mean loss per epoch; with validation data
also the validation loss, accuracy for classifiers, and the best epoch).

Validation (``eval_records``) runs after every epoch with dropout off and draws no random numbers,
so it does not change the trained adapter. The adapter saved is the last epoch's unless
``keep_best=True``: influence scores then explain the model the recipe produced, and a validation
set that is also the influence test set does not pick the model being explained.

Resuming (``checkpoint_dir``): the trainable tensors, AdamW state, learning-rate schedule, the
shuffling generator and the global random-number state are written atomically after every epoch and
every ``checkpoint_every`` optimiser steps; a rerun with the same settings, data and base model
continues from the last checkpoint and ends with the same adapter, bit for bit on the CPU, as an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from datainf.data.labels import LabelEncoder
from datainf.errors import ConfigError, EmptyInputError
from datainf.models import ADAPTER_METADATA, ModelLoadError, base_model_digest
from datainf.settings import DictSettings, name_tuple
from datainf.tasks.kinds import TaskKind, available_task_kinds, get_task_kind

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["FinetuneConfig", "finetune_lora", "TRAINING_LOG", "CHECKPOINT_FILE"]

logger = logging.getLogger(__name__)

#: Per-epoch losses (and validation metrics) written next to the adapter.
TRAINING_LOG = "training_log.json"

#: The resumable training state in ``checkpoint_dir`` (:func:`finetune_lora`).
CHECKPOINT_FILE = "finetune-checkpoint.pt"

#: Version of the checkpoint's layout; a checkpoint of another version is ignored (training starts over).
_CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class FinetuneConfig(DictSettings):
    """Settings of one LoRA fine-tuning run (written to ``datainf_adapter.json`` with the adapter).

    Attributes:
        kind: a task kind that fine-tuning trains (:func:`datainf.tasks.available_task_kinds` with
            ``trainable=True``): ``classification`` or ``causal-lm`` built in.
        r: LoRA rank.
        alpha: LoRA alpha (the update is scaled by ``alpha / r``).
        target_modules: names of the linear layers that get LoRA (``query``/``value`` for BERT-style
            models; e.g. ``q_proj``/``v_proj`` for Llama, ``c_attn`` for GPT-2).
        dropout: LoRA dropout during training (gradients are later taken with dropout off).
        epochs: passes over the training set (paper: 10).
        lr: AdamW learning rate (paper: 3e-4).
        batch_size: examples per optimiser step (paper: 32).
        warmup_ratio: share of the steps with a linear warm-up (paper: 0.06), then linear decay to 0.
        max_length: longest token sequence; longer examples are cut (paper: 128).
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient-norm clipping (``None``: off; 1.0 is transformers' Trainer default).
        seed: seeds LoRA initialisation, dropout and the shuffling order.
        modules_to_save: extra layers trained in full next to LoRA (peft's ``modules_to_save``), e.g.
            ``("transform.dense",)`` for the randomly initialised LM-head transform of an encoder run as
            a decoder. Their tensors become blocks of the influence computation. Classification heads
            are added by peft itself.
    """

    kind: str = "classification"
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    dropout: float = 0.1
    epochs: int = 10
    lr: float = 3e-4
    batch_size: int = 32
    warmup_ratio: float = 0.06
    max_length: int = 128
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    modules_to_save: tuple[str, ...] = ()

    _settings_name = "fine-tuning"

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "modules_to_save", name_tuple(self.modules_to_save))
        trainable = available_task_kinds(trainable=True)
        if self.kind not in trainable:
            problems.append(f"kind={self.kind!r}: use one of {trainable}")
        targets = name_tuple(self.target_modules)
        object.__setattr__(self, "target_modules", targets)
        if not targets:
            problems.append("target_modules is empty: name the linear layers to adapt, e.g. query,value")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.r) or self.r < 1:
            problems.append(f"r={self.r!r}: the LoRA rank must be an integer >= 1")
        if not is_num(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha={self.alpha!r}: must be a number > 0")
        if not is_num(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r}: must lie in [0, 1)")
        if not is_int(self.epochs) or self.epochs < 1:
            problems.append(f"epochs={self.epochs!r}: must be an integer >= 1")
        if not is_num(self.lr) or self.lr <= 0:
            problems.append(f"lr={self.lr!r}: must be a number > 0")
        if not is_int(self.batch_size) or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r}: must be an integer >= 1")
        if not is_num(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio!r}: must lie in [0, 1)")
        if not is_int(self.max_length) or self.max_length < 2:
            problems.append(f"max_length={self.max_length!r}: must be an integer >= 2")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay!r}: must be a number >= 0")
        if self.max_grad_norm is not None and (not is_num(self.max_grad_norm) or self.max_grad_norm <= 0):
            problems.append(f"max_grad_norm={self.max_grad_norm!r}: must be a number > 0 or None")
        if not is_int(self.seed):
            problems.append(f"seed={self.seed!r}: must be an integer")
        if problems:
            raise ConfigError("Invalid fine-tuning settings: " + "; ".join(problems) + ".")


# ---------------------------------------------------------------------------------------------- data


def _training_data(
    kind: TaskKind, records: Sequence[Mapping[str, Any]], label_names: Sequence[str] | None
) -> tuple[list[dict[str, Any]], LabelEncoder | None]:
    """The records the task is trained on (labels as class ids for kinds that encode them) and the
    label encoder (``None`` for kinds without labels)."""
    data = kind.prepare_records(records)
    if not kind.encodes_labels:
        return data, None
    encoder = LabelEncoder.fit(data) if label_names is None else LabelEncoder.from_names(label_names)
    return encoder.encode(data, "training"), encoder


# ---------------------------------------------------------------------------------------------- peft


def _linear_module_names(model: nn.Module) -> list[str]:
    """Last name components of the layers LoRA can target (linear, GPT-2 ``Conv1D``, convolutions)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if name and (isinstance(m, kinds) or type(m).__name__ == "Conv1D")
        }
    )


def _wrap_with_lora(model: nn.Module, config: FinetuneConfig) -> PeftModel:
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.tuners.lora import LoraLayer

    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ConfigError(
            "The model already holds LoRA layers; finetune_lora wraps a plain transformers model. Load the base model "
            "without an adapter (datainf.models.load_model(base, kind=...))."
        )
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())  # GPT-2 style layers
    peft_type = get_task_kind(config.kind).peft_task_type
    if peft_type is None or peft_type not in TaskType.__members__:
        raise ConfigError(
            f"Task kind {config.kind!r} has peft task type {peft_type!r}; use one of {sorted(TaskType.__members__)}."
        )
    lora_config = LoraConfig(
        task_type=TaskType[peft_type],
        r=config.r,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # peft annotates it int; a float works (scale alpha / r)
        target_modules=list(config.target_modules),
        lora_dropout=config.dropout,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=list(config.modules_to_save) or None,
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(model, lora_config)
    except ValueError as err:
        raise ConfigError(
            f"LoRA cannot be applied with target_modules={list(config.target_modules)} ({str(err)[:200]}). Linear layer "
            f"names in this model: {_linear_module_names(model)[:30]}."
        ) from err
    if config.modules_to_save:  # peft skips names that match nothing; refuse instead of training less than asked
        from peft.utils import ModulesToSaveWrapper

        wrapped = [name for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        missing = [t for t in config.modules_to_save if not any(n == t or n.endswith("." + t) for n in wrapped)]
        if missing:
            raise ConfigError(
                f"modules_to_save {missing} match no layer of the model. Layer names in this model: "
                f"{_linear_module_names(model)[:30]}."
            )
    return peft_model


def _base_model_path(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and Path(str(name)).is_dir():
        return str(Path(str(name)).resolve())
    return None


# ---------------------------------------------------------------------------------------------- output


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode()


def _move_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder to ``final`` (replacing an old one when allowed)."""
    if final.exists():
        if not overwrite:
            raise ConfigError(
                f"{final} already exists; pass overwrite=True (CLI: --overwrite) or choose another folder."
            )
        trash = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _records_digest(records: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the records' JSON (order and content): tells a checkpoint's data from other data."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _evaluate(
    model: nn.Module,
    task: Any,
    data: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    device: torch.device,
    classify: bool,
) -> dict[str, float]:
    """Mean per-example loss of ``data`` under ``model`` (the task's loss, dropout off), and for
    classifiers the accuracy (share of examples whose arg-max logit is the label). Uses no random numbers."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                chunk = data[start : start + batch_size]
                batch = task.collate(chunk, [r["id"] for r in chunk]).to(device)
                total_loss += float(task.per_example_loss(model, batch).double().sum())
                if classify:
                    inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
                    predicted = model(**inputs).logits.argmax(dim=-1)
                    correct += int((predicted == batch.inputs["labels"]).sum())
    finally:
        model.train(was_training)
    result = {"eval_loss": total_loss / len(data)}
    if classify:
        result["eval_accuracy"] = correct / len(data)
    return result


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable tensors (LoRA factors, heads in ``modules_to_save``), by name."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _restore_trainable(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ConfigError("The checkpoint holds other trainable tensors than this model; delete it and rerun.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device))


def _rng_state(devices: Sequence[int]) -> dict[str, Any]:
    return {
        "cpu": torch.random.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(d) for d in devices],
    }


def _set_rng_state(state: Mapping[str, Any], devices: Sequence[int]) -> None:
    torch.random.set_rng_state(state["cpu"])
    for d, s in zip(devices, state.get("cuda", [])):
        torch.cuda.set_rng_state(s, d)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically (a kill leaves the previous checkpoint whole)."""
    from datainf.store import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` when it belongs to this run (``key``), else ``None`` (logged)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file: start over rather than fail
        logger.warning("The fine-tuning checkpoint %s is unreadable (%s); training from the start.", path, err)
        return None
    if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION or state.get("key") != key:
        logger.warning(
            "The fine-tuning checkpoint %s belongs to other settings or data; training from the start.", path
        )
        return None
    return state


def finetune_lora(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    config: FinetuneConfig,
    *,
    output_dir: str | os.PathLike[str],
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    eval_records: Sequence[Mapping[str, Any]] | None = None,
    keep_best: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
) -> Path:
    """LoRA-fine-tune ``model`` on ``records`` and save the adapter to ``output_dir``.

    Args:
        model: a plain transformers model loaded for ``config.kind`` (e.g. by
            :func:`datainf.models.load_model` without an adapter). It is modified in place: LoRA
            layers are injected and trained.
        tokenizer: its tokenizer.
        records: classification: ``{"id", "text", "label"}`` (labels as strings or integers);
            causal LM: ``{"id", "prompt", "response"}``.
        config: a :class:`FinetuneConfig`.
        output_dir: the adapter folder to write (created atomically; its parent must be writable).
        label_names: classification: the class names, index = class id (the head has
            ``len(label_names)`` outputs). Default: the sorted distinct labels of ``records``.
        overwrite: replace an existing ``output_dir``.
        progress: show a progress bar.
        eval_records: validation examples (same fields as ``records``): after every epoch their mean
            loss (and, for classification, accuracy) is logged and written to ``training_log.json``,
            with the best epoch (lowest validation loss). Evaluation draws no random numbers, so the
            trained adapter is the same with or without it.
        keep_best: save the adapter of the best epoch instead of the last one (needs
            ``eval_records``). Off by default: influence then explains the model the recipe trained,
            and the validation set (often also the influence test set) does not pick the model.
        checkpoint_dir: a folder for the resumable training state (:data:`CHECKPOINT_FILE`: trainable
            tensors, optimizer, schedule, random-number states, position). Written atomically after
            every epoch and every ``checkpoint_every`` steps; a rerun with the same settings, data and
            base model resumes from it and ends with the same adapter as an uninterrupted run. Removed
            once the adapter is saved. ``None`` (default): no checkpoints.
        checkpoint_every: optimiser steps between checkpoints within an epoch (``None`` or 0: at
            epoch ends only).

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`, holding ``adapter_config.json``,
        ``adapter_model.safetensors``, ``datainf_adapter.json`` and ``training_log.json``.

    Raises:
        EmptyInputError: no records, or ``eval_records`` given but empty.
        DatasetError: records lack their fields, or labels are not among ``label_names`` (validation
            labels included).
        ConfigError: the head size differs from the number of labels, target modules are absent,
            ``output_dir`` exists and ``overwrite`` is false, ``keep_best`` without ``eval_records``,
            a bad ``checkpoint_every``.
    """
    from transformers import get_linear_schedule_with_warmup

    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}.")
    if not records:
        raise EmptyInputError("No training records: fine-tuning needs at least one example.")
    if eval_records is not None and not eval_records:
        raise EmptyInputError("eval_records is empty: pass validation examples, or None for no validation.")
    if keep_best and eval_records is None:
        raise ConfigError("keep_best needs validation data to pick the best epoch: pass eval_records (--eval-data).")
    if checkpoint_every is not None and (
        not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 0
    ):
        raise ConfigError(
            f"checkpoint_every={checkpoint_every!r}: must be an integer >= 0 (0 or None: epoch ends only)."
        )
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConfigError(
            f"{output_dir} already exists; pass overwrite=True (CLI: --overwrite) or choose another folder."
        )

    kind = get_task_kind(config.kind)
    data, labels = _training_data(kind, records, label_names)
    names = list(labels.names) if labels is not None else None
    eval_data: list[dict[str, Any]] | None = None
    if eval_records is not None:
        eval_data = kind.prepare_records(eval_records)
        if labels is not None:
            eval_data = labels.encode(eval_data, "validation")
    if names is not None:
        head = int(getattr(getattr(model, "config", None), "num_labels", len(names)))
        if head != len(names):
            raise ConfigError(
                f"The model's classification head has {head} outputs but the data has {len(names)} classes "
                f"({names[:10]}). Load the model with num_labels={len(names)}."
            )
    task = kind.make_task(tokenizer, max_length=config.max_length, num_labels=len(names) if names is not None else None)

    base_path = _base_model_path(model)
    try:
        base_digest = base_model_digest(base_path) if base_path else None
    except ModelLoadError:
        base_digest = None
    if base_digest is None:
        logger.warning(
            "The model was not loaded from a local folder; the adapter cannot record which base model it belongs to."
        )

    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    run_key = hashlib.sha256(
        json.dumps(
            {
                "config": config.to_dict(),
                "base": base_digest,
                "labels": names,
                "data": _records_digest(data),
                "eval": _records_digest(eval_data) if eval_data is not None else None,
                "keep_best": keep_best,
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()

    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    started = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        peft_model = _wrap_with_lora(model, config)
        task.setup(peft_model)
        task.validate(data, [r["id"] for r in data])
        if eval_data is not None:
            task.validate(eval_data, [r["id"] for r in eval_data])
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        logger.info(
            "Fine-tuning %d trainable parameters (LoRA r=%d on %s).", n_trainable, config.r, list(config.target_modules)
        )

        steps_per_epoch = math.ceil(len(data) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total_steps), num_training_steps=total_steps
        )
        order_rng = torch.Generator().manual_seed(config.seed)
        log: list[dict[str, Any]] = []
        truncated: set[str] = set()
        best: dict[str, Any] = {"epoch": None, "loss": None, "state": None}
        first_epoch, first_step, resumed_order = 1, 0, None
        partial = (0.0, 0)  # (sum of losses, examples) of the epoch in progress
        saved = _load_checkpoint(checkpoint, run_key) if checkpoint is not None else None
        if saved is not None:
            _restore_trainable(peft_model, saved["trainable"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            order_rng.set_state(saved["order_rng"])
            log, truncated, best = list(saved["log"]), set(saved["truncated"]), dict(saved["best"])
            first_epoch, first_step, resumed_order = int(saved["epoch"]), int(saved["step"]), saved["order"]
            partial = (float(saved["partial_loss"]), int(saved["partial_count"]))
            _set_rng_state(saved["rng"], rng_devices)
            done = (first_epoch - 1) * steps_per_epoch + first_step
            logger.info(
                "Resuming fine-tuning from the checkpoint in %s: epoch %d, step %d (%d of %d steps done).",
                checkpoint,
                first_epoch,
                first_step + 1,
                done,
                total_steps,
            )
        else:
            done = 0

        def write_checkpoint(epoch: int, step: int, order: list[int] | None, loss_sum: float, count: int) -> None:
            assert checkpoint is not None
            _save_checkpoint(
                checkpoint,
                {
                    "version": _CHECKPOINT_VERSION,
                    "key": run_key,
                    "epoch": epoch,
                    "step": step,
                    "order": order,
                    "partial_loss": loss_sum,
                    "partial_count": count,
                    "trainable": _trainable_state(peft_model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "order_rng": order_rng.get_state(),
                    "rng": _rng_state(rng_devices),
                    "log": log,
                    "truncated": sorted(truncated),
                    "best": best,
                },
            )

        peft_model.train()
        bar = tqdm(total=total_steps, initial=done, desc="Fine-tuning (LoRA)", unit="step", disable=not progress)
        try:
            for epoch in range(first_epoch, config.epochs + 1):
                epoch_start = time.perf_counter()
                if resumed_order is not None:
                    order, start_step = list(resumed_order), first_step
                    total_loss, count = partial
                    resumed_order = None
                else:
                    order, start_step = torch.randperm(len(data), generator=order_rng).tolist(), 0
                    total_loss, count = 0.0, 0
                for step in range(start_step, steps_per_epoch):
                    chunk = [data[i] for i in order[step * config.batch_size : (step + 1) * config.batch_size]]
                    batch = task.collate(chunk, [r["id"] for r in chunk]).to(device)
                    truncated.update(batch.truncated_ids)
                    losses = task.per_example_loss(peft_model, batch)
                    loss = losses.mean()
                    if not torch.isfinite(loss):
                        raise ConfigError(
                            f"The training loss became {float(loss)} at epoch {epoch}, step {step + 1}; lower the "
                            "learning rate (--lr)."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    total_loss += float(losses.detach().sum())
                    count += len(chunk)
                    done += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
                    # every checkpoint_every steps; epoch ends are checkpointed below, after evaluation
                    mid_epoch = step + 1 < steps_per_epoch
                    if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and mid_epoch:
                        write_checkpoint(epoch, step + 1, order, total_loss, count)
                entry: dict[str, Any] = {
                    "epoch": epoch,
                    "loss": total_loss / count,
                    "seconds": time.perf_counter() - epoch_start,
                }
                if eval_data is not None:
                    entry.update(
                        _evaluate(
                            peft_model,
                            task,
                            eval_data,
                            batch_size=config.batch_size,
                            device=device,
                            classify=kind.encodes_labels,
                        )
                    )
                    if best["loss"] is None or entry["eval_loss"] < best["loss"]:
                        best = {
                            "epoch": epoch,
                            "loss": entry["eval_loss"],
                            "state": _trainable_state(peft_model) if keep_best else None,
                        }
                log.append(entry)
                _log_epoch(entry, config.epochs)
                if checkpoint is not None and epoch < config.epochs:
                    write_checkpoint(epoch + 1, 0, None, 0.0, 0)
        finally:
            bar.close()
        if keep_best and best["state"] is not None:
            _restore_trainable(peft_model, best["state"])
        peft_model.eval()
    if truncated:
        logger.warning("%d training example(s) were cut to max_length=%d tokens.", len(truncated), config.max_length)
    kept_epoch = int(best["epoch"]) if keep_best and best["epoch"] is not None else config.epochs
    if best["epoch"] is not None:
        logger.info(
            "Best epoch by validation loss: %d (%.4f); the adapter saved is epoch %d's%s.",
            best["epoch"],
            best["loss"],
            kept_epoch,
            "" if keep_best else " (the last; keep_best / --keep-best keeps the best)",
        )

    metadata = {
        "format": "datainf-adapter",
        "version": 1,
        "kind": config.kind,
        "base_model": base_path,
        "base_model_digest": base_digest,
        "num_labels": len(names) if names is not None else None,
        "label_names": names,
        "num_train_examples": len(data),
        "trainable_parameters": n_trainable,
        "finetune_config": config.to_dict(),
        "seconds": time.perf_counter() - started,
    }
    training_log: dict[str, Any] = {"epochs": log, "total_steps": total_steps, "truncated_examples": sorted(truncated)}
    if eval_data is not None:
        metadata["kept_epoch"] = kept_epoch
        training_log.update(
            {
                "num_eval_examples": len(eval_data),
                "best_epoch": best["epoch"],
                "best_eval_loss": best["loss"],
                "kept_epoch": kept_epoch,
            }
        )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    from datainf.store import file_mode

    tmp.chmod(file_mode(folder=True))  # mkdtemp makes it private; the folder it becomes follows the umask
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        (tmp / ADAPTER_METADATA).write_bytes(_json_bytes(metadata))
        (tmp / TRAINING_LOG).write_bytes(_json_bytes(training_log))
        _move_into_place(tmp, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    logger.info("Saved the adapter to %s.", output_dir)
    return output_dir


def _log_epoch(entry: Mapping[str, Any], epochs: int) -> None:
    text = f"Epoch {entry['epoch']}/{epochs}: mean training loss {entry['loss']:.4f}"
    if "eval_loss" in entry:
        text += f", validation loss {entry['eval_loss']:.4f}"
    if "eval_accuracy" in entry:
        text += f", validation accuracy {entry['eval_accuracy']:.3f}"
    logger.info("%s", text)
