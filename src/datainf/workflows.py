"""Whole runs into an output folder: fine-tune, gradients, scores, report (what each ``datainf`` command does).

Each function takes a settings dataclass (the same settings as the command line's flags, with the
same defaults) and writes into ``settings.out``, a :class:`~datainf.runs.RunDir`: the resolved
settings go to ``<out>/config.json``; a folder holding results of a *different* configuration is
refused with a :class:`~datainf.errors.ConfigError` unless ``overwrite=True``; rerunning the same
configuration resumes (finished outputs are kept, gradient stores continue where they stopped). A
run that fails on bad input leaves no claimed-but-empty folder behind.

=========================  =====================================================================
:func:`finetune_run`       LoRA fine-tuning -> ``<out>/adapter``
:func:`gradients_run`      per-example LoRA gradients -> the gradient store ``<out>``
:func:`score_run`          influence scores -> ``<out>/scores-<method>.safetensors`` + a table
:func:`report_run`         an HTML report of the most harmful / helpful examples -> ``<out>/index.html``
=========================  =====================================================================

Example::

    from datainf.workflows import ScoreSettings, score_run

    result = score_run(ScoreSettings(out="runs/s", train_grads="runs/g-train", test_grads="runs/g-test"))
    result.scores["datainf"].top_harmful(5)

Under ``torchrun`` every rank calls the same function with the same settings (checked): each rank
computes a share of the gradients and of every sum, rank 0 alone writes ``<out>``. Every rank
returns the same result.

Sign convention of every score: positive influence = harmful (raises the test loss).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from datainf.distributed import DistributedContext, check_same_settings, dist_context, on_every_rank, on_main
from datainf.errors import ConfigError, DatasetError
from datainf.runs import RunDir, removed_on_error
from datainf.scores import Scores
from datainf.store import GradientSource, GradientStore

if TYPE_CHECKING:
    from datainf.finetune import FinetuneConfig
    from datainf.influence import InfluenceConfig

__all__ = [
    "FinetuneSettings",
    "GradientsSettings",
    "ScoreSettings",
    "ReportSettings",
    "FinetuneRunResult",
    "GradientsRunResult",
    "MethodScores",
    "ScoreRunResult",
    "ReportRunResult",
    "finetune_run",
    "gradients_run",
    "score_run",
    "report_run",
    "settings_from_mapping",
]

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


# ---------------------------------------------------------------------------------------------- scores


def score_run(settings: ScoreSettings, *, overwrite: bool = False, progress: bool = True) -> ScoreRunResult:
    """Influence of every training example on the test loss (or, in ``self`` mode, on its own loss),
    per method; writes ``<out>/scores-<method>.safetensors`` and ``<out>/scores-<method>.csv`` (or
    ``.parquet``).

    From stores (``train_grads`` and ``test_grads``) or from data (``model``, ``adapter``,
    ``train_data`` and ``test_data`` or ``test_grads``): the training gradients are then recomputed on
    every streaming pass and never written (their norms and the finished passes are checkpointed in
    ``<out>/onthefly``, so a killed run resumes), unless ``keep_train_store`` puts them in
    ``<out>/grads-train``; the test gradients go to ``<out>/grads-test``.
    ``mode="self"`` takes the training side only. From data the training-loss baseline is written
    too (``scores-loss``, the last row of the result; see :attr:`ScoreSettings.loss_baseline`).
    Scores finished in ``<out>`` with this configuration and these very gradients are reused.

    Under ``torchrun`` every rank runs the same call and computes a share of every sum; rank 0 alone
    writes the outputs; every rank returns the same scores.

    Raises:
        ConfigError: unknown methods, both or neither input given, test inputs in ``self`` mode,
            ``loss_baseline=True`` from stores, ``<out>`` holds another configuration (without
            ``overwrite``), bad influence settings.
        DatasetError: unreadable data, test labels never seen in training.
    """
    from datainf.influence import InfluenceConfig, influence_from_config

    ctx = dist_context()
    with removed_on_error(settings.out):
        methods = _methods(settings)
        from_data = bool(settings.train_data or settings.test_data)  # training data, with a test store or data
        from_stores = not from_data and bool(settings.train_grads or settings.test_grads)
        if settings.train_grads and from_data:
            raise ConfigError(
                "Give either --train-grads (a store) or --train-data (with --model/--adapter) for the training side, "
                "not both."
            )
        if settings.test_grads and settings.test_data:
            raise ConfigError("Give either --test-grads (a store) or --test-data for the test side, not both.")
        if not from_stores and not from_data:
            raise ConfigError(
                "Nothing to score: pass --train-grads and --test-grads, or --model, --adapter, --train-data and "
                "--test-data (or --test-grads) (with --mode self: the training side only)."
            )
        if settings.keep_train_store and not settings.train_data:
            raise ConfigError(
                "--keep-train-store keeps the training gradients computed from --train-data; with --train-grads they "
                "are a store already: drop --keep-train-store."
            )
        if settings.scoring == "loss-difference" and (not settings.train_data or settings.keep_train_store):
            raise ConfigError(
                "--scoring loss-difference replaces a pass of forward/backward over the training data by forward "
                "passes, so it needs training gradients computed on the fly: give --train-data (with --model and "
                "--adapter) without --keep-train-store, or use --scoring gradients."
            )
        self_mode = settings.mode == "self"
        if self_mode and (settings.test_grads or settings.test_data):
            given = "--test-grads" if settings.test_grads else "--test-data"
            raise ConfigError(
                f"--mode self scores each training example on its own loss and uses no test set, but {given} was given: "
                f"drop {given}, or use --mode average / pairwise to score against the test set."
            )
        if settings.loss_baseline and not settings.train_data:
            raise ConfigError(
                "--loss-baseline needs the fine-tuned model and the training data (a gradient store holds no losses): "
                "score from --model, --adapter and --train-data instead of --train-grads, or drop --loss-baseline."
            )
        with_loss = from_data if settings.loss_baseline is None else settings.loss_baseline
        if with_loss and _LOSS_STAGE in methods:
            raise ConfigError(
                f"A registered method is called {_LOSS_STAGE!r}, which is also the training-loss baseline's name: "
                "pass --no-loss-baseline to run that method."
            )
        influence_configs = {  # built (and so validated) before any work
            name: InfluenceConfig(
                method=name,
                mode=settings.mode,
                damping=settings.damping,
                fixed_lambda=settings.fixed_lambda,
                method_options=dict((settings.method_options or {}).get(name, {})),
                batch_size=settings.score_batch_size,
                device=settings.device,
                normalize=settings.normalize,
                scoring=settings.scoring,
            )
            for name in methods
        }
        losses: Callable[[GradientSource], Scores] | None = None
        train_store: GradientSource
        test_store: GradientStore | None
        if from_stores:
            settings, run, train_store, test_store = _score_inputs_from_stores(ctx, settings, overwrite)
        else:
            settings, run, train_store, test_store, losses = _score_inputs_from_data(ctx, settings, overwrite, progress)

        rows: list[MethodScores] = []
        for name in methods:
            stage = f"scores-{name}.safetensors"
            config = influence_configs[name]

            def finished(stage: str = stage, config: InfluenceConfig = config) -> Scores | None:
                return run.load_finished(
                    stage, load=Scores.load, accept=lambda s: _same_scores(s, config, train_store, test_store)
                )

            # rank 0 decides (every rank must then take the same branch: influence runs collectives)
            scores = on_main(ctx, "Reading finished scores", finished)
            reused = scores is not None
            if scores is None:
                with run.timed(f"influence-{name}"):
                    scores = influence_from_config(train_store, test_store, config, progress=progress)
            rows.append(_write_scores(ctx, run, settings, name, scores, reused))
        if with_loss and losses is not None:
            compute_losses = losses

            def loss_row() -> tuple[Scores, bool]:
                done = run.load_finished(
                    f"scores-{_LOSS_STAGE}.safetensors", load=Scores.load, accept=lambda s: _same_loss(s, train_store)
                )
                if done is not None:
                    return done, True
                with run.timed("loss-baseline"):
                    return compute_losses(train_store), False

            scores, reused = on_main(ctx, "Computing the training-loss baseline", loss_row)
            rows.append(_write_scores(ctx, run, settings, _LOSS_STAGE, scores, reused))
        ctx.barrier()  # no rank returns before rank 0 has written everything
        return ScoreRunResult(out=run.path, methods=rows, settings=settings, stage_seconds=run.stage_seconds)


#: The training-loss baseline's name in ``score_run``: ``scores-loss.safetensors``, row ``loss``.
_LOSS_STAGE = "loss"


def _write_scores(
    ctx: DistributedContext, run: RunDir, settings: ScoreSettings, name: str, scores: Scores, reused: bool
) -> MethodScores:
    """Write one method's table (and, unless reused, its scores file) from rank 0; its result row."""
    stage = f"scores-{name}.safetensors"
    stem = run.stage(f"scores-{name}")
    if ctx.is_main:
        table = scores.write_table(stem, settings.table_format)
        if not reused:
            scores.save(run.stage(stage))  # last: its presence marks the method as done
    else:
        table = stem.with_suffix(f".{settings.table_format}")
    return MethodScores(method=name, scores=scores, path=run.stage(stage), table=table, reused=reused)


