"""Tests of datainf.evaluation: hand-computed values, metric directions, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datainf.errors import ConfigError, DataInfError, DatasetError, EmptyInputError
from datainf.evaluation import (
    class_detection_auc,
    detection_curve,
    fraction_found_at,
    mislabel_detection_auc,
    per_test_metrics,
    recall_at_k,
    score_correlation,
)

SCORES = [0.9, 0.1, 0.8, 0.3]
FLIPPED = [1, 0, 0, 1]


# ---------------------------------------------------------------- mislabel detection


def test_mislabel_auc_hand_computed() -> None:
    # Positive/negative pairs: (0.9>0.1) (0.9>0.8) (0.3>0.1) win, (0.3<0.8) loses -> 3/4.
    assert mislabel_detection_auc(SCORES, FLIPPED) == pytest.approx(0.75)


def test_mislabel_auc_ties_count_half() -> None:
    # The positive (1.0) ties one negative (0.5) and beats the other (1) -> 1.5 / 2.
    assert mislabel_detection_auc([1.0, 1.0, 0.0], [True, False, False]) == pytest.approx(0.75)


def test_mislabel_auc_direction() -> None:
    flipped = np.array([0, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
    harmful_when_flipped = np.where(flipped, 2.0, -1.0)  # flipped examples raise the loss: I > 0
    assert mislabel_detection_auc(harmful_when_flipped, flipped) == 1.0
    assert mislabel_detection_auc(-harmful_when_flipped, flipped) == 0.0


def test_mislabel_auc_accepts_torch_tensors() -> None:
    got = mislabel_detection_auc(torch.tensor(SCORES, dtype=torch.float32), torch.tensor(FLIPPED))
    assert got == pytest.approx(0.75)
    bf16 = torch.tensor(SCORES, dtype=torch.bfloat16)
    assert mislabel_detection_auc(bf16, FLIPPED) == pytest.approx(0.75)


def test_mislabel_auc_errors() -> None:
    with pytest.raises(DatasetError, match="4 entries but is_flipped has 3"):
        mislabel_detection_auc(SCORES, [1, 0, 0])
    with pytest.raises(DatasetError, match="undefined"):
        mislabel_detection_auc(SCORES, [0, 0, 0, 0])
    with pytest.raises(DatasetError, match="undefined"):
        mislabel_detection_auc(SCORES, [1, 1, 1, 1])
    with pytest.raises(DatasetError, match="NaN or infinite"):
        mislabel_detection_auc([0.9, float("nan"), 0.8, 0.3], FLIPPED)
    with pytest.raises(DatasetError, match="0/1"):
        mislabel_detection_auc(SCORES, [2, 0, 0, 1])
    with pytest.raises(EmptyInputError):
        mislabel_detection_auc([], [])
    with pytest.raises(DatasetError, match="1-D"):
        mislabel_detection_auc([[0.1, 0.2]], [1, 0])


# ---------------------------------------------------------------- detection curve


def test_detection_curve_hand_computed() -> None:
    # Decreasing I: 0.9 (flipped), 0.8 (clean), 0.3 (flipped), 0.1 (clean).
    inspected, found = detection_curve(SCORES, FLIPPED)
    np.testing.assert_allclose(inspected, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(found, [0.0, 0.5, 0.5, 1.0, 1.0])


def test_detection_curve_ties_broken_by_position() -> None:
    _, found = detection_curve([1.0, 1.0], [0, 1])
    np.testing.assert_allclose(found, [0.0, 0.0, 1.0])


def test_fraction_found_at_hand_computed() -> None:
    assert fraction_found_at(SCORES, FLIPPED, 0.0) == 0.0
    assert fraction_found_at(SCORES, FLIPPED, 0.25) == pytest.approx(0.5)
    assert fraction_found_at(SCORES, FLIPPED, 0.5) == pytest.approx(0.5)
    assert fraction_found_at(SCORES, FLIPPED, 0.6) == pytest.approx(0.5)  # floor(0.6 * 4) = 2
    assert fraction_found_at(SCORES, FLIPPED, 0.75) == pytest.approx(1.0)
    # 0.3 * 10 is 2.9999... in floating point; it must still inspect 3 examples.
    assert fraction_found_at(np.arange(10.0)[::-1], [1, 1, 1] + [0] * 7, 0.3) == 1.0


def test_fraction_found_direction() -> None:
    flipped = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    planted = flipped * 5.0
    assert fraction_found_at(planted, flipped, 0.2) == 1.0
    assert fraction_found_at(-planted, flipped, 0.2) == 0.0


def test_detection_curve_errors() -> None:
    with pytest.raises(DatasetError, match="no example"):
        detection_curve(SCORES, [0, 0, 0, 0])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        fraction_found_at(SCORES, FLIPPED, 1.5)
    with pytest.raises(DatasetError):
        detection_curve(SCORES, FLIPPED[:2])


# ---------------------------------------------------------------- per test example

ROW = [-3.0, 2.0, -2.0, 1.0]
SAME = [1, 0, 0, 1]


def test_class_detection_auc_hand_computed() -> None:
    # -I = [3, -2, 2, -1]; positives 3, -1 vs negatives -2, 2: wins 3>-2, 3>2, -1>-2 -> 3/4.
    assert class_detection_auc(ROW, SAME) == pytest.approx(0.75)


def test_recall_at_k_hand_computed() -> None:
    # Most helpful first: -3 (same), -2 (other), 1 (same), 2 (other).
    assert recall_at_k(ROW, SAME, 1) == 1.0
    assert recall_at_k(ROW, SAME, 2) == pytest.approx(0.5)
    assert recall_at_k(ROW, SAME, 3) == pytest.approx(2 / 3)
    assert recall_at_k(ROW, SAME, 4) == pytest.approx(0.5)


def test_class_metrics_direction() -> None:
    same = np.array([1] * 5 + [0] * 15, dtype=bool)
    helpful_when_same = np.where(same, -1.0, 1.0) + np.linspace(0, 0.1, 20)
    assert class_detection_auc(helpful_when_same, same) == 1.0
    assert recall_at_k(helpful_when_same, same, 5) == 1.0
    assert class_detection_auc(-helpful_when_same, same) == 0.0
    assert recall_at_k(-helpful_when_same, same, 5) == 0.0


def test_class_metric_errors() -> None:
    with pytest.raises(ConfigError, match="k must be"):
        recall_at_k(ROW, SAME, 0)
    with pytest.raises(ConfigError, match="k must be"):
        recall_at_k(ROW, SAME, 5)
    with pytest.raises(ConfigError, match="k must be"):
        recall_at_k(ROW, SAME, 1.5)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="undefined"):
        class_detection_auc(ROW, [0, 0, 0, 0])
    with pytest.raises(DatasetError, match="NaN"):
        class_detection_auc([float("inf"), 0, 1, 2], SAME)


def test_per_test_metrics_hand_computed() -> None:
    train_classes = ["a", "b", "b", "a"]
    matrix = np.array(
        [
            ROW,  # test class "a": AUC 0.75, recall@2 0.5 (see above)
            [1.0, -1.0, -2.0, 2.0],  # test class "b": both "b" examples most helpful -> 1, 1
        ]
    )
    got = per_test_metrics(matrix, ["a", "b"], train_classes)
    assert got["auc_mean"] == pytest.approx(0.875)
    assert got["auc_std"] == pytest.approx(0.125)
    assert got["recall_mean"] == pytest.approx(0.75)
    assert got["recall_std"] == pytest.approx(0.25)
    assert got["n_test"] == 2
    # A fixed k overrides the per-class default.
    assert per_test_metrics(matrix, ["a", "b"], train_classes, k=1)["recall_mean"] == 1.0


def test_per_test_metrics_direction_and_torch() -> None:
    train_classes = torch.arange(3).repeat_interleave(4)  # 12 training examples, 3 classes
    test_classes = torch.tensor([0, 1, 2, 1])
    same = test_classes[:, None] == train_classes[None, :]
    perfect = torch.where(same, -1.0, 1.0)
    got = per_test_metrics(perfect, test_classes, train_classes)
    assert got["auc_mean"] == 1.0 and got["recall_mean"] == 1.0 and got["auc_std"] == 0.0
    worst = per_test_metrics(-perfect, test_classes, train_classes)
    assert worst["auc_mean"] == 0.0 and worst["recall_mean"] == 0.0


def test_per_test_metrics_errors() -> None:
    matrix = np.zeros((2, 4))
    with pytest.raises(DatasetError, match="2 rows"):
        per_test_metrics(matrix, ["a"], ["a", "b", "b", "a"])
    with pytest.raises(DatasetError, match="4 columns"):
        per_test_metrics(matrix, ["a", "b"], ["a", "b"])
    with pytest.raises(DatasetError, match="class 'c'"):
        per_test_metrics(matrix, ["a", "c"], ["a", "b", "b", "a"])
    with pytest.raises(DatasetError, match="2-D"):
        per_test_metrics(np.zeros(4), ["a"], ["a", "b", "b", "a"])


# ---------------------------------------------------------------- correlation


def test_score_correlation_hand_computed() -> None:
    # Deviations a: [-1.5,-.5,.5,1.5], b: [-1.75,-.75,.25,2.25]; cov sum 6.5, ss_a 5, ss_b 8.75.
    got = score_correlation([1, 2, 3, 4], torch.tensor([1.0, 2.0, 3.0, 5.0]))
    assert got["pearson"] == pytest.approx(6.5 / math.sqrt(5 * 8.75))
    assert got["spearman"] == pytest.approx(1.0)
    flipped = score_correlation([1, 2, 3, 4], [4, 3, 2, 1])
    assert flipped["pearson"] == pytest.approx(-1.0) and flipped["spearman"] == pytest.approx(-1.0)


def test_score_correlation_errors() -> None:
    with pytest.raises(DatasetError, match="paired"):
        score_correlation([1, 2, 3], [1, 2])
    with pytest.raises(DatasetError, match="constant"):
        score_correlation([1, 1, 1], [1, 2, 3])
    with pytest.raises(DatasetError, match="at least 2"):
        score_correlation([1], [2])
    with pytest.raises(DataInfError, match="NaN"):
        score_correlation([1, float("nan"), 3], [1, 2, 3])
