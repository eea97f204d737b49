"""What every explain-a-generation experiment shares: the result record and the scoring/metrics step.

An experiment (text generation in :mod:`datainf.explain.text_generation`, text-to-image in
:mod:`datainf.explain.text_to_image`) fine-tunes a LoRA adapter, collects per-example gradients of
the training set and of the test set, and then calls :func:`score_and_evaluate`: pairwise influence
``I[j, k]`` of training example ``k`` on test example ``j`` (positive = harmful: up-weighting ``k``
raises the loss of ``j``) for each method, and per test example the class-detection AUC of ``-I``
against "same class" and the recall of same-class examples among the most helpful ones
(docs/method.md section 12; the paper's Table 2: sections 13.4-13.5).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from datainf.errors import DatasetError
from datainf.scores import Scores
from datainf.store import GradientStore

__all__ = [
    "ExplanationResult",
    "score_and_evaluate",
    "self_influence_scores",
    "needs_factors",
    "class_indices",
    "format_generation_table",
    "GENERATION_METHODS",
]

logger = logging.getLogger(__name__)

#: Methods an experiment runs by default (Exact and LiSSA are added where the caller asks); any name
#: in :func:`datainf.methods.available_methods` is accepted.
GENERATION_METHODS: tuple[str, ...] = ("datainf", "hessian_free")


@dataclass
class ExplanationResult:
    """The outcome of one explain-a-generation experiment.

    Attributes:
        task: ``"text-generation"`` or ``"text-to-image"``.
        dataset: the dataset's name (``sentence``, ``math``, ``math-reason``, ``style``, ``subject``).
        class_names: class names; index = the records' ``"class"`` value.
        train: training records; each has ``"id"``, ``"prompt"``, ``"class"`` (int) and
            ``"class_name"``, plus ``"response"`` (text) or ``"pixel_values"`` ((C, H, W) in [-1, 1]).
        test: test records, same fields.
        scores: method -> pairwise :class:`~datainf.scores.Scores` (values ``(m, n)``, rows follow
            ``test``, columns follow ``train``; positive = harmful).
        metrics: one row per method: ``method``, ``auc_mean``, ``auc_std``, ``recall_mean``,
            ``recall_std``, ``n_test``, ``seconds``, ``notes``.
        quality: how well the fine-tuned model does its task, e.g. ``exact_match_before`` /
            ``exact_match_after`` (text) or ``denoising_loss_before`` / ``_after`` (images).
        generations: test id -> what the fine-tuned model generates from the test prompt: a string
            (text) or a float tensor ``(C, H, W)`` in [-1, 1] (images). May cover only a sample.
        cache: the folder holding the cached adapter, gradients and scores.
        stage_seconds: wall time per stage (data, finetune, gradients, influence, ...).
        self_scores: method -> ``mode="self"`` :class:`~datainf.scores.Scores` (values ``(n,)``, each
            training example's influence on its own loss; large = the rest of the data does not explain
            it), when the configuration asks for them (``self_influence=True``); else empty.
    """

    task: Literal["text-generation", "text-to-image"]
    dataset: str
    class_names: list[str]
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    scores: dict[str, Scores]
    metrics: list[dict[str, Any]]
    quality: dict[str, float] = field(default_factory=dict)
    generations: dict[str, Any] = field(default_factory=dict)
    cache: Path | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    self_scores: dict[str, Scores] = field(default_factory=dict)


def class_indices(records: Sequence[Mapping[str, Any]], class_field: str = "class") -> np.ndarray:
    """``(N,)`` class of each record, read from ``class_field``.

    Raises:
        DatasetError: a record has no such field (class metrics need one).
    """
    missing = [str(r.get("id", i)) for i, r in enumerate(records) if class_field not in r]
    if missing:
        raise DatasetError(
            f"{len(missing)} record(s) have no {class_field!r} field (e.g. {missing[:5]}); class-detection metrics "
            f"need the class of every example. Add a {class_field!r} field, or score without metrics."
        )
    return np.asarray([r[class_field] for r in records])


def score_and_evaluate(
    train_store: GradientStore,
    test_store: GradientStore,
    train_classes: np.ndarray,
    test_classes: np.ndarray,
    *,
    methods: Sequence[str] = GENERATION_METHODS,
    damping: float = 0.1,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    normalize: bool = False,
) -> tuple[dict[str, Scores], list[dict[str, Any]]]:
    """Pairwise influence by each method, and per-test class-detection metrics.

    Args:
        train_store: ``n`` training gradients; its row order must match ``train_classes``.
        test_store: ``m`` test gradients; row order matches ``test_classes``.
        train_classes: ``(n,)`` class of each training example.
        test_classes: ``(m,)`` class of each test example.
        methods: influence methods to run on the same gradients (any registered method).
        damping: ``lambda_l = damping * mean_i ||g_il||^2 / d_l``.
        method_options: per-method options, e.g. ``{"lissa": {"scale": "trace"}}``.
        progress: show progress bars.
        normalize: unit-normalise every training and test gradient first (docs/method.md section 5.2:
            cosine-style scores that rank by gradient direction; no longer an influence on the loss).

    Returns:
        ``(scores, metrics)``: method -> pairwise Scores (``(m, n)``, positive = harmful), and one
        metrics row per method (see :class:`ExplanationResult`).
    """
    from datainf.evaluation import per_test_metrics
    from datainf.influence import influence
    from datainf.methods import check_method_names

    methods = check_method_names(methods)  # any registered method, refused before the first is computed
    if len(train_classes) != train_store.num_examples or len(test_classes) != test_store.num_examples:
        raise DatasetError(
            f"{len(train_classes)} training / {len(test_classes)} test classes for stores of "
            f"{train_store.num_examples} / {test_store.num_examples} examples; they must match."
        )
    scores: dict[str, Scores] = {}
    metrics: list[dict[str, Any]] = []
    for method in methods:
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = influence(
                train_store,
                test_store,
                method=method,
                mode="pairwise",
                damping=damping,
                method_options=dict((method_options or {}).get(method, {})),
                progress=progress,
                normalize=normalize,
            )
        seconds = time.perf_counter() - started
        notes = [str(w.message).split(";")[0] for w in caught][:1]
        if result.diagnostics.get("lissa_diverged"):
            notes.append("diverged")
        row: dict[str, Any] = {"method": method, "seconds": seconds, "notes": ", ".join(notes)}
        values = result.values.numpy()
        if np.isfinite(values).all():
            row.update(per_test_metrics(values, test_classes, train_classes))
        else:
            row.update(
                {
                    "auc_mean": float("nan"),
                    "auc_std": float("nan"),
                    "recall_mean": float("nan"),
                    "recall_std": float("nan"),
                    "n_test": values.shape[0],
                }
            )
            row["notes"] = (row["notes"] + ", non-finite scores").strip(", ")
        logger.info(
            "%s: class-detection AUC %.3f, recall %.3f (%.1f s)", method, row["auc_mean"], row["recall_mean"], seconds
        )
        scores[method] = result
        metrics.append(row)
    return scores, metrics


def self_influence_scores(
    train_store: GradientStore,
    *,
    methods: Sequence[str] = GENERATION_METHODS,
    damping: float = 0.1,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    normalize: bool = False,
) -> dict[str, Scores]:
    """Each training example's self-influence by each method (``mode="self"``, docs/method.md section 5.1).

    Returns:
        method -> :class:`~datainf.scores.Scores` with values ``(n,)`` in the store's row order
        (largest = least explained by the rest of the data).
    """
    from datainf.influence import influence
    from datainf.methods import check_method_names

    out: dict[str, Scores] = {}
    for method in check_method_names(methods):
        out[method] = influence(
            train_store,
            None,
            method=method,
            mode="self",
            damping=damping,
            method_options=dict((method_options or {}).get(method, {})),
            progress=progress,
            normalize=normalize,
        )
    return out


def needs_factors(methods: Sequence[str]) -> bool:
    """Whether one of ``methods`` needs the Kronecker factors collected with the training gradients
    (``kfac``, ``ekfac``: ``collect_gradients(..., collect_factors=True)``), asked of the method registry."""
    from datainf.methods import get_method

    return any(get_method(name).needs_factors for name in methods)


def format_generation_table(metrics: Sequence[Mapping[str, Any]]) -> str:
    """The per-method metric table as aligned plain text (mean ± std over test examples)."""
    header = f"{'method':<14} {'AUC (mean±std)':>16} {'recall (mean±std)':>18} {'seconds':>8}  notes"
    lines = [header, "-" * len(header)]
    for row in metrics:
        lines.append(
            f"{row['method']:<14} {row['auc_mean']:>8.3f}±{row['auc_std']:<7.3f} {row['recall_mean']:>9.3f}±{row['recall_std']:<8.3f}"
            f" {row['seconds']:>8.2f}  {row.get('notes', '')}"
        )
    return "\n".join(lines)
