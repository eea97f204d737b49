"""Metrics that judge influence scores, as in the DataInf paper's experiments (docs/method.md section 12),
and the counterfactual check of pairwise scores, the linear datamodeling score (:func:`lds`).

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
from dataclasses import dataclass
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
    "LDSResult",
    "MIN_LDS_SUBSETS",
    "lds",
    "predicted_outputs",
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


# ---------------------------------------------------------------------------------------------- linear datamodeling score

#: The fewest retrained subsets :func:`lds` accepts: a bootstrap interval over fewer resamples
#: of fewer points is not informative (50 or more is the usual choice).
MIN_LDS_SUBSETS = 10


@dataclass(frozen=True)
class LDSResult:
    """The linear datamodeling score of one set of pairwise scores (:func:`lds`).

    Attributes:
        per_test: ``(n_test,)`` float64: Spearman correlation, over the ``M`` subsets, between the
            predicted and the measured output of each test example; ``nan`` where it is undefined
            (the measured or the predicted outputs are constant over the subsets).
        mean: the mean of the finite entries of ``per_test`` (the LDS).
        interval: ``(low, high)``, the percentile bootstrap interval of ``mean`` at ``confidence``.
        confidence: the interval's coverage, e.g. 0.95.
        n_subsets: ``M``, the retrained subsets.
        n_bootstrap: bootstrap resamples drawn.
        n_undefined: test examples whose correlation is undefined (left out of ``mean``).
        seed: the bootstrap's seed.
    """

    per_test: np.ndarray
    mean: float
    interval: tuple[float, float]
    confidence: float
    n_subsets: int
    n_bootstrap: int
    n_undefined: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the numbers, ``per_test`` as a list (``nan`` as ``None``)."""
        return {
            "lds": self.mean,
            "interval": list(self.interval),
            "confidence": self.confidence,
            "n_subsets": self.n_subsets,
            "n_test": int(len(self.per_test)),
            "n_bootstrap": self.n_bootstrap,
            "n_undefined": self.n_undefined,
            "seed": self.seed,
            "per_test": [None if not math.isfinite(v) else float(v) for v in self.per_test.tolist()],
        }


def predicted_outputs(pairwise_scores: Any, subset_masks: Any) -> np.ndarray:
    """The linear datamodel's prediction of each test example's loss after training on each subset.

    With the sign convention of docs/method.md section 3, ``I[t, k]`` is the derivative of test
    example ``t``'s loss with respect to up-weighting training example ``k``. Training on the subset
    ``S`` removes the examples outside it; removing one is the up-weighting ``eps = -1/n``, so to first
    order ``L_t(S) = L_t(all) - (1/n) sum_{k not in S} I[t, k] = c_t + (1/n) sum_{k in S} I[t, k]``,
    with ``c_t = L_t(all) - (1/n) sum_k I[t, k]`` the same for every subset. The prediction returned is
    ``sum_{k in S} I[t, k]`` (the sum over the *included* examples, with a plus sign: including harmful
    examples raises the loss); the constant ``c_t`` and the factor ``1/n`` drop out of a rank correlation.

    Args:
        pairwise_scores: ``(n_test, n_train)`` influence, row ``t`` on test example ``t`` (the layout of
            pairwise :class:`~datainf.scores.Scores`), or such a ``Scores`` object.
        subset_masks: ``(M, n_train)`` bools: ``mask[j, k]`` = training example ``k`` is in subset ``j``.

    Returns:
        ``(M, n_test)`` float64.
    """
    scores, masks = _lds_scores_and_masks(pairwise_scores, subset_masks)
    return masks.astype(np.float64) @ scores.T


def _lds_scores_and_masks(pairwise_scores: Any, subset_masks: Any) -> tuple[np.ndarray, np.ndarray]:
    values = getattr(pairwise_scores, "values", pairwise_scores)
    mode = getattr(pairwise_scores, "mode", "pairwise")
    if mode != "pairwise":
        raise DatasetError(
            f"LDS needs pairwise scores (one row per test example), got scores of mode {mode!r}; rerun "
            "`datainf score --mode pairwise`."
        )
    scores = _scores(values, "pairwise_scores", ndim=2)
    masks = _to_numpy(subset_masks)
    if masks.ndim != 2:
        raise DatasetError(f"subset_masks must be 2-D (M subsets x n_train), got shape {masks.shape}.")
    if masks.dtype != bool:
        if masks.size and not set(np.unique(masks).tolist()) <= {0, 1}:
            raise DatasetError("subset_masks must hold booleans or 0/1: mask[j, k] = example k is in subset j.")
        masks = masks.astype(bool)
    if masks.shape[1] != scores.shape[1]:
        raise DatasetError(
            f"pairwise_scores has {scores.shape[1]} training examples (columns; shape (n_test, n_train) = "
            f"{scores.shape}) but subset_masks has {masks.shape[1]} (shape (M, n_train) = {masks.shape}); they must "
            "describe the same training examples in the same order."
        )
    return scores, masks


