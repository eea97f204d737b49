"""Static HTML reports of influence scores (index.html + PNG figures, no JavaScript, no network).

Three reports:

* :func:`write_mislabel_report`: the mislabeled-data detection experiment (docs/method.md section 13.3):
  a metric table per method, the detection curve (share of flipped labels found against share of
  training examples inspected, by decreasing influence), histograms of the scores of flipped and
  clean examples, and the 10 most harmful training examples per method.
* :func:`write_scores_report`: any scores file (``datainf report``): the most harmful and most
  helpful training examples with their text, overall and, for pairwise scores, for the first few
  test examples. Self-influence scores (``mode="self"``) and the training-loss baseline
  (:mod:`datainf.baselines`) are shown like averaged scores, ranked by their own meaning (highest
  self-influence / highest loss first: the mislabel suspects).
* :func:`write_generation_report`: an explain-a-generation experiment (docs/method.md sections 13.4-13.5): the
  class-detection metrics, and for sampled test prompts the generated text or image beside the
  most helpful and most harmful training examples.

Every page states the sign convention: **positive influence = harmful** (up-weighting the example
raises the test loss). Files are built in a temporary folder next to ``out_dir`` and moved into
place one by one, ``index.html`` last, so a reader never sees a page pointing at missing figures and
other files already in ``out_dir`` are left alone.
"""

from __future__ import annotations

import html
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from datainf.errors import ConfigError, DatasetError, EmptyInputError
from datainf.scores import LOSS_METHOD, SIGN_CONVENTION, Scores

if TYPE_CHECKING:
    from torch import nn

    from datainf.tasks import GradientTask

__all__ = [
    "write_mislabel_report",
    "write_scores_report",
    "write_generation_report",
    "SIGN_NOTE",
    "Prediction",
    "predict_labels",
    "listed_ids",
    "cleaning_section",
]

logger = logging.getLogger(__name__)

#: The sentence every report page carries.
SIGN_NOTE = f"Sign convention: {SIGN_CONVENTION}. Libraries such as dattri and pyDVL report the opposite sign (-I)."

_TEXT_CHARS = 200
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flipped td { background: #fff1f0; }
.sign { background: #fffbe6; border: 1px solid #e6d690; padding: 0.5em 0.8em; }
.text { max-width: 620px; font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #ddd; }
.meta { color: #666; font-size: 0.85em; }
"""


# ---------------------------------------------------------------------------------------------- helpers


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{digits}e}"
        return f"{v:.{digits}f}"
    return str(value)


def _snippet(text: Any, limit: int = _TEXT_CHARS) -> str:
    s = "" if text is None else " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"


def _record_text(record: Mapping[str, Any] | None, text_field: str) -> str:
    """The text shown for a record: ``text_field``, else ``prompt -> response``."""
    if record is None:
        return "(not in the data)"
    if record.get(text_field) is not None:
        return str(record[text_field])
    prompt, response = record.get("prompt"), record.get("response")
    if prompt is not None or response is not None:
        return f"{prompt or ''} \u2192 {response or ''}"
    return ""


def _label_name(value: Any, label_names: Sequence[str] | None) -> str:
    if value is None:
        return "-"
    is_index = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if label_names is not None and is_index and 0 <= int(value) < len(label_names):
        return str(label_names[int(value)])
    return str(value)


def _page(title: str, body: str, *, subtitle: str = "") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n"
        + (f"<p class='meta'>{_esc(subtitle)}</p>\n" if subtitle else "")
        + f"<p class='sign'><b>{_esc(SIGN_NOTE)}</b></p>\n"
        + body
        + f"\n<p class='meta'>Written by datainf on {stamp}.</p>\n</body>\n</html>\n"
    )


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _publish(out_dir: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a fresh temporary folder, then move its files into ``out_dir``
    (``index.html`` last). The temporary folder is removed whatever happens."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; the report needs a folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    from datainf.store import file_mode

    tmp.chmod(file_mode(folder=True))  # mkdtemp makes it private; the folder it becomes follows the umask
    try:
        build(tmp)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
        else:
            files = sorted((p for p in tmp.iterdir()), key=lambda p: p.name == "index.html")
            for file in files:
                os.replace(file, out_dir / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "index.html"


def _values_by_id(scores: Scores) -> dict[str, float]:
    row = scores.values if scores.mode in ("average", "self") else scores.values.mean(dim=0)
    return {tid: float(v) for tid, v in zip(scores.train_ids, row.tolist())}


def _is_loss(scores: Scores) -> bool:
    return scores.method == LOSS_METHOD and scores.mode == "self"


def _value_name(scores: Scores) -> str:
    """What a score of ``scores`` is, for an axis or a column: influence, self-influence or training loss."""
    if _is_loss(scores):
        return "training loss"
    return "self-influence" if scores.mode == "self" else "influence"


def _axis_label(scores: Scores) -> str:
    if _is_loss(scores):
        return "training loss (high = suspicious)"
    if scores.mode == "self":
        return "self-influence (large = suspicious)"
    return "influence (positive = harmful)"


def _check_scores(scores: Mapping[str, Scores]) -> None:
    if not scores:
        raise EmptyInputError("No scores to report: pass at least one method's Scores.")
    for name, s in scores.items():
        if not isinstance(s, Scores):
            raise ConfigError(f"scores[{name!r}] is a {type(s).__name__}, not a datainf Scores object.")


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


# ---------------------------------------------------------------------------------------------- what cleaning would do


def cleaning_section(folder: Path, rows: Sequence[Mapping[str, Any]]) -> str:
    """The "what cleaning would do" section: validation accuracy (and loss) against the share of the
    training set removed, most harmful first, per ranking; writes ``cleaning.png`` into ``folder``.

    Args:
        folder: where the figure goes (the report's folder being built).
        rows: one dict per (ranking, share): ``method``, ``share`` (in [0, 1)), ``removed`` (examples),
            ``eval_accuracy``, ``eval_loss`` (from :func:`datainf.clean.removal_curve`).

    Returns:
        The section's HTML.
    """
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(str(row["method"]), []).append(row)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=110)
    for name, points in by_method.items():
        points = sorted(points, key=lambda r: float(r["share"]))
        shares = [100 * float(r["share"]) for r in points]
        for ax, key in zip(axes, ("eval_accuracy", "eval_loss"), strict=True):
            ax.plot(shares, [float(r.get(key, math.nan)) for r in points], marker="o", label=name)
    for ax, label in zip(axes, ("validation accuracy", "validation loss"), strict=True):
        ax.set_xlabel("% of training examples removed (highest score first)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("What cleaning would do: retrained on the rest, same recipe and seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "cleaning.png")
    plt.close(fig)
    cells = "".join(
        f"<tr><td>{_esc(r['method'])}</td><td class='num'>{100 * float(r['share']):.0f} %</td>"
        f"<td class='num'>{_esc(r.get('removed'))}</td><td class='num'>{_esc(_fmt(r.get('eval_accuracy')))}</td>"
        f"<td class='num'>{_esc(_fmt(r.get('eval_loss')))}</td></tr>\n"
        for r in rows
    )
    return (
        "<h2>What cleaning would do</h2>\n<p>The fine-tune retrained on the training set without its most "
        "suspicious examples (by each ranking: highest influence, or highest loss, first), judged on the validation "
        "set. 0 % is the model the scores explain.</p>\n<img src='cleaning.png' alt='validation accuracy and loss "
        "against the share of training examples removed'>\n<table>\n<tr><th>ranking</th><th>removed</th>"
        "<th>examples</th><th>validation accuracy</th><th>validation loss</th></tr>\n" + cells + "</table>"
    )
