"""Settings of each run (the command line's flags, with the same defaults) and what each run returns."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from datainf.errors import ConfigError
from datainf.scores import Scores
from datainf.store import GradientStore

if TYPE_CHECKING:
    from datainf.finetune import FinetuneConfig


logger = logging.getLogger(__name__)

S = TypeVar("S")


def _trainable_kinds() -> tuple[str, ...]:
    """Task kinds ``finetune_run`` can train (from the task-kind registry, :mod:`datainf.tasks.kinds`)."""
    from datainf.tasks import available_task_kinds

    return tuple(available_task_kinds(trainable=True))


def _loadable_kinds() -> tuple[str, ...]:
    """Task kinds whose models ``gradients_run`` / ``score_run`` can load from a folder."""
    from datainf.tasks import available_task_kinds

    return tuple(available_task_kinds(loadable=True))


_DTYPES = ("float32", "float64", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------- settings


def _input_path(value: str | os.PathLike[str] | None) -> str | None:
    """An input path as the command line stores it: absolute when it exists (relative paths are taken
    from the current folder); kept as given otherwise, so messages show what was typed (e.g. a hub id)."""
    if value is None:
        return None
    text = os.path.expanduser(os.fspath(value))
    return str(Path(text).absolute()) if Path(text).exists() else text


def _out_path(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else str(Path(os.path.expanduser(os.fspath(value))).absolute())


def _normalise(settings: Any, paths: Sequence[str], choices: Mapping[str, Sequence[str]]) -> None:
    """Normalise a frozen settings object in place: ``out`` and the ``paths`` fields as the CLI
    stores them, sequences as tuples; values outside ``choices`` raise ConfigError."""
    object.__setattr__(settings, "out", _out_path(settings.out))
    for name in paths:
        object.__setattr__(settings, name, _input_path(getattr(settings, name)))
    for item in fields(settings):
        value = getattr(settings, item.name)
        if isinstance(value, list):
            object.__setattr__(settings, item.name, tuple(value))
    for name, allowed in choices.items():
        value = getattr(settings, name)
        if value is not None and value not in allowed:
            raise ConfigError(f"Bad value {value!r} for {name}: choose one of {list(allowed)}.")


def settings_from_mapping(cls: type[S], values: Mapping[str, Any]) -> S:
    """``cls(**values)`` keeping only the keys that are fields of the settings dataclass ``cls``
    (e.g. the command line's resolved options, which also hold ``quiet`` and ``overwrite``)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class FinetuneSettings:
    """Settings of :func:`finetune_run` (``datainf finetune``).

    Attributes:
        out: the run folder (the adapter goes to ``<out>/adapter``).
        model: local folder of the base model (``save_pretrained`` layout).
        kind: ``classification`` (default) or ``causal-lm``.
        max_length: longest token sequence (default 128).
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        data: training data (.jsonl/.json/.csv/.tsv/.parquet or a saved HF dataset folder).
        text_column, label_column, prompt_column, response_column, id_column: the data's column for
            each of our fields (default: the field's own name; ids default to the row number).
        r, alpha, target_modules, dropout: LoRA rank, alpha, adapted layer names, dropout.
        epochs, lr, batch_size, warmup_ratio, weight_decay, max_grad_norm, seed: training (AdamW,
            linear schedule; ``max_grad_norm=None`` turns clipping off).
        eval_data: validation data (same columns as ``data``): loss, and accuracy for
            classification, after every epoch, and the best epoch (:func:`datainf.finetune.finetune_lora`).
        keep_best: keep the best epoch's adapter (lowest validation loss; needs ``eval_data``)
            instead of the last one (default: the last, so the scores explain the model the recipe trained).
        checkpoint_every: optimiser steps between checkpoints (``<out>/finetune-checkpoint.pt``, also
            written at every epoch end; ``0``: epoch ends only). An interrupted run resumes from the last
            one when rerun with the same settings. Not part of the configuration (not in ``config.json``).
    """

    out: str | None = None
    model: str | None = None
    kind: str | None = None
    max_length: int | None = None
    device: str = "cpu"
    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    id_column: str | None = None
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    dropout: float = 0.1
    epochs: int = 10
    lr: float = 3e-4
    batch_size: int = 32
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_data: str | None = None
    keep_best: bool = False
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        _normalise(self, ("model", "data", "eval_data"), {"kind": _trainable_kinds()})
        if not isinstance(self.keep_best, bool):
            raise ConfigError(f"keep_best must be True or False, got {self.keep_best!r}.")
        if self.keep_best and not self.eval_data:
            raise ConfigError("--keep-best picks the epoch with the lowest validation loss: pass --eval-data PATH too.")
        every = self.checkpoint_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ConfigError(f"checkpoint_every must be an integer >= 0 (0: at epoch ends only), got {every!r}.")

    def finetune_config(self) -> FinetuneConfig:
        """The recipe as a validated :class:`~datainf.finetune.FinetuneConfig` (``kind`` defaults to
        ``classification``, ``max_length`` to 128): what :func:`finetune_run` and the LDS retrains train."""
        from datainf.finetune import FinetuneConfig

        names = ("r", "alpha", "target_modules", "dropout", "epochs", "lr", "batch_size", "warmup_ratio")
        values = {name: getattr(self, name) for name in (*names, "weight_decay", "max_grad_norm", "seed")}
        values["kind"] = "classification" if self.kind is None else self.kind
        values["max_length"] = 128 if self.max_length is None else self.max_length
        return FinetuneConfig.from_dict(values)


@dataclass(frozen=True)
class GradientsSettings:
    """Settings of :func:`gradients_run` (``datainf grads``).

    Attributes:
        out: the gradient store folder.
        model: local folder of the base model.
        adapter: folder of the trained LoRA adapter, or a :func:`finetune_run` output folder.
        kind: task kind (default: the adapter's, else ``classification``).
        max_length: longest token sequence (default: the adapter's training value, else the model's limit).
        device: ``cpu``, ``cuda`` (this rank's GPU under torchrun), ``cuda:1``, ...
        num_labels: classes of the classifier (default: the adapter's, else the number of ``label_names``).
        label_names: the classifier's class names in class-id order (``"a,b,c"`` or a sequence), for
            adapters that do not record them (trained without datainf); default: the adapter's, else
            the model config's ``id2label`` when it holds real names (not ``LABEL_0``, ...).
        grad_batch_size: examples per forward/backward pass.
        dtype: storage dtype of the gradients.
        shard_size: examples per gradient shard file.
        project_dim: store a seeded random sketch of at most this many numbers per block instead of
            the block (:class:`datainf.gradients.projection.ProjectionConfig`); ``None``: full gradients.
            Recorded in ``config.json`` only when set.
        project_seed: the projection's seed (train and test gradients need the same dimension and seed).
        data: the examples to differentiate.
        text_column, label_column, prompt_column, response_column, id_column: as in :class:`FinetuneSettings`.
        factors: also collect the Kronecker factors of the ``kfac`` / ``ekfac`` methods into
            ``<out>/kronecker-factors`` (``collect_gradients(collect_factors=True)``). Recorded in
            ``config.json`` only when on, and not compared: a finished store gets its factors by a
            rerun with ``factors=True`` (only the factors are computed).
    """

    out: str | None = None
    model: str | None = None
    adapter: str | None = None
    kind: str | None = None
    max_length: int | None = None
    device: str = "cpu"
    num_labels: int | None = None
    label_names: tuple[str, ...] | None = None
    grad_batch_size: int = 16
    dtype: str = "float32"
    shard_size: int = 1024
    project_dim: int | None = None
    project_seed: int = 0
    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    id_column: str | None = None
    factors: bool = False

    def __post_init__(self) -> None:
        _normalise(self, ("model", "adapter", "data"), {"kind": _loadable_kinds(), "dtype": _DTYPES})
        _normalise_label_names(self)
        if not isinstance(self.factors, bool):
            raise ConfigError(f"factors must be True or False, got {self.factors!r}.")
        _projection_of(self)  # refuses a bad dimension or seed now


def _projection_of(settings: GradientsSettings | ScoreSettings) -> Any:
    """The settings' :class:`~datainf.gradients.projection.ProjectionConfig`, or ``None`` (no ``project_dim``)."""
    if settings.project_dim is None:
        return None
    from datainf.gradients.projection import ProjectionConfig

    return ProjectionConfig(dim=settings.project_dim, seed=settings.project_seed)


def _without_projection_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` keeps the projection settings only when a projection is asked for (older run
    folders, written before they existed, still resume)."""
    if saved.get("project_dim") is None:
        saved.pop("project_dim", None)
        if saved.get("project_seed") == 0:
            saved.pop("project_seed", None)
    return saved


@dataclass(frozen=True)
class ScoreSettings:
    """Settings of :func:`score_run` (``datainf score``): from two gradient stores, or from a model,
    an adapter and two datasets (the training gradients computed on the fly on every pass, never
    written; the test gradients into ``<out>/grads-test``), or from a model, an adapter, the training
    data and a test store.

    Attributes:
        out: the run folder.
        train_grads, test_grads: gradient stores of the training and test examples.
        model, adapter, kind, max_length, device, num_labels, label_names, grad_batch_size, dtype,
            shard_size, project_dim, project_seed: as in :class:`GradientsSettings` (used with
            ``train_data`` / ``test_data``: the on-the-fly training gradients and the test store are
            projected alike).
        train_data, test_data: training and test data. ``test_grads`` may replace ``test_data``.
        keep_train_store: with ``train_data``, compute the training gradients once into
            ``<out>/grads-train`` (a store of ``4 n sum_l d_l`` bytes in float32) and stream them from
            there, instead of recomputing them on every pass (the default: no bytes on disk, one
            forward/backward pass over the training data per streaming pass plus one for the norms;
            :class:`datainf.gradients.OnTheFlyGradients`). Recorded in ``config.json`` only when on.
        scoring: the scoring pass (:attr:`datainf.influence.InfluenceConfig.scoring`): ``gradients``
            (exact), or ``loss-difference`` (training gradients computed on the fly, ``average``
            mode: a forward difference of each example's loss, checked on a few rows). Recorded in
            ``config.json`` only when not ``gradients``.
        text_column, label_column, prompt_column, response_column, id_column: as in :class:`FinetuneSettings`.
        method: influence method names (see :func:`datainf.methods.available_methods`).
        mode: ``average`` (one score per training example, on the mean test loss), ``pairwise``
            (one per (test, train) pair) or ``self`` (each training example's self-influence, on its
            own loss: no test set, so ``test_grads`` / ``test_data`` must not be given).
        normalize: unit-normalise every gradient (over all blocks) before scoring: cosine-style
            scores that rank by gradient direction (:class:`datainf.influence.InfluenceConfig`).
            Recorded in ``config.json`` only when on (folders written before it existed stay valid).
        loss_baseline: also write the training-loss baseline (each training example's loss under
            the fine-tuned model, ``scores-loss``; high = suspicious, :mod:`datainf.baselines`).
            ``None`` (default): on when scoring from ``train_data`` (the model is loaded anyway),
            off from stores; ``True`` with stores is refused (a store holds no losses).
        damping: ``lambda_l = damping * mean ||g_il||^2 / d_l`` (paper: 0.1).
        fixed_lambda: one lambda for every block instead of ``damping``.
        method_options: method name -> that method's options.
        score_batch_size: training gradients read per batch while scoring.
        table_format: ``csv`` or ``parquet`` (the per-method score table).
    """

    out: str | None = None
    train_grads: str | None = None
    test_grads: str | None = None
    model: str | None = None
    adapter: str | None = None
    kind: str | None = None
    max_length: int | None = None
    device: str = "cpu"
    num_labels: int | None = None
    label_names: tuple[str, ...] | None = None
    grad_batch_size: int = 16
    dtype: str = "float32"
    shard_size: int = 1024
    project_dim: int | None = None
    project_seed: int = 0
    train_data: str | None = None
    test_data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    id_column: str | None = None
    method: tuple[str, ...] = ("datainf",)
    mode: Literal["average", "pairwise", "self"] = "average"
    normalize: bool = False
    loss_baseline: bool | None = None
    keep_train_store: bool = False
    scoring: Literal["gradients", "loss-difference"] = "gradients"
    damping: float = 0.1
    fixed_lambda: float | None = None
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    score_batch_size: int = 1024
    table_format: Literal["csv", "parquet"] = "csv"

    def __post_init__(self) -> None:
        _normalise(
            self,
            ("train_grads", "test_grads", "model", "adapter", "train_data", "test_data"),
            {
                "kind": _loadable_kinds(),
                "dtype": _DTYPES,
                "mode": ("average", "pairwise", "self"),
                "table_format": ("csv", "parquet"),
                "scoring": ("gradients", "loss-difference"),
            },
        )
        _normalise_label_names(self)
        _projection_of(self)
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be True or False, got {self.normalize!r}.")
        if not isinstance(self.keep_train_store, bool):
            raise ConfigError(f"keep_train_store must be True or False, got {self.keep_train_store!r}.")
        if self.loss_baseline is not None and not isinstance(self.loss_baseline, bool):
            raise ConfigError(f"loss_baseline must be True, False or None (automatic), got {self.loss_baseline!r}.")
        if isinstance(self.method, str):
            object.__setattr__(self, "method", (self.method,))
        if isinstance(self.method_options, Mapping):
            options = {str(k): dict(v) if isinstance(v, Mapping) else v for k, v in self.method_options.items()}
            object.__setattr__(self, "method_options", options)


@dataclass(frozen=True)
class ReportSettings:
    """Settings of :func:`report_run` (``datainf report``).

    Attributes:
        out: the report folder (``<out>/index.html``).
        scores: scores files written by :func:`score_run` (``scores-<method>.safetensors``).
        data: the training data the scores are about (shows the texts).
        test_data: the test data (shows test texts for pairwise scores).
        text_column, label_column, prompt_column, response_column, id_column: as in :class:`FinetuneSettings`.
        k: examples per list.
        max_test: pairwise scores: test examples that get their own lists.
        model, adapter, device: the fine-tuned classifier (optional): every listed training example
            gets its predicted label and confidence (one forward pass over the listed rows only,
            :func:`datainf.report.predict_labels`). Recorded in ``config.json`` only when given.
    """

    out: str | None = None
    scores: tuple[str, ...] | None = None
    data: str | None = None
    test_data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    id_column: str | None = None
    k: int = 10
    max_test: int = 5
    model: str | None = None
    adapter: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        _normalise(self, ("data", "test_data", "model", "adapter"), {})
        if self.scores is not None:
            files = (self.scores,) if isinstance(self.scores, (str, os.PathLike)) else self.scores
            object.__setattr__(self, "scores", tuple(str(_input_path(f)) for f in files))


def _normalise_label_names(settings: Any) -> None:
    """``label_names`` as a tuple of names (from ``"a,b,c"`` or a sequence), or ``None``."""
    from datainf.data.labels import parse_label_names

    object.__setattr__(settings, "label_names", parse_label_names(settings.label_names))


def _saved(settings: Any) -> dict[str, Any]:
    """The settings as ``config.json`` holds them (tuples as lists, mappings as dicts)."""
    return json.loads(json.dumps(asdict(settings), default=str))


# ---------------------------------------------------------------------------------------------- results


@dataclass
class FinetuneRunResult:
    """What :func:`finetune_run` did: the adapter folder, whether it was already there, the losses.

    Attributes:
        epochs: one row per epoch from ``training_log.json``: ``epoch``, ``loss`` (mean training
            loss), ``seconds``, and with ``eval_data`` ``eval_loss`` (plus ``eval_accuracy`` for
            classification).
        best_epoch: the epoch with the lowest validation loss (``None`` without ``eval_data``).
        kept_epoch: the epoch whose adapter was saved (the last unless ``keep_best``).
    """

    out: Path
    adapter: Path
    reused: bool
    epoch_losses: list[float]
    settings: FinetuneSettings
    stage_seconds: dict[str, float] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    kept_epoch: int | None = None


@dataclass
class GradientsRunResult:
    """What :func:`gradients_run` wrote: the store (``out``) and how many processes computed it;
    ``resumed_examples``: how many were already in ``out`` from an interrupted run (kept, not recomputed)."""

    out: Path
    store: GradientStore
    world_size: int
    settings: GradientsSettings
    stage_seconds: dict[str, float] = field(default_factory=dict)
    resumed_examples: int = 0


@dataclass
class MethodScores:
    """One method's outcome in :func:`score_run`: the scores, their file and table, reused or computed."""

    method: str
    scores: Scores
    path: Path
    table: Path
    reused: bool


@dataclass
class ScoreRunResult:
    """What :func:`score_run` wrote, one :class:`MethodScores` per method in the order asked for."""

    out: Path
    methods: list[MethodScores]
    settings: ScoreSettings
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def scores(self) -> dict[str, Scores]:
        """Method name -> its :class:`~datainf.scores.Scores` (positive = harmful)."""
        return {m.method: m.scores for m in self.methods}


@dataclass
class ReportRunResult:
    """Where :func:`report_run` wrote the report."""

    out: Path
    path: Path
