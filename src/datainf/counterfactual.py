"""Counterfactual retraining: do the scores predict what happens when the training data changes?

The linear datamodeling score (LDS; :func:`datainf.evaluation.lds` holds the math) compares pairwise
influence with the real thing: draw ``M`` random subsets of the training set (each a ``fraction`` of
it, seeded), retrain the same recipe on each (same seed, so the same initialisation), record every
test example's loss, and correlate those losses with the summed influences of the examples each
subset kept. Sign convention: positive influence = harmful, so a subset that keeps harmful examples
should show a *higher* test loss, and a good method has LDS > 0 (random scores: about 0).

This module runs the retrains:

* :func:`draw_subsets`: the ``(M, n)`` masks, subset ``j`` drawn from ``numpy.random.default_rng([seed, j])``;
* :class:`SubsetTrainer`: what a retrain is (``train_ids``, ``test_ids``, ``describe()``, and
  ``__call__(included) -> (n_test,) losses``); :class:`FinetuneTrainer` is datainf's fine-tuning
  recipe (:class:`~datainf.workflows.FinetuneSettings`, e.g. a ``datainf finetune`` run's
  ``config.json``) on a subset of its training data, measured on a test set;
* :func:`run_retrains`: every subset's retrain into ``<out>/retrains/lds-retrain-<j>.json`` (written
  atomically, one file per retrain), so a killed evaluation resumes with the first missing one; ``jobs``
  worker processes retrain in parallel; a progress bar counts them;
* :func:`lds_run` (``datainf evaluate lds``): the retrains for a recipe, then the LDS of each scores
  file against them, into ``<out>/lds.json``. The retrains do not depend on the scores: scores of
  other methods are evaluated against the cached retrains at no extra cost.

The first missing retrain runs in the calling process before any worker starts, so a recipe that
does not fit (a missing target layer, a bad setting) fails once, clearly, with nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from datainf.errors import ConfigError, DatasetError
from datainf.evaluation import MIN_LDS_SUBSETS, LDSResult, lds
from datainf.runs import RunDir, removed_on_error
from datainf.scores import Scores
from datainf.store import atomic_write_json
from datainf.workflows import FinetuneSettings

__all__ = [
    "RETRAINS_DIR",
    "LDS_FILE",
    "SubsetTrainer",
    "FinetuneTrainer",
    "RetrainResult",
    "LDSSettings",
    "LDSRunResult",
    "draw_subsets",
    "load_recipe",
    "run_retrains",
    "align_scores",
    "lds_settings",
    "lds_run",
]

logger = logging.getLogger(__name__)

#: The folder of the cached retrains inside an evaluation's output folder.
RETRAINS_DIR = "retrains"
#: The LDS of every scores file, written by :func:`lds_run`.
LDS_FILE = "lds.json"
_RETRAIN_FORMAT = "datainf-lds-retrain"


def draw_subsets(n_train: int, *, n_subsets: int = 50, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``M`` random subsets of ``n_train`` examples, each of ``round(fraction * n_train)`` examples.

    Subset ``j`` is a random choice without replacement from ``numpy.random.default_rng([seed, j])``:
    the same ``(seed, j)`` gives the same subset whatever ``n_subsets`` is.

    Returns:
        ``(n_subsets, n_train)`` bool masks, ``mask[j, k]`` = example ``k`` is in subset ``j``.

    Raises:
        ConfigError: ``fraction`` outside (0, 1), subsets that would be empty or the whole set, fewer
            than :data:`~datainf.evaluation.MIN_LDS_SUBSETS` subsets.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
        raise ConfigError(
            f"The subset fraction must lie strictly between 0 and 1 (default 0.5), got {fraction!r}: a subset must "
            "leave some training examples out and keep some."
        )
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int) or n_subsets < MIN_LDS_SUBSETS:
        raise ConfigError(
            f"{n_subsets!r} subsets are too few for LDS with a bootstrap interval: at least {MIN_LDS_SUBSETS} are "
            "needed (50 or more is usual); pass --subsets 50."
        )
    size = int(round(float(fraction) * n_train))
    if not 1 <= size <= n_train - 1:
        raise ConfigError(
            f"A fraction of {fraction} of {n_train} training examples gives subsets of {size}; choose a fraction that "
            f"keeps between 1 and {n_train - 1} examples."
        )
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for j in range(n_subsets):
        masks[j, np.random.default_rng([seed, j]).choice(n_train, size=size, replace=False)] = True
    return masks


@runtime_checkable
class SubsetTrainer(Protocol):
    """One retrain recipe: train on a subset of ``train_ids``, return each test example's loss.

    Implementations must be picklable (they are sent to worker processes when ``jobs > 1``) and
    deterministic: the same subset gives the same losses.
    """

    @property
    def train_ids(self) -> list[str]:
        """The ``n`` training example ids; subsets index into them."""
        ...

    @property
    def test_ids(self) -> list[str]:
        """The ``n_test`` test example ids, in the order of the returned losses."""
        ...

    def describe(self) -> dict[str, Any]:
        """The recipe as JSON-able settings (recorded in ``config.json``: another recipe is refused)."""
        ...

    def __call__(self, included: np.ndarray) -> np.ndarray:
        """Train on the examples at the sorted positions ``included`` (int array); returns ``(n_test,)`` losses."""
        ...


# ---------------------------------------------------------------------------------------------- fine-tuning recipe

#: Records read once per process: (path, columns, required fields) -> records.
_RECORDS: dict[tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]], list[dict[str, Any]]] = {}


def _column_map(settings: FinetuneSettings) -> dict[str, str]:
    mapping = {
        "text": settings.text_column,
        "label": settings.label_column,
        "prompt": settings.prompt_column,
        "response": settings.response_column,
        "id": settings.id_column,
    }
    return {ours: theirs for ours, theirs in mapping.items() if theirs}


def _records(path: str, settings: FinetuneSettings, flag: str) -> list[dict[str, Any]]:
    from datainf.data.tabular import load_records
    from datainf.tasks import get_task_kind

    if not path:
        raise ConfigError(f"No data given: pass {flag} PATH.")
    required = tuple(get_task_kind(str(settings.kind or "classification")).required_fields)
    columns = _column_map(settings)
    key = (str(path), tuple(sorted(columns.items())), required)
    if key not in _RECORDS:
        _RECORDS[key] = load_records(path, columns=columns, required=list(required))
    return _RECORDS[key]


def load_recipe(recipe: FinetuneSettings | str | os.PathLike[str]) -> FinetuneSettings:
    """A :class:`FinetuneSettings` as given, or read from a ``datainf finetune`` run folder / its ``config.json``."""
    if isinstance(recipe, FinetuneSettings):
        return recipe
    path = Path(recipe)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"The recipe {recipe} cannot be read ({err}); pass a `datainf finetune` output folder or its config.json."
        ) from err
    if not isinstance(data, dict) or data.get("command") != "finetune":
        raise ConfigError(
            f"The recipe {file} is not the config.json of a `datainf finetune` run (its command is "
            f"{data.get('command') if isinstance(data, dict) else None!r}); pass that run's folder or config.json."
        )
    from datainf.workflows import settings_from_mapping

    values = {k: v for k, v in data.items() if k not in ("format", "command", "datainf_version")}
    return settings_from_mapping(FinetuneSettings, {**values, "out": None})


@dataclass(frozen=True)
class FinetuneTrainer:
    """datainf's LoRA fine-tuning recipe retrained on subsets of its training data.

    Each retrain loads the base model afresh (head seeded by the recipe's seed), fine-tunes with
    :func:`datainf.finetune.finetune_lora` (LoRA initialisation, dropout and shuffling seeded by the
    same seed; the last epoch's adapter, no validation), then computes each test example's loss with
    the task of the recipe's kind (dropout off). Class ids come from the *whole* training set, so every
    subset's classifier has the same head even when a subset misses a class.

    Attributes:
        recipe: the fine-tuning settings (``out`` unused; ``data`` is the full training set).
        test_data: the test examples whose losses are measured (same columns as the training data).
        threads: torch threads of each retrain (``None``: leave torch's setting).
    """

    recipe: FinetuneSettings
    test_data: str
    threads: int | None = None

    @classmethod
    def from_recipe(
        cls, recipe: FinetuneSettings | str | os.PathLike[str], test_data: str | os.PathLike[str]
    ) -> FinetuneTrainer:
        """From settings or a ``datainf finetune`` run (folder or ``config.json``), and the test data."""
        settings = load_recipe(recipe)
        if not settings.model:
            raise ConfigError("The recipe names no base model: pass --model DIR (or --recipe with a finetune run).")
        if not settings.data:
            raise ConfigError("The recipe names no training data: pass --data PATH (or --recipe with a finetune run).")
        settings.finetune_config()  # refuse bad values before any work
        return cls(recipe=settings, test_data=str(Path(os.fspath(test_data)).absolute()))

    @property
    def kind(self) -> str:
        return str(self.recipe.kind or "classification")

    @property
    def train_records(self) -> list[dict[str, Any]]:
        return _records(str(self.recipe.data), self.recipe, "--data")

    @property
    def test_records(self) -> list[dict[str, Any]]:
        return _records(self.test_data, self.recipe, "--test-data")

    @property
    def train_ids(self) -> list[str]:
        return [str(r["id"]) for r in self.train_records]

    @property
    def test_ids(self) -> list[str]:
        return [str(r["id"]) for r in self.test_records]

    def describe(self) -> dict[str, Any]:
        recipe = json.loads(json.dumps(asdict(self.recipe), default=str))
        for key in ("out", "checkpoint_every", "device"):
            recipe.pop(key, None)
        return {"recipe": recipe, "data": self.recipe.data, "test_data": self.test_data}

    def label_names(self) -> list[str] | None:
        from datainf.data.labels import LabelEncoder
        from datainf.tasks import get_task_kind

        kind = get_task_kind(self.kind)
        if not kind.encodes_labels:
            return None
        return list(LabelEncoder.fit(kind.prepare_records(self.train_records)).names)

    def __call__(self, included: np.ndarray) -> np.ndarray:
        import torch

        from datainf.baselines import training_losses
        from datainf.data.labels import LabelEncoder
        from datainf.finetune import finetune_lora
        from datainf.models import load_model
        from datainf.tasks import get_task_kind

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        config = self.recipe.finetune_config()
        kind = get_task_kind(self.kind)
        names = self.label_names()
        train = self.train_records
        subset = [train[int(i)] for i in included]
        model, tokenizer = load_model(
            str(self.recipe.model),
            kind=self.kind,
            num_labels=len(names) if names else None,
            device=self.recipe.device,
            seed=config.seed,
        )
        with tempfile.TemporaryDirectory(prefix="datainf-lds-retrain-") as tmp:
            finetune_lora(
                model,
                tokenizer,
                subset,
                config,
                output_dir=Path(tmp) / "adapter",
                label_names=names,
                progress=False,
            )
        test = kind.prepare_records(self.test_records)
        if names is not None:
            test = LabelEncoder.from_names(names).encode(test, "test")
        task = kind.make_task(tokenizer, max_length=config.max_length, num_labels=len(names) if names else None)
        task.setup(model)
        task.validate(test, [str(r["id"]) for r in test])
        # finetune_lora trained the LoRA layers it put into `model` in place (dropout off after training)
        return training_losses(model, task, test, batch_size=config.batch_size).numpy()


# ---------------------------------------------------------------------------------------------- the retrains


@dataclass
class RetrainResult:
    """The retrains of one evaluation.

    Attributes:
        masks: ``(M, n_train)`` bools, the subsets.
        measured: ``(M, n_test)`` float64 test losses after retraining on each subset.
        train_ids, test_ids: the examples, in the order of ``masks``' columns and ``measured``'s columns.
        out: the evaluation's folder.
        reused: retrains read from the cache (the others were computed by this call).
        seconds: wall time of each retrain (as recorded when it ran).
    """

    masks: np.ndarray
    measured: np.ndarray
    train_ids: list[str]
    test_ids: list[str]
    out: Path
    reused: int
    seconds: list[float] = field(default_factory=list)


def _retrain_file(folder: Path, j: int) -> Path:
    return folder / RETRAINS_DIR / f"lds-retrain-{j:04d}.json"


def _included_digest(included: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(included, dtype=np.int64).tobytes()).hexdigest()[:16]


def _read_retrain(path: Path, included: np.ndarray, test_ids: Sequence[str]) -> tuple[np.ndarray, float] | None:
    """A finished retrain's losses (and seconds), or ``None`` when the file is missing or of another subset."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != _RETRAIN_FORMAT:
        return None
    if data.get("included") != _included_digest(included) or data.get("test_ids") != list(test_ids):
        return None
    losses = np.asarray(data.get("losses", []), dtype=np.float64)
    if losses.shape != (len(test_ids),) or not np.isfinite(losses).all():
        return None
    return losses, float(data.get("seconds", math.nan))


def _retrain_one(trainer: SubsetTrainer, j: int, included: np.ndarray, path: str, test_ids: list[str]) -> float:
    """Retrain on subset ``j`` and write its file atomically (in a worker or in the caller); returns seconds."""
    started = time.perf_counter()
    losses = np.asarray(trainer(included), dtype=np.float64).reshape(-1)
    seconds = time.perf_counter() - started
    if losses.shape != (len(test_ids),):
        raise DatasetError(
            f"The retrain of subset {j} returned {losses.shape[0]} test losses for {len(test_ids)} test examples."
        )
    if not np.isfinite(losses).all():
        raise DatasetError(f"The retrain of subset {j} gave non-finite test losses; lower the learning rate.")
    atomic_write_json(
        Path(path),
        {
            "format": _RETRAIN_FORMAT,
            "subset": j,
            "n_included": len(included),
            "included": _included_digest(included),
            "test_ids": test_ids,
            "losses": losses.tolist(),
            "seconds": seconds,
        },
    )
    return seconds


def _worker_setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_retrains(
    out: str | os.PathLike[str],
    trainer: SubsetTrainer,
    *,
    n_subsets: int = 50,
    fraction: float = 0.5,
    seed: int = 0,
    jobs: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> RetrainResult:
    """Retrain ``trainer`` on ``n_subsets`` random subsets (:func:`draw_subsets`), cached in ``out``.

    ``out`` is claimed as a :class:`~datainf.runs.RunDir` of kind ``evaluate-lds`` for the recipe
    (``trainer.describe()``), ``n_subsets``, ``fraction`` and ``seed``: another configuration is
    refused unless ``overwrite``. Finished retrains (``<out>/retrains/lds-retrain-<j>.json``) are
    reused; a killed run resumes with the first missing one.

    Args:
        jobs: worker processes for the retrains (spawned; each gets ``cpu_count // jobs`` torch
            threads). The first missing retrain always runs in this process, before any worker.

    Raises:
        ConfigError: bad ``fraction`` / ``n_subsets`` / ``jobs``, ``out`` holds another configuration,
            or the recipe does not fit (from the first retrain).
        DatasetError: a retrain returns the wrong number of losses, or non-finite ones.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be an integer >= 1 (worker processes for the retrains), got {jobs!r}.")
    train_ids, test_ids = list(trainer.train_ids), list(trainer.test_ids)
    masks = draw_subsets(len(train_ids), n_subsets=n_subsets, fraction=fraction, seed=seed)
    settings = {
        **trainer.describe(),
        "subsets": n_subsets,
        "fraction": float(fraction),
        "seed": seed,
        "n_train": len(train_ids),
        "train_ids_sha256": hashlib.sha256("\n".join(train_ids).encode()).hexdigest(),
        "test_ids_sha256": hashlib.sha256("\n".join(test_ids).encode()).hexdigest(),
    }
    with removed_on_error(out):
        run = RunDir.claim(out, kind="evaluate-lds", settings=settings, overwrite=overwrite)
        folder = run.path
        (folder / RETRAINS_DIR).mkdir(exist_ok=True)
        included = [np.flatnonzero(masks[j]) for j in range(n_subsets)]
        measured = np.empty((n_subsets, len(test_ids)))
        seconds = [math.nan] * n_subsets
        missing = []
        for j in range(n_subsets):
            done = _read_retrain(_retrain_file(folder, j), included[j], test_ids)
            if done is None:
                missing.append(j)
            else:
                measured[j], seconds[j] = done
        reused = n_subsets - len(missing)
        if reused:
            logger.info("Reusing %d of %d finished retrains in %s.", reused, n_subsets, folder / RETRAINS_DIR)
        bar = tqdm(total=n_subsets, initial=reused, desc="LDS retrains", unit="retrain", disable=not progress)
        try:
            if missing:  # the first one here: a recipe that does not fit fails once, before any worker starts
                first = missing.pop(0)
                seconds[first] = _retrain_one(
                    trainer, first, included[first], str(_retrain_file(folder, first)), test_ids
                )
                bar.update(1)
            if missing and jobs > 1:
                _parallel(trainer, missing, included, folder, test_ids, seconds, jobs, bar)
            else:
                for j in missing:
                    seconds[j] = _retrain_one(trainer, j, included[j], str(_retrain_file(folder, j)), test_ids)
                    bar.update(1)
        finally:
            bar.close()
        for j in range(n_subsets):
            done = _read_retrain(_retrain_file(folder, j), included[j], test_ids)
            if done is None:
                raise DatasetError(f"The retrain of subset {j} left no readable result in {folder / RETRAINS_DIR}.")
            measured[j] = done[0]
        return RetrainResult(
            masks=masks,
            measured=measured,
            train_ids=train_ids,
            test_ids=test_ids,
            out=folder,
            reused=reused,
            seconds=seconds,
        )


def _parallel(
    trainer: SubsetTrainer,
    todo: list[int],
    included: list[np.ndarray],
    folder: Path,
    test_ids: list[str],
    seconds: list[float],
    jobs: int,
    bar: Any,
) -> None:
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(todo)), mp_context=context, initializer=_worker_setup, initargs=(threads,)
    ) as pool:
        pending: dict[Future[float], int] = {
            pool.submit(_retrain_one, trainer, j, included[j], str(_retrain_file(folder, j)), test_ids): j for j in todo
        }
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    j = pending.pop(future)
                    seconds[j] = future.result()
                    bar.update(1)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


# ---------------------------------------------------------------------------------------------- scores against retrains


def align_scores(scores: Scores, train_ids: Sequence[str], test_ids: Sequence[str]) -> np.ndarray:
    """The pairwise values of ``scores`` as ``(n_test, n_train)`` in the order of ``test_ids`` / ``train_ids``.

    Raises:
        DatasetError: not pairwise scores, or ids that differ from the retrains' (the message names
            the first ids on each side that the other lacks).
    """
    if scores.mode != "pairwise":
        raise DatasetError(
            f"LDS needs pairwise scores (one row per test example); these {scores.method} scores are of mode "
            f"{scores.mode!r}. Rerun `datainf score --mode pairwise` on the same training and test data."
        )
    for what, have, want in (("training", scores.train_ids, train_ids), ("test", scores.test_ids, test_ids)):
        if set(have) != set(want) or len(have) != len(want):
            extra = [i for i in have if i not in set(want)][:5]
            lacking = [i for i in want if i not in set(have)][:5]
            raise DatasetError(
                f"The {scores.method} scores are about other {what} examples than the data: ids in the scores but "
                f"not the data {extra}, in the data but not the scores {lacking} ({len(have)} vs {len(want)} ids). "
                "Pass the scores computed on this very data."
            )
    col = {tid: k for k, tid in enumerate(scores.train_ids)}
    row = {tid: k for k, tid in enumerate(scores.test_ids)}
    values = scores.values.double().numpy()
    return values[np.ix_([row[t] for t in test_ids], [col[t] for t in train_ids])]


@dataclass(frozen=True)
class LDSSettings:
    """Settings of :func:`lds_run` (``datainf evaluate lds``).

    Attributes:
        out: the evaluation folder (cached retrains, ``lds.json``).
        scores: pairwise scores files (``datainf score --mode pairwise``) about the recipe's training
            data and ``test_data``.
        recipe: the fine-tuning recipe: :class:`~datainf.workflows.FinetuneSettings`, or a ``datainf
            finetune`` run folder or its ``config.json`` (the training data is its ``data``).
        test_data: the test examples (the scores' test set).
        subsets: ``M``, retrained subsets (>= :data:`~datainf.evaluation.MIN_LDS_SUBSETS`; default 50).
        fraction: share of the training set in each subset, in (0, 1) (default 0.5).
        seed: seeds the subsets and the bootstrap.
        jobs: worker processes for the retrains.
        confidence: the bootstrap interval's coverage.
    """

    out: str | None = None
    scores: tuple[str, ...] = ()
    recipe: FinetuneSettings | str | None = None
    test_data: str | None = None
    subsets: int = 50
    fraction: float = 0.5
    seed: int = 0
    jobs: int = 1
    confidence: float = 0.95


def lds_settings(values: Mapping[str, Any]) -> LDSSettings:
    """:class:`LDSSettings` from flat options (``datainf evaluate lds``'s resolved flags): ``recipe`` (a
    finetune run) *or* the recipe's own fields (``model``, ``data``, ``epochs``, ... as ``datainf finetune``
    names them), ``scores``, ``test_data``, ``subsets``, ``fraction``, ``subset_seed``, ``jobs``.

    Raises:
        ConfigError: both a ``recipe`` and recipe fields that differ from their defaults.
    """
    from dataclasses import fields

    from datainf.workflows import settings_from_mapping

    names = [f.name for f in fields(FinetuneSettings) if f.name not in ("out", "checkpoint_every")]
    recipe: FinetuneSettings | str | None
    if values.get("recipe"):
        defaults = asdict(FinetuneSettings())
        given = [
            n
            for n in names
            if n in values and json.dumps(values[n], default=str) != json.dumps(defaults[n], default=str)
        ]
        if given:
            raise ConfigError(
                f"Give either --recipe (a finetune run: its settings are the recipe) or the recipe's settings "
                f"({', '.join(given)}), not both."
            )
        recipe = str(values["recipe"])
    elif values.get("model") or values.get("data"):
        recipe = settings_from_mapping(FinetuneSettings, {**{n: values[n] for n in names if n in values}, "out": None})
    else:
        recipe = None
    return LDSSettings(
        out=values.get("out"),
        scores=tuple(values.get("scores") or ()),
        recipe=recipe,
        test_data=values.get("test_data"),
        subsets=int(values.get("subsets", 50)),
        fraction=float(values.get("fraction", 0.5)),
        seed=int(values.get("subset_seed", 0)),
        jobs=int(values.get("jobs", 1)),
    )


@dataclass
class LDSRunResult:
    """What :func:`lds_run` computed: the LDS per scores file (by method name) and the retrains."""

    out: Path
    results: dict[str, LDSResult]
    retrains: RetrainResult
    path: Path


def lds_run(
    settings: LDSSettings, *, trainer: SubsetTrainer | None = None, overwrite: bool = False, progress: bool = True
) -> LDSRunResult:
    """The LDS of each scores file: retrain the recipe on ``settings.subsets`` subsets (cached), correlate.

    Every check runs before the first retrain: the scores files are read and their ids compared with
    the data (scores of another dataset are refused, naming the ids that differ), the subset settings
    and the recipe's values are checked. ``trainer`` replaces the fine-tuning recipe (any
    :class:`SubsetTrainer`; ``recipe`` and ``test_data`` are then unused).

    Writes ``<out>/lds.json``: per method the LDS, its interval and the per-test correlations.

    Raises:
        ConfigError: no scores, no recipe or test data, bad subset settings, ``out`` holds another
            configuration (without ``overwrite``), a recipe that does not fit.
        DatasetError: scores that are not pairwise or about other examples, unreadable data.
    """
    if not settings.scores:
        raise ConfigError("No scores to evaluate: pass --scores FILE (pairwise scores of `datainf score`).")
    if not settings.out:
        raise ConfigError("No output folder: pass --out DIR (the retrains are cached there).")
    loaded = [Scores.load(path) for path in settings.scores]
    names = [s.method for s in loaded]
    if len(set(names)) != len(names):
        names = [f"{s.method} ({Path(p).name})" for s, p in zip(loaded, settings.scores, strict=True)]
    if trainer is None:
        if settings.recipe is None or not settings.test_data:
            raise ConfigError(
                "LDS retrains a fine-tuning recipe: pass --recipe (a `datainf finetune` run) or --model and --data, "
                "and the test data (--test-data)."
            )
        trainer = FinetuneTrainer.from_recipe(settings.recipe, settings.test_data)
    draw_subsets(len(trainer.train_ids), n_subsets=settings.subsets, fraction=settings.fraction, seed=settings.seed)
    aligned = [align_scores(s, trainer.train_ids, trainer.test_ids) for s in loaded]
    retrains = run_retrains(
        settings.out,
        trainer,
        n_subsets=settings.subsets,
        fraction=settings.fraction,
        seed=settings.seed,
        jobs=settings.jobs,
        overwrite=overwrite,
        progress=progress,
    )
    results = {
        name: lds(values, retrains.masks, retrains.measured, confidence=settings.confidence, seed=settings.seed)
        for name, values in zip(names, aligned, strict=True)
    }
    path = retrains.out / LDS_FILE
    atomic_write_json(
        path,
        {
            "sign_convention": "prediction for a subset = sum of the pairwise influences of the examples it keeps "
            "(positive influence = harmful); LDS = Spearman of prediction and measured test loss over the subsets",
            "scores": {name: str(p) for name, p in zip(names, settings.scores, strict=True)},
            "methods": {name: result.to_dict() for name, result in results.items()},
            "retrains": {"count": len(retrains.seconds), "reused": retrains.reused, "seconds": retrains.seconds},
        },
        default=float,
    )
    for name, result in results.items():
        logger.info("LDS %s: %.3f [%.3f, %.3f]", name, result.mean, result.interval[0], result.interval[1])
    return LDSRunResult(out=retrains.out, results=results, retrains=retrains, path=path)