def _score_inputs_from_stores(
    ctx: DistributedContext, settings: ScoreSettings, overwrite: bool
) -> tuple[ScoreSettings, RunDir, GradientStore, GradientStore | None]:
    self_mode = settings.mode == "self"
    if not settings.train_grads or not (settings.test_grads or self_mode):
        raise ConfigError("Pass both --train-grads and --test-grads (or --mode self, which needs --train-grads only).")
    if settings.project_dim is not None:
        raise ConfigError(
            "--project-dim applies where gradients are computed (datainf grads, score --train-data); the stores "
            "given keep the projection they were collected with (their manifest's fingerprint says which)."
        )
    _check_same_run(ctx, "score", settings, {})  # the gradients themselves are compared by influence
    train_grads, test_grads = settings.train_grads, settings.test_grads

    def open_stores() -> tuple[GradientStore, GradientStore | None]:
        train = _open_store(train_grads, "--train-grads")
        return train, None if test_grads is None else _open_store(test_grads, "--test-grads")

    train_store, test_store = on_every_rank(ctx, "Opening the gradient stores", open_stores)
    run = on_main(ctx, "Checking the output folder", lambda: _claim_score_run(settings, overwrite))
    return settings, run, train_store, test_store


def _score_inputs_from_data(
    ctx: DistributedContext, settings: ScoreSettings, overwrite: bool, progress: bool
) -> tuple[ScoreSettings, RunDir, GradientSource, GradientStore | None, Callable[[GradientSource], Scores]]:
    """The training gradients (computed on the fly, or into a store with ``keep_train_store``), the
    test gradients (computed from ``test_data`` into a store, or the ``test_grads`` store), and the
    training-loss baseline of the same model (a function of the training gradients, whose
    fingerprint it records)."""
    self_mode = settings.mode == "self"
    if not settings.train_data or not (settings.test_data or settings.test_grads or self_mode):
        raise ConfigError(
            "Pass --train-data and --test-data (or --test-grads) (or --mode self, which needs --train-data only)."
        )

    from datainf.baselines import loss_scores
    from datainf.data.labels import LabelEncoder
    from datainf.tasks import get_task_kind

    def read() -> tuple[ScoreSettings, list[dict[str, Any]], list[dict[str, Any]] | None]:
        resolved = _resolve_model_settings(settings, _adapter_meta(settings))
        kind = str(resolved.kind)
        train = _load_data(resolved.train_data, resolved, kind, "--train-data")
        test = None if not resolved.test_data else _load_data(resolved.test_data, resolved, kind, "--test-data")
        if get_task_kind(kind).encodes_labels:
            LabelEncoder.fit(train, held_out=test or ())  # test labels unseen in the training data -> DatasetError
        return resolved, train, test

    settings, train, test = on_every_rank(ctx, "Reading the data", read)
    data = {"training": train} if test is None else {"training": train, "test": test}
    _check_same_run(ctx, "score", settings, {"train": train} if test is None else {"train": train, "test": test})
    run = on_main(ctx, "Checking the output folder", lambda: _claim_score_run(settings, overwrite))
    model, task, encoded = _model_and_task(settings, data)
    test_grads = settings.test_grads
    with_factors = _needs_factors(settings)  # kfac / ekfac: the training side's Kronecker factors too
    with run.timed("gradients"):
        train_store: GradientSource
        if settings.keep_train_store:
            train_store = _compute_store(
                model,
                task,
                encoded["training"],
                run.stage("grads-train"),
                settings,
                ctx,
                progress=progress,
                collect_factors=with_factors,
            )
        else:
            from datainf.gradients import OnTheFlyGradients

            train_store = OnTheFlyGradients(
                model,
                task,
                encoded["training"],
                batch_size=int(settings.grad_batch_size),
                device=settings.device,
                dtype=settings.dtype,
                work_dir=run.stage("onthefly"),
                progress=progress,
                projection=_projection_of(settings),
            )
            if with_factors:
                from datainf.factors import attach_factors
                from datainf.gradients import collect_kronecker_factors

                attach_factors(
                    train_store,
                    collect_kronecker_factors(
                        model,
                        task,
                        encoded["training"],
                        folder=run.stage("onthefly") / "kronecker-factors",
                        batch_size=int(settings.grad_batch_size),
                        device=settings.device,
                        piece_size=int(settings.shard_size),
                        progress=progress,
                    ),
                )
        test_store: GradientStore | None = None
        if test is not None:
            test_store = _compute_store(
                model, task, encoded["test"], run.stage("grads-test"), settings, ctx, progress=progress
            )
        elif test_grads is not None:
            test_store = on_every_rank(
                ctx, "Opening the test gradient store", lambda: _open_store(test_grads, "--test-grads")
            )
    batch_size = int(settings.grad_batch_size)

    def losses(store: GradientSource) -> Scores:
        return loss_scores(model, task, encoded["training"], batch_size=batch_size, fingerprint=store.fingerprint)

    return settings, run, train_store, test_store, losses