def _column_spearman(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Spearman correlation of ``x`` and ``y`` (same shape) along ``axis`` (the subsets), one per
    remaining position (e.g. ``(M, T)`` -> ``(T,)``); ``nan`` where either is constant. Ties get
    average ranks, as in ``scipy.stats.spearmanr``."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(axis=axis) / denominator
    return np.where(denominator > 0, rho, np.nan)


def lds(
    pairwise_scores: Any,
    subset_masks: Any,
    measured: Any,
    *,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> LDSResult:
    """Linear datamodeling score: how well summed pairwise influences rank retrained models' test losses.

    For every test example ``t``: the Spearman correlation, over the ``M`` subsets, between the
    prediction ``sum_{k in S_j} I[t, k]`` (:func:`predicted_outputs` derives it and its sign) and the
    measured loss of ``t`` after retraining on ``S_j``. Positive = the scores rank the counterfactual
    outcomes the right way round; 0 = no better than chance (random scores); 1 = perfectly.
    ``mean`` averages over the test examples. The interval is a percentile bootstrap of that mean,
    resampling the subsets and the test examples with replacement (``n_bootstrap`` times, seeded).

    Args:
        pairwise_scores: ``(n_test, n_train)`` influence (pairwise :class:`~datainf.scores.Scores` or
            its ``values``), positive = harmful.
        subset_masks: ``(M, n_train)`` bools, ``mask[j, k]`` = example ``k`` was trained on in subset ``j``.
        measured: ``(M, n_test)`` test losses of the model retrained on each subset (for an output where
            higher is better, such as a margin, pass its negative).
        confidence: coverage of the interval, in (0, 1).
        n_bootstrap: bootstrap resamples (>= 100).
        seed: seeds the bootstrap.

    Returns:
        An :class:`LDSResult`.

    Raises:
        DatasetError: shapes that do not match (each message names both shapes), non-finite values,
            scores that are not pairwise, or a correlation that is undefined for every test example.
        ConfigError: fewer than :data:`MIN_LDS_SUBSETS` subsets, a bad ``confidence`` or ``n_bootstrap``.
    """
    if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
        raise ConfigError(f"confidence must be a number in (0, 1), e.g. 0.95 (got {confidence!r}).")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 100:
        raise ConfigError(f"n_bootstrap must be an integer >= 100 (got {n_bootstrap!r}).")
    scores, masks = _lds_scores_and_masks(pairwise_scores, subset_masks)
    outputs = _scores(measured, "measured", ndim=2)
    n_subsets = masks.shape[0]
    if outputs.shape != (n_subsets, scores.shape[0]):
        raise DatasetError(
            f"measured must have shape (M, n_test) = ({n_subsets}, {scores.shape[0]}) for {n_subsets} subsets and "
            f"pairwise_scores of shape (n_test, n_train) = {scores.shape}; got {outputs.shape}."
        )
    if n_subsets < MIN_LDS_SUBSETS:
        raise ConfigError(
            f"{n_subsets} subsets are too few for LDS with a bootstrap interval: at least {MIN_LDS_SUBSETS} are "
            "needed (50 or more is usual). Retrain on more subsets (--subsets)."
        )
    predicted = masks.astype(np.float64) @ scores.T
    per_test = _column_spearman(predicted, outputs)
    finite = np.isfinite(per_test)
    if not finite.any():
        raise DatasetError(
            "The LDS is undefined for every test example: over the subsets, the measured losses or the predicted "
            "outputs are constant (all-zero scores, identical subsets, or retrains that do not depend on the data)."
        )
    if not finite.all():
        logger.warning(
            "LDS is undefined for %d of %d test examples (constant outputs over the subsets); they are left out "
            "of the mean.",
            int((~finite).sum()),
            len(per_test),
        )
    rng = np.random.default_rng(seed)
    n_test = len(per_test)
    rows = rng.integers(0, n_subsets, size=(n_bootstrap, n_subsets))
    cols = rng.integers(0, n_test, size=(n_bootstrap, n_test))
    boot = np.empty(n_bootstrap)
    chunk = max(1, 2_000_000 // (n_subsets * n_test))  # resamples ranked at once (bounded memory)
    for start in range(0, n_bootstrap, chunk):
        r, c = rows[start : start + chunk, :, None], cols[start : start + chunk, None, :]
        rho = _column_spearman(predicted[r, c], outputs[r, c], axis=1)  # (chunk, n_test)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample where every correlation is undefined
            boot[start : start + chunk] = np.nanmean(rho, axis=1)
    boot = boot[np.isfinite(boot)]
    tail = (1.0 - confidence) / 2.0
    low, high = (float(np.quantile(boot, tail)), float(np.quantile(boot, 1.0 - tail))) if len(boot) else (math.nan,) * 2
    return LDSResult(
        per_test=per_test,
        mean=float(per_test[finite].mean()),
        interval=(low, high),
        confidence=confidence,
        n_subsets=n_subsets,
        n_bootstrap=n_bootstrap,
        n_undefined=int((~finite).sum()),
        seed=seed,
    )
