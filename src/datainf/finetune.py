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
:class:`FinetuneConfig`) and ``training_log.json`` (mean loss per epoch).
"""

from __future__ import annotations

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

__all__ = ["FinetuneConfig", "finetune_lora", "TRAINING_LOG"]

logger = logging.getLogger(__name__)

#: Per-epoch losses written next to the adapter.
TRAINING_LOG = "training_log.json"


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

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`, holding ``adapter_config.json``,
        ``adapter_model.safetensors``, ``datainf_adapter.json`` and ``training_log.json``.

    Raises:
        EmptyInputError: no records.
        DatasetError: records lack their fields, or labels are not among ``label_names``.
        ConfigError: the head size differs from the number of labels, target modules are absent,
            ``output_dir`` exists and ``overwrite`` is false.
    """
    from transformers import get_linear_schedule_with_warmup

    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}.")
    if not records:
        raise EmptyInputError("No training records: fine-tuning needs at least one example.")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConfigError(
            f"{output_dir} already exists; pass overwrite=True (CLI: --overwrite) or choose another folder."
        )

    kind = get_task_kind(config.kind)
    data, labels = _training_data(kind, records, label_names)
    names = list(labels.names) if labels is not None else None
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

    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    started = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        peft_model = _wrap_with_lora(model, config)
        task.setup(peft_model)
        task.validate(data, [r["id"] for r in data])
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
        peft_model.train()
        bar = tqdm(total=total_steps, desc="Fine-tuning (LoRA)", unit="step", disable=not progress)
        try:
            for epoch in range(1, config.epochs + 1):
                epoch_start = time.perf_counter()
                order = torch.randperm(len(data), generator=order_rng).tolist()
                total_loss, count = 0.0, 0
                for step in range(steps_per_epoch):
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
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
                entry = {"epoch": epoch, "loss": total_loss / count, "seconds": time.perf_counter() - epoch_start}
                log.append(entry)
                logger.info("Epoch %d/%d: mean training loss %.4f", epoch, config.epochs, entry["loss"])
        finally:
            bar.close()
        peft_model.eval()
    if truncated:
        logger.warning("%d training example(s) were cut to max_length=%d tokens.", len(truncated), config.max_length)

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
    training_log = {"epochs": log, "total_steps": total_steps, "truncated_examples": sorted(truncated)}

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
    logger.info("Saved the adapter to %s.", output_dir)
    return output_dir