def _needs_factors(settings: ScoreSettings) -> bool:
    """Whether a method asked for needs the Kronecker factors (``kfac``, ``ekfac``) and was not given a folder of them."""
    from datainf.methods import get_method

    return any(
        get_method(name).needs_factors and not dict((settings.method_options or {}).get(name, {})).get("factors")
        for name in _methods(settings)
    )


def _claim_score_run(settings: ScoreSettings, overwrite: bool) -> RunDir:
    return RunDir.claim(settings.out, kind="score", settings=_saved_score(settings), overwrite=overwrite)


def _saved_score(settings: ScoreSettings) -> dict[str, Any]:
    """:class:`ScoreSettings` as ``config.json`` holds them: the options added after the first
    release (``normalize``, ``loss_baseline``) only when they are not at their default, so score
    folders written before they existed still resume (a missing key reads as the default)."""
    saved = _saved(settings)
    if saved.get("normalize") is False:
        del saved["normalize"]
    if saved.get("loss_baseline") is None:
        del saved["loss_baseline"]
    if saved.get("label_names") is None:
        del saved["label_names"]
    if saved.get("keep_train_store") is False:
        del saved["keep_train_store"]
    if saved.get("scoring") == "gradients":
        del saved["scoring"]
    return _without_projection_defaults(saved)


