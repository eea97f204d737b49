"""Task kinds: what a ``kind`` name means, in one registry.

The CLI's ``--kind``, :attr:`datainf.finetune.FinetuneConfig.kind` and
:func:`datainf.models.load_model`'s ``kind`` all name a :class:`TaskKind`: the task that defines the
per-example loss, its config class, the record fields the data must have, whether labels are mapped
to class ids (:class:`~datainf.data.labels.LabelEncoder`), and how the model is loaded and
LoRA-wrapped. Code asks the registry (:func:`get_task_kind`) instead of comparing kind strings.

Built-in kinds: ``classification``, ``causal-lm``, ``diffusion`` (no model loader: its UNet is
built with diffusers, see :mod:`datainf.explain`) and ``text-to-image`` (a user's diffusers pipeline
folder and LoRA, loaded by its own :attr:`TaskKind.model_loader`, captioned images read by its
:attr:`TaskKind.records_reader`).

Adding a kind is one module plus one registration: write the task (a
:class:`~datainf.tasks.base.GradientTask` subclass and its config dataclass) and, optionally, a
``training_records`` function; then::

    register_task_kind(TaskKind(
        name="token-classification", task_class=TokenClassificationTask,
        config_class=TokenClassificationConfig, description="...",
        required_fields=("text", "label"), encodes_labels=True,
        auto_model="AutoModelForTokenClassification", peft_task_type="TOKEN_CLS",
    ))
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datainf.errors import ConfigError
from datainf.tasks.base import GradientTask
from datainf.tasks.causal_lm import CausalLMConfig, CausalLMTask
from datainf.tasks.causal_lm import training_records as causal_lm_records
from datainf.tasks.classification import SequenceClassificationConfig, SequenceClassificationTask
from datainf.tasks.classification import training_records as classification_records
from datainf.tasks.diffusion import (
    DiffusionTask,
    DiffusionTaskConfig,
    TextToImageTask,
    TextToImageTaskConfig,
    load_text_to_image,
    read_text_to_image_records,
    text_to_image_task,
)

__all__ = [
    "TaskKind",
    "TaskFactory",
    "RecordsFunction",
    "ModelLoader",
    "RecordsReader",
    "register_task_kind",
    "get_task_kind",
    "available_task_kinds",
]

TaskFactory = Callable[[Any, "int | None", "int | None"], GradientTask]
"""``(tokenizer, max_length, num_labels) -> task``."""

RecordsFunction = Callable[[Sequence[Mapping[str, Any]]], list[dict[str, Any]]]
"""Training records of a kind -> the records fine-tuning feeds its task (checked, ids as strings)."""

ModelLoader = Callable[..., "tuple[Any, Any]"]
"""``(base, *, adapter, device, dtype) -> (model, context)``: a kind's own model loading; ``context``
is what :meth:`TaskKind.make_task` receives in place of a tokenizer."""

RecordsReader = Callable[[Any, Mapping[str, str]], list[dict[str, Any]]]
"""``(path, columns) -> records``: a kind's own data reading (``columns``: field -> file column)."""

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class TaskKind:
    """One task kind: the task, its data and its model, under one name.

    Attributes:
        name: the kind's name (lower case, digits and ``-``), e.g. ``"causal-lm"``.
        task_class: the :class:`~datainf.tasks.base.GradientTask` subclass.
        config_class: the task's config dataclass (for text kinds it takes ``max_length``).
        description: one line saying what is differentiated, for help texts.
        required_fields: record fields every example must have (what
            :func:`datainf.data.load_records` is asked to find), e.g. ``("text", "label")``.
        encodes_labels: the records carry class labels in ``"label"`` that
            :class:`~datainf.data.labels.LabelEncoder` maps to class ids, and the model has a head
            of ``num_labels`` outputs (sized by :func:`~datainf.models.load_model`, checked by
            fine-tuning).
        auto_model: name of the ``transformers`` auto class that loads the model (e.g.
            ``"AutoModelForSequenceClassification"``); ``None``: :func:`~datainf.models.load_model`
            cannot load this kind (build the model yourself).
        decoder: the model is a causal decoder: encoder architectures (BERT, RoBERTa, ...) load with
            ``is_decoder=True``, and a tokenizer without a pad token pads with EOS (or UNK).
        peft_task_type: the peft ``TaskType`` name :func:`~datainf.finetune.finetune_lora` wraps the
            model with (e.g. ``"SEQ_CLS"``, which keeps the head trainable); ``None``: fine-tuning
            does not train this kind.
        training_records: checks fine-tuning records and keeps the fields the task reads; ``None``:
            the records as given, ids as strings.
        task_factory: builds the task for :meth:`make_task`; ``None``:
            ``task_class(tokenizer, config_class(max_length=...))``, with ``num_labels=...`` when
            :attr:`encodes_labels`.
        model_loader: loads the model of a kind that is not a transformers model
            (:data:`ModelLoader`, used by :func:`~datainf.models.load_model` instead of
            :attr:`auto_model`); its second value goes to :attr:`task_factory`.
        records_reader: reads the data of a kind whose records are not rows of a table
            (:data:`RecordsReader`, e.g. image files); ``None``: :func:`datainf.data.load_records`.
    """

    name: str
    task_class: type[GradientTask]
    config_class: type[Any]
    description: str = ""
    required_fields: tuple[str, ...] = ()
    encodes_labels: bool = False
    auto_model: str | None = None
    decoder: bool = False
    peft_task_type: str | None = None
    training_records: RecordsFunction | None = None
    task_factory: TaskFactory | None = None
    model_loader: ModelLoader | None = None
    records_reader: RecordsReader | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            problems.append(f"name={self.name!r} must be lower case letters, digits and '-', starting with a letter")
        if not (isinstance(self.task_class, type) and issubclass(self.task_class, GradientTask)):
            problems.append(f"task_class={self.task_class!r} is not a GradientTask subclass")
        if not (isinstance(self.config_class, type) and dataclasses.is_dataclass(self.config_class)):
            problems.append(f"config_class={self.config_class!r} is not a dataclass")
        if isinstance(self.required_fields, str):
            problems.append(f"required_fields={self.required_fields!r} must be a tuple of field names, not a string")
        else:
            object.__setattr__(self, "required_fields", tuple(str(f) for f in self.required_fields))
        if problems:
            raise ConfigError("Invalid task kind: " + "; ".join(problems) + ".")

    @property
    def trainable(self) -> bool:
        """Whether :func:`datainf.finetune.finetune_lora` can train this kind."""
        return self.peft_task_type is not None

    @property
    def loadable(self) -> bool:
        """Whether :func:`datainf.models.load_model` can load this kind's model."""
        return self.auto_model is not None or self.model_loader is not None

    def make_task(
        self, tokenizer: Any, *, max_length: int | None = None, num_labels: int | None = None
    ) -> GradientTask:
        """The kind's task with its default config.

        Args:
            tokenizer: the model's tokenizer.
            max_length: longest token sequence (``None``: the model's / tokenizer's limit).
            num_labels: classes of the head, for kinds that :attr:`encodes_labels` (ignored by the others).

        Raises:
            ConfigError: the kind cannot be built from a tokenizer alone (e.g. ``diffusion`` needs a
                noise scheduler: build its task directly).
        """
        if self.task_factory is not None:
            return self.task_factory(tokenizer, max_length, num_labels)
        config = self.config_class(max_length=max_length)
        if self.encodes_labels:
            return self.task_class(tokenizer, config, num_labels=num_labels)  # type: ignore[call-arg]
        return self.task_class(tokenizer, config)  # type: ignore[call-arg]

    def model_class(self) -> Any:
        """The ``transformers`` auto class that loads this kind's model.

        Raises:
            ConfigError: the kind has no transformers model class (:attr:`auto_model` is ``None``) or
                transformers has no class of that name.
        """
        if self.auto_model is None:
            raise ConfigError(
                f"Task kind {self.name!r} names no transformers model class; load the model yourself and build "
                f"its task ({self.task_class.__name__}) directly."
            )
        import transformers

        cls = getattr(transformers, self.auto_model, None)
        if cls is None:
            raise ConfigError(f"Task kind {self.name!r}: transformers has no class {self.auto_model!r}.")
        return cls

    def prepare_records(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Fine-tuning records as the task reads them (see :attr:`training_records`)."""
        if self.training_records is not None:
            return self.training_records(records)
        return [{**r, "id": str(r.get("id", i))} for i, r in enumerate(records)]


_KINDS: dict[str, TaskKind] = {}


def register_task_kind(kind: TaskKind) -> TaskKind:
    """Add ``kind`` to the registry under ``kind.name`` and return it.

    Raises:
        ConfigError: ``kind`` is not a :class:`TaskKind`, or another kind of that name is registered.
    """
    if not isinstance(kind, TaskKind):
        raise ConfigError(f"register_task_kind takes a TaskKind, got {type(kind).__name__}.")
    if kind.name in _KINDS and _KINDS[kind.name] != kind:
        raise ConfigError(f"A task kind named {kind.name!r} is already registered; choose another name.")
    _KINDS[kind.name] = kind
    return kind


def available_task_kinds(*, trainable: bool = False, loadable: bool = False) -> list[str]:
    """Names of the registered kinds, in registration order.

    Args:
        trainable: only kinds :func:`datainf.finetune.finetune_lora` can train.
        loadable: only kinds :func:`datainf.models.load_model` can load.
    """
    return [
        name for name, kind in _KINDS.items() if (kind.trainable or not trainable) and (kind.loadable or not loadable)
    ]


def get_task_kind(name: str) -> TaskKind:
    """The kind registered as ``name``.

    Raises:
        ConfigError: no kind has that name (the message lists the known ones).
    """
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ConfigError(f"Unknown task kind {name!r}; use one of {available_task_kinds()}.")
    return kind


def _no_diffusion_factory(tokenizer: Any, max_length: int | None, num_labels: int | None) -> GradientTask:
    raise ConfigError(
        "A diffusion task needs the model's noise scheduler: build it directly, "
        "DiffusionTask(noise_scheduler, DiffusionTaskConfig(...), text_encoder=..., tokenizer=...)."
    )


register_task_kind(
    TaskKind(
        name="classification",
        task_class=SequenceClassificationTask,
        config_class=SequenceClassificationConfig,
        description="sequence classification: cross-entropy of each example's label",
        required_fields=("text", "label"),
        encodes_labels=True,
        auto_model="AutoModelForSequenceClassification",
        peft_task_type="SEQ_CLS",
        training_records=classification_records,
    )
)
register_task_kind(
    TaskKind(
        name="causal-lm",
        task_class=CausalLMTask,
        config_class=CausalLMConfig,
        description="causal language modelling: mean NLL of each example's response tokens",
        required_fields=(),  # the task detects the record format (datainf.data.formats) and names what is missing
        auto_model="AutoModelForCausalLM",
        decoder=True,
        peft_task_type="CAUSAL_LM",
        training_records=causal_lm_records,
    )
)
register_task_kind(
    TaskKind(
        name="diffusion",
        task_class=DiffusionTask,
        config_class=DiffusionTaskConfig,
        description="diffusion: denoising MSE of a diffusers UNet at fixed timesteps, noise seeded by the example",
        task_factory=_no_diffusion_factory,
    )
)


def _text_to_image_factory(pipeline: Any, max_length: int | None, num_labels: int | None) -> GradientTask:
    return text_to_image_task(pipeline, max_length=max_length)


register_task_kind(
    TaskKind(
        name="text-to-image",
        task_class=TextToImageTask,
        config_class=TextToImageTaskConfig,
        description="text-to-image: denoising MSE of a diffusers pipeline's LoRA UNet on captioned images, "
        "at fixed timesteps, noise seeded by the example",
        required_fields=("prompt", "image"),
        task_factory=_text_to_image_factory,
        model_loader=load_text_to_image,
        records_reader=read_text_to_image_records,
    )
)
