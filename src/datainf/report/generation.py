"""The explain-a-generation report (docs/method.md sections 13.4-13.5).

The class-detection metrics, and each sampled generation beside its most helpful and harmful training examples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datainf.errors import ConfigError, DatasetError, EmptyInputError
from datainf.report.html import (
    _check_scores,
    _esc,
    _fmt,
    _label_name,
    _page,
    _publish,
    _record_text,
    _snippet,
)
from datainf.scores import Scores

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- generation report

_THUMB_PX = 64


def _image_array(value: Any) -> np.ndarray:
    """An image tensor/array ``(C, H, W)`` or ``(H, W)`` in [-1, 1] as ``(H, W)`` or ``(H, W, 3)`` in [0, 1]."""
    arr = np.asarray(value.detach().cpu().float() if hasattr(value, "detach") else value, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr[:3], 0, -1)
    if arr.ndim not in (2, 3):
        raise DatasetError(f"Cannot show an image of shape {arr.shape}; expected (C, H, W) or (H, W).")
    return np.clip((arr + 1.0) / 2.0, 0.0, 1.0)


def _save_thumbnail(path: Path, value: Any) -> None:
    import matplotlib.image

    arr = _image_array(value)
    matplotlib.image.imsave(path, arr, cmap="gray" if arr.ndim == 2 else None, vmin=0.0, vmax=1.0)


def _sample_test_rows(classes: Sequence[Any], count: int) -> list[int]:
    """Up to ``count`` test rows: the first test example of each class in turn, then the next ones."""
    by_class: dict[Any, list[int]] = {}
    for row, c in enumerate(classes):
        by_class.setdefault(c, []).append(row)
    picked: list[int] = []
    depth = 0
    while len(picked) < count and any(depth < len(rows) for rows in by_class.values()):
        for rows in by_class.values():
            if depth < len(rows) and len(picked) < count:
                picked.append(rows[depth])
        depth += 1
    return picked


def _generation_metric_table(metrics: Sequence[Mapping[str, Any]]) -> str:
    head = (
        "<tr><th>method</th><th>class-detection AUC (mean &plusmn; std)</th>"
        "<th>recall among most helpful (mean &plusmn; std)</th><th>test examples</th><th>seconds</th><th>notes</th></tr>"
    )
    rows = [
        f"<tr><td>{_esc(m['method'])}</td><td class='num'>{_fmt(m['auc_mean'])} &plusmn; {_fmt(m['auc_std'])}</td>"
        f"<td class='num'>{_fmt(m['recall_mean'])} &plusmn; {_fmt(m['recall_std'])}</td><td class='num'>{_fmt(m.get('n_test'))}</td>"
        f"<td class='num'>{_fmt(m.get('seconds'), 2)}</td><td>{_esc(m.get('notes', ''))}</td></tr>"
        for m in metrics
    ]
    return "<table>\n" + head + "\n" + "\n".join(rows) + "\n</table>"


def write_generation_report(
    out_dir: str | os.PathLike[str],
    result: Any,
    *,
    method: str | None = None,
    n_examples: int = 6,
    k: int = 5,
    title: str | None = None,
) -> Path:
    """Report of an explain-a-generation experiment (:class:`~datainf.explain.ExplanationResult`).

    ``index.html`` holds the per-method metric table (class-detection AUC and recall, mean and std over
    test examples), the model's quality before/after fine-tuning, and for a sample of test examples
    (one per class in turn) the prompt, the reference and the generated text or image beside its
    ``k`` most helpful (most negative influence) and ``k`` most harmful (most positive) training
    examples with their scores and classes. Images are written as PNG thumbnails.

    Args:
        out_dir: the report folder (created; other files in it are kept).
        result: an ``ExplanationResult`` with pairwise scores (rows = ``result.test``).
        method: whose scores rank the examples (default ``datainf`` when present, else the first).
        n_examples: test examples shown.
        k: helpful and harmful examples per test example.
        title: page title.

    Returns:
        Path of ``index.html``.

    Raises:
        EmptyInputError: no scores or no test records.
        ConfigError: ``method`` has no scores, the scores are not pairwise, or ``k``/``n_examples`` < 1.
    """
    _check_scores(result.scores)
    if not result.test or not result.train:
        raise EmptyInputError("The result holds no training or test records; nothing to report.")
    if k < 1 or n_examples < 1:
        raise ConfigError(f"k and n_examples must be >= 1 (got k={k}, n_examples={n_examples}).")
    chosen = method or ("datainf" if "datainf" in result.scores else next(iter(result.scores)))
    if chosen not in result.scores:
        raise ConfigError(f"No scores for method {chosen!r}; the result has {sorted(result.scores)}.")
    scores: Scores = result.scores[chosen]
    if scores.mode != "pairwise":
        raise ConfigError("The generation report needs pairwise scores (one row per test example).")
    is_image = result.task == "text-to-image"
    train_by_id = {str(r["id"]): r for r in result.train}
    test_row = {tid: j for j, tid in enumerate(scores.test_ids)}
    names = list(result.class_names)

    def class_name(record: Mapping[str, Any] | None) -> str:
        if record is None:
            return "-"
        return str(record.get("class_name") or _label_name(record.get("class"), names))

    def example_cell(record: Mapping[str, Any] | None, tid: str, thumbs: Path, stem: str) -> str:
        if is_image:
            if record is None or record.get("pixel_values") is None:
                return "<td>-</td>"
            _save_thumbnail(thumbs / f"{stem}.png", record["pixel_values"])
            return f"<td><img class='thumb' src='{stem}.png' alt='{_esc(tid)}'></td>"
        return f"<td class='text'>{_esc(_snippet(_record_text(record, 'text'), 160))}</td>"

    def build(tmp: Path) -> None:
        parts = [f"<h2>Class detection per method</h2>\n{_generation_metric_table(result.metrics)}"]
        parts.append(
            "<p class='meta'>For each test example, training examples are ranked by -influence (most helpful first); "
            "AUC measures how well that ranking separates training examples of the test example's class from the rest, "
            "and recall is the share of same-class examples among the most helpful ones (as many as the class has).</p>"
        )
        if result.quality:
            parts.append(
                "<h2>The fine-tuned model</h2><table>"
                + "".join(
                    f"<tr><th>{_esc(key)}</th><td class='num'>{_fmt(v)}</td></tr>" for key, v in result.quality.items()
                )
                + "</table>"
            )
        test_classes = [r.get("class") for r in result.test]
        rows = [j for j in _sample_test_rows(test_classes, n_examples) if str(result.test[j]["id"]) in test_row]
        parts.append(f"<h2>Training examples behind {len(rows)} test generations ({_esc(chosen)} scores)</h2>")
        for shown, j in enumerate(rows):
            record = result.test[j]
            tid = str(record["id"])
            row = test_row[tid]
            generated = result.generations.get(tid)
            parts.append(f"<h3>Test example {_esc(tid)} (class {_esc(class_name(record))})</h3>")
            parts.append(f"<p><b>Prompt:</b> <span class='text'>{_esc(record.get('prompt', ''))}</span></p>")
            if is_image:
                cells = ["<th>reference</th>", example_cell(record, tid, tmp, f"test{shown}-ref")]
                if generated is not None:
                    _save_thumbnail(tmp / f"test{shown}-gen.png", generated)
                    cells += [
                        "<th>generated</th>",
                        f"<td><img class='thumb' src='test{shown}-gen.png' alt='generated'></td>",
                    ]
                parts.append("<table><tr>" + "".join(cells) + "</tr></table>")
            else:
                parts.append(
                    f"<p><b>Reference response:</b> <span class='text'>{_esc(record.get('response', ''))}</span></p>"
                )
                if generated is not None:
                    parts.append(
                        f"<p><b>Generated after fine-tuning:</b> <span class='text'>{_esc(generated)}</span></p>"
                    )
            for label, entries in (
                ("most helpful (most negative influence)", scores.top_helpful(k, test_index=row)),
                ("most harmful (most positive influence)", scores.top_harmful(k, test_index=row)),
            ):
                body = []
                for rank, (train_id, value) in enumerate(entries, start=1):
                    rec = train_by_id.get(train_id)
                    same = rec is not None and rec.get("class") == record.get("class")
                    body.append(
                        f"<tr{' class=same' if same else ''}><td class='num'>{rank}</td><td>{_esc(train_id)}</td>"
                        f"<td>{_esc(class_name(rec))}{' (same class)' if same else ''}</td><td class='num'>{_esc(_fmt(value, 4))}</td>"
                        + example_cell(
                            rec, train_id, tmp, f"test{shown}-{'help' if 'helpful' in label else 'harm'}{rank}"
                        )
                        + "</tr>"
                    )
                parts.append(
                    f"<p>The {k} {label} training examples:</p><table><tr><th>rank</th><th>id</th><th>class</th><th>influence</th>"
                    f"<th>{'image' if is_image else 'prompt &rarr; response'}</th></tr>" + "".join(body) + "</table>"
                )
        style = (
            f"<style>img.thumb {{ width: {_THUMB_PX}px; height: {_THUMB_PX}px; image-rendering: pixelated; }} "
            "tr.same td { background: #f0fff4; }</style>\n"
        )
        heading = (
            title
            or f"DataInf: which training examples drove each {('image' if is_image else 'answer')} ({result.dataset})"
        )
        subtitle = f"{len(result.train)} training and {len(result.test)} test examples, {len(names)} classes; task {result.task}"
        (tmp / "index.html").write_text(_page(heading, style + "\n".join(parts), subtitle=subtitle), encoding="utf-8")

    path = _publish(Path(out_dir), build)
    logger.info("Wrote the generation report to %s", path)
    return path