def _methods(settings: ScoreSettings) -> list[str]:
    """The method names asked for (normalised, without repeats), checked against the registry."""
    from datainf.methods import available_methods

    methods = list(dict.fromkeys(m.strip().lower().replace("-", "_") for m in settings.method))
    known = list(available_methods())
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"Unknown method(s) {unknown}; choose from {known}.")
    if not methods:
        raise ConfigError(f"No method given; choose from {known}.")
    opts = settings.method_options or {}
    bad = [k for k in opts if k not in methods]
    if bad:
        raise ConfigError(f"--method-options names method(s) {bad} that are not being run ({methods}).")
    for name, value in opts.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"--method-options[{name!r}] must be a JSON object of options, got {value!r}.")
    return methods


def _same_scores(
    scores: Scores, config: InfluenceConfig, train_store: GradientSource, test_store: GradientSource | None
) -> bool:
    """Whether finished scores were computed from these very gradients, in this mode, with this
    normalisation (``config``: the method's settings; logs when not)."""
    same = scores.matches(train_store, test_store)
    if not same:
        logger.info("The %s scores in the output folder came from other gradients; recomputing them.", scores.method)
        return False
    if scores.mode != config.mode or bool(scores.settings.get("normalize", False)) != config.normalize:
        logger.info(
            "The %s scores in the output folder have another mode or normalisation; recomputing them.", scores.method
        )
        return False
    if scores.settings.get("scoring", "gradients") != config.scoring:
        logger.info(
            "The %s scores in the output folder come from another scoring pass; recomputing them.", scores.method
        )
        return False
    return True


