"""The mislabeled-data detection report (docs/method.md section 13.3).

A metric table per method, the detection curve, histograms of the scores and the top examples.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datainf.errors import DatasetError, EmptyInputError
from datainf.report.cleaning import cleaning_section
from datainf.report.html import (
    _axis_label,
    _check_scores,
    _esc,
    _fmt,
    _label_name,
    _page,
    _plt,
    _publish,
    _record_text,
    _snippet,
    _value_name,
    _values_by_id,
)
from datainf.scores import Scores

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- mislabel report


def _metric_table(table: Sequence[Mapping[str, Any]]) -> str:
    columns = [
        ("method", "method"),
        ("auc", "AUC (flipped vs clean)"),
        ("found_at_10", "flipped found in top 10 %"),
        ("found_at_20", "flipped found in top 20 %"),
        ("seconds", "seconds"),
        ("notes", "notes"),
    ]
    extra = [k for row in table for k in row if k not in {c for c, _ in columns}]
    extra = list(dict.fromkeys(extra))
    header = "".join(f"<th>{_esc(title)}</th>" for _, title in columns) + "".join(f"<th>{_esc(k)}</th>" for k in extra)
    rows = []
    for row in table:
        cells = []
        for key in [c for c, _ in columns] + extra:
            value = row.get(key)
            cls = " class='num'" if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else ""
            cells.append(f"<td{cls}>{_esc(_fmt(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<tr>{header}</tr>\n" + "\n".join(rows) + "\n</table>\n"


def _aligned(scores: Scores, ids: Sequence[str], method: str) -> np.ndarray:
    by_id = _values_by_id(scores)
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DatasetError(
            f"The {method} scores have no value for {len(missing)} training record(s), e.g. ids {missing[:5]}; the "
            "scores and the records must describe the same training set."
        )
    return np.array([by_id[i] for i in ids], dtype=np.float64)


def _detection_curve_png(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], flipped_share: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.5), dpi=110)
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name, linewidth=1.6)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="random order")
    if 0 < flipped_share < 1:
        ax.plot([0, flipped_share, 1], [0, 1, 1], linestyle="--", color="black", linewidth=0.8, label="perfect")
    ax.set_xlabel("share of training examples inspected (largest influence first)")
    ax.set_ylabel("share of flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Mislabeled-data detection (positive influence = harmful)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _histograms_png(
    path: Path, data: Mapping[str, tuple[np.ndarray, np.ndarray]], axis_labels: Mapping[str, str] | None = None
) -> None:
    plt = _plt()
    n = len(data)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), dpi=100, squeeze=False)
    for ax, (name, (clean, flipped)) in zip(axes.flat, data.items()):
        both = np.concatenate([clean, flipped])
        # heavy tails (e.g. a diverging LiSSA) would squash everything into one bin: clip to the
        # 0.5-99.5 percentile range; clipped values land in the edge bins
        lo, hi = (float(np.percentile(both, 0.5)), float(np.percentile(both, 99.5))) if both.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        bins = np.linspace(lo, hi, 31)
        ax.hist(np.clip(clean, lo, hi), bins=bins, alpha=0.6, label=f"clean ({len(clean)})", color="tab:blue")
        ax.hist(np.clip(flipped, lo, hi), bins=bins, alpha=0.6, label=f"flipped ({len(flipped)})", color="tab:red")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel((axis_labels or {}).get(name, "influence (positive = harmful)"), fontsize=8)
        ax.set_ylabel("training examples", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_mislabel_report(
    out_dir: str | os.PathLike[str],
    *,
    table: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Scores],
    records: Sequence[Mapping[str, Any]],
    label_names: Sequence[str] | None = None,
    title: str = "DataInf: mislabeled-data detection",
    k: int = 10,
    cleaning: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write the mislabeled-data detection report: ``index.html``, ``detection_curve.png``,
    ``score_histograms.png``.

    Args:
        out_dir: the report folder (created; other files in it are kept, the report's are replaced).
        table: one dict per method with ``method``, ``auc``, ``found_at_10``, ``found_at_20``
            (shares in [0, 1]), ``seconds``, ``notes``; further keys become extra columns.
        scores: method name -> averaged :class:`~datainf.scores.Scores` over the training set;
            self-influence scores (``mode="self"``) and the training-loss baseline
            (:func:`datainf.baselines.loss_scores`) are welcome too: each one is drawn on the
            detection curve, gets a histogram and a top-``k`` list, ranked largest first.
        records: the training records: ``id``, ``text``, ``label`` (the given, possibly flipped,
            label), ``true_label``, ``is_flipped``. Labels may be class indices into
            ``label_names`` or names.
        label_names: class names, index = class id.
        title: page title.
        k: how many of the most harmful training examples to list per method.
        cleaning: rows of :func:`datainf.clean.removal_curve` (``method``, ``share``, ``removed``,
            ``eval_accuracy``, ``eval_loss``): adds the "what cleaning would do" section
            (:func:`cleaning_section`).

    Returns:
        Path of ``index.html``.

    Raises:
        EmptyInputError: no scores or no records.
        DatasetError: a record lacks ``is_flipped``, no label is flipped, or the scores miss records.
    """
    from datainf.evaluation import detection_curve

    _check_scores(scores)
    if not records:
        raise EmptyInputError("No training records to report on.")
    ids = [str(r["id"]) for r in records]
    if any("is_flipped" not in r for r in records):
        raise DatasetError("Every training record needs an 'is_flipped' field for the mislabel report.")
    flipped = np.array([bool(r["is_flipped"]) for r in records])
    by_id = {str(r["id"]): r for r in records}

    aligned = {name: _aligned(s, ids, name) for name, s in scores.items()}
    curves = {name: detection_curve(values, flipped) for name, values in aligned.items()}
    hists = {name: (values[~flipped], values[flipped]) for name, values in aligned.items()}
    axis_labels = {name: _axis_label(s) for name, s in scores.items()}

    def build(tmp: Path) -> None:
        _detection_curve_png(tmp / "detection_curve.png", curves, float(flipped.mean()))
        _histograms_png(tmp / "score_histograms.png", hists, axis_labels)
        parts = [
            f"<p>{len(records)} training examples, {int(flipped.sum())} with a flipped label "
            f"({100 * flipped.mean():.1f} %). Methods rank training examples by influence on the validation loss "
            "(self-influence variants: on the example's own loss; the training-loss baseline: by the loss itself); "
            "a good method puts the flipped examples first (largest, most harmful influence).</p>",
            "<h2>Metrics</h2>",
            _metric_table(table),
            "<p class='meta'>AUC: ROC AUC of the influence against the flipped indicator (0.5 = chance). "
            "Top 10 % / 20 %: share of all flipped labels among the 10 % / 20 % most harmful examples.</p>",
            "<h2>Detection curve</h2>",
            "<img src='detection_curve.png' alt='share of flipped labels found against share inspected'>",
            "<h2>Score distributions: flipped vs clean</h2>",
            "<img src='score_histograms.png' alt='histograms of influence scores'>",
            f"<h2>The {k} most harmful training examples (highest score first)</h2>",
        ]
        for name, s in scores.items():
            top = s.top_harmful(k)
            rows = []
            for rank, (tid, value) in enumerate(top, start=1):
                rec = by_id.get(tid, {})
                cls = " class='flipped'" if rec.get("is_flipped") else ""
                rows.append(
                    f"<tr{cls}><td class='num'>{rank}</td><td>{_esc(tid)}</td>"
                    f"<td>{_esc(_label_name(rec.get('label'), label_names))}</td>"
                    f"<td>{_esc(_label_name(rec.get('true_label'), label_names))}</td>"
                    f"<td>{'yes' if rec.get('is_flipped') else 'no'}</td>"
                    f"<td class='num'>{_esc(_fmt(value, 4))}</td>"
                    f"<td class='text'>{_esc(_snippet(_record_text(rec or None, 'text')))}</td></tr>"
                )
            found = sum(1 for tid, _ in top if by_id.get(tid, {}).get("is_flipped"))
            parts.append(
                f"<h3>{_esc(name)} ({found} of {len(top)} flipped)</h3>\n<table>\n<tr><th>rank</th><th>id</th>"
                f"<th>given label</th><th>true label</th><th>flipped</th><th>{_esc(_value_name(s))}</th>"
                "<th>text (first 200 characters)</th></tr>\n" + "\n".join(rows) + "\n</table>"
            )
        if cleaning:
            parts.append(cleaning_section(tmp, cleaning))
        (tmp / "index.html").write_text(_page(title, "\n".join(parts)), encoding="utf-8")

    path = _publish(Path(out_dir), build)
    logger.info("Wrote the mislabel report to %s", path)
    return path
