"""Metrics that judge influence scores, as in the DataInf paper's experiments (docs/method.md section 12).

**Sign convention.** datainf's influence ``I(k) > 0`` means training example ``k`` *raises* the test
loss (harmful); ``I(k) < 0`` means it lowers it (helpful). Hence:

- mislabeled-data detection ranks by *large* ``I`` (:func:`mislabel_detection_auc`,
  :func:`detection_curve`, :func:`fraction_found_at`);
- "which training examples drove this test example" ranks by *small* ``I``
  (:func:`class_detection_auc`, :func:`recall_at_k`, :func:`per_test_metrics`).

Libraries that return ``-I`` (dattri, pyDVL) must be negated before using these functions.

Every function accepts NumPy arrays, torch tensors or sequences, and raises a
:class:`~datainf.errors.DataInfError` subclass on unusable input: :class:`EmptyInputError` when
there is nothing to score, :class:`DatasetError` for mismatched lengths, non-finite scores, labels
that are not binary, or a label vector with a single class (where ROC AUC is undefined),
:class:`ConfigError` for an out-of-range ``k`` or ``fraction``.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from datainf.errors import ConfigError, DatasetError, EmptyInputError

__all__ = [
    "mislabel_detection_auc",
    "detection_curve",
    "fraction_found_at",
    "class_detection_auc",
    "recall_at_k",
    "per_test_metrics",
    "score_correlation",
]

logger = logging.getLogger(__name__)


def _to_numpy(x: Any) -> np.ndarray:
    """NumPy view of an array, a torch tensor (any device, detached) or a sequence."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _scores(x: Any, name: str, ndim: int = 1) -> np.ndarray:
    """Finite float64 scores of the given rank; raises on empty or non-finite input."""
    arr = _to_numpy(x)
    if arr.ndim != ndim:
        raise DatasetError(f"{name} must be {ndim}-D, got shape {arr.shape}.")
    if arr.size == 0:
        raise EmptyInputError(f"{name} is empty; there is nothing to evaluate.")
    try:
        arr = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{name} must be numeric, got dtype {arr.dtype}.") from exc
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise DatasetError(
            f"{name} holds {int(bad.sum())} NaN or infinite value(s) (first positions {where}). "
            "Scores must be finite; check the gradients and the damping that produced them."
        )
    return arr


def _binary(x: Any, name: str, length: int, scores_name: str) -> np.ndarray:
    """Bool vector of the given length from bools or 0/1 values."""
    arr = _to_numpy(x)
    if arr.ndim != 1:
        raise DatasetError(f"{name} must be 1-D, got shape {arr.shape}.")
    if len(arr) != length:
        raise DatasetError(
            f"{scores_name} has {length} entries but {name} has {len(arr)}; they must describe "
            "the same examples in the same order."
        )
    if arr.dtype != bool:
        values = set(np.unique(arr).tolist())
        if not values <= {0, 1}:
            raise DatasetError(f"{name} must hold booleans or 0/1, found values {sorted(values)[:5]}.")
    return arr.astype(bool)


def _auc(labels: np.ndarray, scores: np.ndarray, what: str) -> float:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        present = "positive" if n_pos else "negative"
        raise DatasetError(
            f"ROC AUC for {what} is undefined: every example is {present}. It needs both classes present."
        )
    return float(roc_auc_score(labels, scores))


def mislabel_detection_auc(scores: Any, is_flipped: Any) -> float:
    """ROC AUC of the influence ``I`` against the "label was flipped" indicator.

    Higher ``I`` (more harmful) should mean "flipped": 1.0 is perfect detection, 0.5 chance, 0.0
    perfectly reversed. Ties count half (sklearn's ``roc_auc_score``).

    Args:
        scores: (n,) influence of each training example on the (averaged) validation loss.
        is_flipped: (n,) bools or 0/1: whether the example's label was corrupted.
    """
    s = _scores(scores, "scores")
    y = _binary(is_flipped, "is_flipped", len(s), "scores")
    return _auc(y, s, "mislabel detection")


def detection_curve(scores: Any, is_flipped: Any) -> tuple[np.ndarray, np.ndarray]:
    """Share of flipped labels found when inspecting examples by decreasing influence.

    Ties in ``scores`` are broken by position (stable sort), so the curve is deterministic.

    Args:
        scores: (n,) influence scores.
        is_flipped: (n,) bools or 0/1.

    Returns:
        ``(fraction_inspected, fraction_found)``, both float64 of shape (n + 1,), starting at
        (0, 0) and ending at (1, 1): after inspecting the ``j`` highest-scored examples,
        ``fraction_inspected[j] = j / n`` and ``fraction_found[j]`` = flipped among them / all
        flipped.

    Raises:
        DatasetError: no example is flipped (the curve would divide by zero), or bad input.
    """
    s = _scores(scores, "scores")
    y = _binary(is_flipped, "is_flipped", len(s), "scores")
    n_flipped = int(y.sum())
    if n_flipped == 0:
        raise DatasetError("is_flipped marks no example as flipped; the detection curve is undefined.")
    order = np.argsort(-s, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(y[order], dtype=np.float64)]) / n_flipped
    inspected = np.arange(len(s) + 1, dtype=np.float64) / len(s)
    return inspected, found


