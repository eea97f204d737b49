"""The report of any scores file (``datainf report``).

The most harmful and most helpful training examples, with their text and predicted labels.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from datainf.errors import ConfigError, EmptyInputError
from datainf.scores import Scores

if TYPE_CHECKING:
    from torch import nn

    from datainf.tasks import GradientTask

from datainf.report.html import (
    _axis_label,
    _check_scores,
    _esc,
    _fmt,
    _is_loss,
    _page,
    _plt,
    _publish,
    _record_text,
    _snippet,
    _value_name,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- predictions


class Prediction(NamedTuple):
    """The fine-tuned classifier's answer for one training example: its most likely class and the
    softmax probability of that class (in ``[1/C, 1]``)."""

    label: str
    confidence: float


def predict_labels(
    model: nn.Module,
    task: GradientTask,
    records: Sequence[Mapping[str, Any]],
    *,
    label_names: Sequence[str] | None = None,
    batch_size: int = 16,
) -> dict[str, Prediction]:
    """One forward pass (no gradients, eval mode) of a sequence classifier over ``records``.

    Args:
        model: the fine-tuned classifier (its output's ``logits`` are ``(b, C)``).
        task: its :class:`~datainf.tasks.SequenceClassificationTask` (collates the records).
        records: the examples to predict (``id``, ``text`` and the task's other fields).
        label_names: class names in class-id order (``None``: class ids as strings).
        batch_size: examples per forward pass.

    Returns:
        id -> :class:`Prediction` (``argmax`` class of ``softmax(logits)`` and its probability).

    Raises:
        ConfigError: the model's output has no ``(b, C)`` logits (not a classifier).
    """
    import torch

    ids = [str(r.get("id", i)) for i, r in enumerate(records)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    out: dict[str, Prediction] = {}
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                batch = task.collate(list(records[start : start + batch_size]), ids[start : start + batch_size])
                inputs = {k: v for k, v in batch.to(device).inputs.items() if k != "labels"}
                logits = getattr(model(**inputs), "logits", None)
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise ConfigError(
                        "Predicted labels need a sequence classifier (logits of shape (b, C)); this model returns "
                        f"{type(logits).__name__}. Drop --model / --adapter from the report of this task."
                    )
                probs = torch.softmax(logits.double(), dim=-1)
                confidence, label = probs.max(dim=-1)
                for tid, c, y in zip(batch.ids, confidence.tolist(), label.tolist()):
                    name = str(label_names[y]) if label_names is not None and y < len(label_names) else str(y)
                    out[tid] = Prediction(name, float(c))
    finally:
        model.train(was_training)
    return out


def listed_ids(scores: Scores | Mapping[str, Scores], k: int = 10, max_test_examples: int = 5) -> list[str]:
    """Every training id :func:`write_scores_report` lists (top ``k`` harmful and helpful per method, and
    per shown test example in pairwise mode), in first-listed order: what predictions are needed for."""
    if isinstance(scores, Scores):
        scores = {scores.method: scores}
    seen: dict[str, None] = {}
    for s in scores.values():
        entries = [*s.top_harmful(k), *s.top_helpful(k)]
        if s.mode == "pairwise":
            for j in range(min(max_test_examples, len(s.test_ids))):
                entries += [*s.top_helpful(k, test_index=j), *s.top_harmful(k, test_index=j)]
        seen.update((tid, None) for tid, _ in entries)
    return list(seen)


# ---------------------------------------------------------------------------------------------- generic report


def _ranked_table(
    entries: Sequence[tuple[str, float]],
    by_id: Mapping[str, Mapping[str, Any]],
    text_field: str,
    label_field: str | None,
    value_name: str = "influence",
    predictions: Mapping[str, Prediction] | None = None,
) -> str:
    has_label = label_field is not None and any(label_field in by_id.get(tid, {}) for tid, _ in entries)
    has_prediction = predictions is not None and any(tid in predictions for tid, _ in entries)
    head = (
        "<tr><th>rank</th><th>id</th>"
        + ("<th>label</th>" if has_label else "")
        + ("<th>predicted</th><th>confidence</th>" if has_prediction else "")
        + f"<th>{_esc(value_name)}</th><th>text</th></tr>"
    )
    rows = []
    for rank, (tid, value) in enumerate(entries, start=1):
        rec = by_id.get(tid)
        label = f"<td>{_esc((rec or {}).get(label_field))}</td>" if has_label and label_field else ""
        if has_prediction and predictions is not None:
            guess = predictions.get(tid)
            label += (
                f"<td>{_esc(guess.label)}</td><td class='num'>{_esc(_fmt(guess.confidence, 3))}</td>"
                if guess is not None
                else "<td></td><td></td>"
            )
        rows.append(
            f"<tr><td class='num'>{rank}</td><td>{_esc(tid)}</td>{label}"
            f"<td class='num'>{_esc(_fmt(value, 4))}</td><td class='text'>{_esc(_snippet(_record_text(rec, text_field)))}</td></tr>"
        )
    return "<table>\n" + head + "\n" + "\n".join(rows) + "\n</table>"


def _score_histogram_png(path: Path, scores: Mapping[str, Scores]) -> None:
    """One histogram panel per method (their scales differ by orders of magnitude), each clipped to
    its 0.5-99.5 percentile range (clipped values land in the edge bins)."""
    plt = _plt()
    n = len(scores)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, (name, s) in zip(axes.flat, scores.items()):
        values = np.asarray(s.values.reshape(-1).tolist(), dtype=np.float64)
        lo, hi = float(np.percentile(values, 0.5)), float(np.percentile(values, 99.5))
        hi = hi if hi > lo else lo + 1.0
        ax.hist(np.clip(values, lo, hi), bins=np.linspace(lo, hi, 41), alpha=0.7)
        if s.mode != "self" and lo < 0.0 < hi:
            ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(
            _axis_label(s) if s.mode == "self" else "influence (positive = harmful, negative = helpful)", fontsize=8
        )
        ax.set_ylabel("count", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _overall_headings(scores: Scores) -> tuple[str, str, str]:
    """The meta line's test-set part and the headings of the two overall lists of ``scores``."""
    if _is_loss(scores):
        return (
            "no test set (the training-loss baseline: each example's own loss under the fine-tuned model)",
            "Highest training loss (the model does not fit the label: mislabel suspects first)",
            "Lowest training loss",
        )
    if scores.mode == "self":
        return (
            "no test set (self-influence: each example's influence on its own loss)",
            "Highest self-influence (least explained by the rest of the data: mislabel suspects first)",
            "Lowest self-influence (best explained by the rest of the data)",
        )
    overall = "on the mean test loss" if scores.mode == "average" else "averaged over all test examples"
    return (
        f"{len(scores.test_ids)} test examples",
        f"Most harmful training examples {overall} (largest influence)",
        f"Most helpful training examples {overall} (smallest influence)",
    )


def write_scores_report(
    out_dir: str | os.PathLike[str],
    scores: Scores | Mapping[str, Scores],
    records: Sequence[Mapping[str, Any]],
    *,
    text_field: str = "text",
    k: int = 10,
    test_records: Sequence[Mapping[str, Any]] | None = None,
    max_test_examples: int = 5,
    label_field: str | None = "label",
    title: str = "DataInf influence scores",
    predictions: Mapping[str, Prediction] | None = None,
) -> Path:
    """Write a report of the most harmful and most helpful training examples: ``index.html`` and
    ``score_histogram.png``.

    Args:
        out_dir: the report folder (created; other files in it are kept).
        scores: one :class:`~datainf.scores.Scores`, or method name -> Scores: ``average`` or
            ``pairwise`` influence, ``self`` influence, or the training-loss baseline.
        records: the training records (``id`` plus ``text_field``, or ``prompt``/``response``).
        text_field: record field shown as the example's text (first 200 characters, HTML-escaped).
        k: examples per list.
        test_records: the test records, to show the text of each test example in pairwise mode.
        max_test_examples: pairwise mode: how many test examples (the first ones) get their own lists.
        label_field: record field shown as a label column when present (``None``: none).
        title: page title.
        predictions: training id -> the fine-tuned classifier's :class:`Prediction`
            (:func:`predict_labels` of the :func:`listed_ids`): every list gains a ``predicted`` and
            a ``confidence`` (softmax probability) column.

    Returns:
        Path of ``index.html``.

    Raises:
        EmptyInputError: no scores or no records.
        ConfigError: ``k`` or ``max_test_examples`` < 1.
    """
    if isinstance(scores, Scores):
        scores = {scores.method: scores}
    _check_scores(scores)
    if not records:
        raise EmptyInputError("No training records: pass the training data the scores were computed on.")
    if k < 1 or max_test_examples < 1:
        raise ConfigError(f"k and max_test_examples must be >= 1 (got k={k}, max_test_examples={max_test_examples}).")
    by_id = {str(r["id"]): r for r in records}
    test_by_id = {str(r["id"]): r for r in (test_records or [])}
    for name, s in scores.items():
        unknown = [t for t in s.train_ids if t not in by_id]
        if unknown:
            logger.warning(
                "%d training id(s) of the %s scores are not in the records (e.g. %s); their text is not shown.",
                len(unknown),
                name,
                unknown[:3],
            )

    def build(tmp: Path) -> None:
        _score_histogram_png(tmp / "score_histogram.png", scores)
        parts: list[str] = []
        if predictions:
            parts.append(
                "<p class='meta'>predicted, confidence: the fine-tuned model's most likely class for the example and "
                "its softmax probability (a given label the model does not predict with high confidence is a "
                "mislabel suspect).</p>"
            )
        for name, s in scores.items():
            opts = s.settings.get("method_options")
            test_part, harmful, helpful = _overall_headings(s)
            details = "" if _is_loss(s) else f", damping {_esc(s.settings.get('damping'))}"
            if s.settings.get("normalize"):
                details += ", unit-normalised gradients (ranks by gradient direction)"
            parts.append(
                f"<h2>{_esc(name)}</h2>\n<p class='meta'>mode {_esc(s.mode)}, {len(s.train_ids)} training examples, "
                f"{_esc(test_part)}{details}" + (f", options {_esc(opts)}" if opts else "") + "</p>"
            )
            value_name = _value_name(s)
            parts.append(f"<h3>{_esc(harmful)}</h3>")
            parts.append(_ranked_table(s.top_harmful(k), by_id, text_field, label_field, value_name, predictions))
            parts.append(f"<h3>{_esc(helpful)}</h3>")
            parts.append(_ranked_table(s.top_helpful(k), by_id, text_field, label_field, value_name, predictions))
            if s.mode == "pairwise":
                shown = min(max_test_examples, len(s.test_ids))
                parts.append(f"<h3>Per test example (first {shown} of {len(s.test_ids)})</h3>")
                for j in range(shown):
                    tid = s.test_ids[j]
                    test_text = _record_text(test_by_id.get(tid), text_field) if test_by_id else ""
                    parts.append(
                        f"<h4>Test example {_esc(tid)}</h4>"
                        + (f"<p class='text'>{_esc(_snippet(test_text, 400))}</p>" if test_text else "")
                        + "<p>Most helpful (smallest influence):</p>"
                        + _ranked_table(
                            s.top_helpful(k, test_index=j), by_id, text_field, label_field, predictions=predictions
                        )
                        + "<p>Most harmful (largest influence):</p>"
                        + _ranked_table(
                            s.top_harmful(k, test_index=j), by_id, text_field, label_field, predictions=predictions
                        )
                    )
        parts.append(
            "<h2>Distribution of the scores</h2><img src='score_histogram.png' alt='histogram of influence scores'>"
            "<p class='meta'>One panel per method; each axis is clipped to that method's 0.5-99.5 percentile range "
            "(values beyond it are counted in the edge bins).</p>"
        )
        (tmp / "index.html").write_text(_page(title, "\n".join(parts)), encoding="utf-8")

    path = _publish(Path(out_dir), build)
    logger.info("Wrote the scores report to %s", path)
    return path