def _same_loss(scores: Scores, train_store: GradientSource) -> bool:
    """Whether a finished ``scores-loss`` file is the training-loss baseline of these training examples
    under the model that computed ``train_store`` (logs when not)."""
    from datainf.baselines import LOSS_METHOD

    same = scores.method == LOSS_METHOD and scores.matches(train_store, None)
    if not same:
        logger.info("The training-loss baseline in the output folder is of another model or data; recomputing it.")
    return same


# ---------------------------------------------------------------------------------------------- report


def report_run(settings: ReportSettings, *, overwrite: bool = False) -> ReportRunResult:
    """An HTML report (``<out>/index.html``) of the most harmful / helpful training examples.

    Raises:
        ConfigError: no scores or data given, a scores file is missing, ``<out>`` holds another
            configuration (without ``overwrite``).
        DatasetError: none of the scores' training ids is in ``settings.data``.
    """
    from datainf.data.tabular import load_records
    from datainf.report import write_scores_report

    with removed_on_error(settings.out):
        files = settings.scores or ()
        if not files:
            raise ConfigError("Pass --scores FILE (a scores-<method>.safetensors written by `datainf score`).")
        if not settings.data:
            raise ConfigError("Pass --data PATH: the training data the scores are about (to show the texts).")
        loaded: dict[str, Scores] = {}
        for file in files:
            if not Path(file).is_file():
                raise ConfigError(f"Scores file {file} does not exist.")
            scores = Scores.load(file)
            key = scores.method if scores.method not in loaded else f"{scores.method} ({Path(file).name})"
            loaded[key] = scores
        records = load_records(settings.data, columns=_column_map(settings))
        test_records = load_records(settings.test_data, columns=_column_map(settings)) if settings.test_data else None
        ids = {str(r["id"]) for r in records}
        for name, scores in loaded.items():
            missing = [t for t in scores.train_ids if t not in ids]
            if len(missing) == len(scores.train_ids):
                raise DatasetError(
                    f"None of the {len(missing)} training ids of the {name} scores (e.g. {missing[:3]}) is in {settings.data}; "
                    "pass the training data the scores were computed on (and the same --id-column)."
                )
        run = RunDir.claim(settings.out, kind="report", settings=_saved_report(settings), overwrite=overwrite)
        predictions = _report_predictions(settings, loaded, records) if settings.model or settings.adapter else None
        path = write_scores_report(
            run.path,
            loaded,
            records,
            k=settings.k,
            test_records=test_records,
            max_test_examples=settings.max_test,
            predictions=predictions,
        )
        return ReportRunResult(out=run.path, path=path)


def _saved_report(settings: ReportSettings) -> dict[str, Any]:
    """:class:`ReportSettings` as ``config.json`` holds them: the model options only when given, so report
    folders written before they existed still match."""
    saved = _saved(settings)
    if saved.get("model") is None and saved.get("adapter") is None:
        for key in ("model", "adapter", "device"):
            saved.pop(key, None)
    return saved


def _report_predictions(
    settings: ReportSettings, scores: Mapping[str, Scores], records: list[dict[str, Any]]
) -> dict[str, Any]:
    """The classifier's predicted label and confidence of every training example the report lists."""
    from datainf.data.labels import LabelEncoder
    from datainf.report import listed_ids, predict_labels

    if not settings.model or not settings.adapter:
        raise ConfigError("Predicted labels need both --model (the base model) and --adapter (the fine-tuned adapter).")
    model_settings = GradientsSettings(
        model=settings.model,
        adapter=settings.adapter,
        device=settings.device,
        text_column=settings.text_column,
        label_column=settings.label_column,
        id_column=settings.id_column,
    )
    meta = _adapter_meta(model_settings)
    if (meta.get("kind") or "classification") != "classification":
        raise ConfigError(
            f"Predicted labels are shown for classification adapters; {settings.adapter} is a {meta.get('kind')} "
            "adapter. Drop --model / --adapter."
        )
    wanted = set(listed_ids(scores, settings.k, settings.max_test))
    rows = [r for r in records if str(r["id"]) in wanted]
    model, task, encoded = _model_and_task(model_settings, {"data": rows})
    names = LabelEncoder.from_model(model, meta).names
    return predict_labels(model, task, encoded["data"], label_names=names)


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
    from datainf.gradients.collect import gradient_block_dims

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