def fraction_found_at(scores: Any, is_flipped: Any, fraction: float) -> float:
    """Share of all flipped labels among the top ``fraction`` of examples by influence.

    The top ``floor(fraction * n)`` examples (highest ``I``, ties by position) are inspected.

    Raises:
        ConfigError: ``fraction`` outside [0, 1].
        DatasetError: no example is flipped, or bad input.
    """
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ConfigError(f"fraction must lie in [0, 1] (got {fraction}).")
    _, found = detection_curve(scores, is_flipped)
    n = len(found) - 1
    k = int(math.floor(fraction * n + 1e-9))
    return float(found[k])


def _row_and_mask(scores_row: Any, same_class: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores_row, "scores_row")
    y = _binary(same_class, "same_class", len(s), "scores_row")
    return s, y


def class_detection_auc(scores_row: Any, same_class: Any) -> float:
    """ROC AUC of ``-I`` against "same class as the test example", for one test example.

    Helpful training examples (small ``I``) should be the ones of the test example's class: 1.0
    when every same-class example has a smaller ``I`` than every other one.

    Args:
        scores_row: (n,) influence of each training example on this test example's loss.
        same_class: (n,) bools or 0/1.
    """
    s, y = _row_and_mask(scores_row, same_class)
    return _auc(y, -s, "class detection")


def recall_at_k(scores_row: Any, same_class: Any, k: int) -> float:
    """Share of same-class examples among the ``k`` most helpful (smallest ``I``) training examples.

    With ``k`` = the number of same-class training examples (the paper's choice, e.g. 90) this is
    both the precision and the recall of the top ``k``. Ties are broken by position.

    Raises:
        ConfigError: ``k`` not in 1..n.
    """
    s, y = _row_and_mask(scores_row, same_class)
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= len(s):
        raise ConfigError(f"k must be an integer in 1..{len(s)} (got {k!r}).")
    top = np.argsort(s, kind="stable")[: int(k)]
    return float(y[top].mean())


def per_test_metrics(
    score_matrix: Any,
    test_classes: Any,
    train_classes: Any,
    k: int | None = None,
) -> dict[str, float]:
    """Class-detection AUC and recall for every test example, then their mean and spread.

    Args:
        score_matrix: (m, n) pairwise influence, row ``t`` = influence of each training example on
            test example ``t``.
        test_classes: (m,) class of each test example (ints or strings).
        train_classes: (n,) class of each training example.
        k: the cut-off of :func:`recall_at_k`; default: for each test example, the number of
            training examples of its class.

    Returns:
        ``{"auc_mean", "auc_std", "recall_mean", "recall_std", "n_test"}``; standard deviations
        are population ones (ddof = 0) across the m test examples.

    Raises:
        DatasetError: shapes disagree, scores are not finite, or a test class has no training
            example (or every training example is of that class), so AUC is undefined.
    """
    scores = _scores(score_matrix, "score_matrix", ndim=2)
    test_c = _to_numpy(test_classes)
    train_c = _to_numpy(train_classes)
    m, n = scores.shape
    if test_c.ndim != 1 or len(test_c) != m:
        raise DatasetError(f"score_matrix has {m} rows (test examples) but test_classes has shape {test_c.shape}.")
    if train_c.ndim != 1 or len(train_c) != n:
        raise DatasetError(
            f"score_matrix has {n} columns (training examples) but train_classes has shape {train_c.shape}."
        )
    test_names = test_c.tolist()
    aucs = np.empty(m)
    recalls = np.empty(m)
    for t in range(m):
        same = train_c == test_c[t]
        n_same = int(same.sum())
        if n_same in (0, n):
            raise DatasetError(
                f"Test example {t} (class {test_names[t]!r}) has {n_same} of {n} training "
                "examples in its class; class-detection AUC needs some training examples of its "
                "class and some of others."
            )
        aucs[t] = _auc(same, -scores[t], "class detection")
        recalls[t] = recall_at_k(scores[t], same, n_same if k is None else k)
    return {
        "auc_mean": float(aucs.mean()),
        "auc_std": float(aucs.std()),
        "recall_mean": float(recalls.mean()),
        "recall_std": float(recalls.std()),
        "n_test": m,
    }


def score_correlation(a: Any, b: Any) -> dict[str, float]:
    """Pearson and Spearman correlation of two score vectors (e.g. a method against Exact).

    Returns:
        ``{"pearson": r, "spearman": rho}``.

    Raises:
        DatasetError: lengths differ, fewer than 2 entries, non-finite values, or a constant
            vector (correlation undefined).
    """
    x = _scores(a, "a")
    y = _scores(b, "b")
    if len(x) != len(y):
        raise DatasetError(f"a has {len(x)} scores but b has {len(y)}; they must be paired.")
    if len(x) < 2:
        raise DatasetError("Correlation needs at least 2 paired scores.")
    for name, v in (("a", x), ("b", y)):
        if np.all(v == v[0]):
            raise DatasetError(f"{name} is constant; its correlation with anything is undefined.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = stats.pearsonr(x, y)[0]
        spearman = stats.spearmanr(x, y)[0]
    return {"pearson": float(pearson), "spearman": float(spearman)}
