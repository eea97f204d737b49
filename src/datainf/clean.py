"""Acting on the scores: write the dataset without its most harmful examples (or relabelled), and check.

:func:`clean_dataset` (``datainf clean``) takes a scores file and the dataset it is about and ranks
the examples by score, largest first (sign convention: positive influence = harmful; self-influence
and the training-loss baseline rank the same way, large = suspicious; pairwise scores are averaged over
their test rows). The top ``remove_top`` percent are *flagged*, then

* removed: ``<out>/<data file name>`` is the dataset without them, in the input's own format (JSONL
  lines are copied byte for byte, CSV / TSV cells as text, JSON, Parquet, or a ``save_to_disk``
  folder), or
* relabelled (``relabel=True``): each flagged example gets the class with the lowest loss under the
  fine-tuned model (:func:`datainf.relabel.suggest_labels`, ``criterion="loss"``), nothing is removed;

plus ``<out>/review.csv`` (or ``.parquet``): every flagged example's id, text, given label, suggested
label (relabel only), score, rank and action, for a person to check. ``retrain`` fine-tunes the
original recipe on the original and on the cleaned data and reports the validation loss and accuracy
of both (:class:`CleanResult`). Every file is written atomically, every check runs before the first
write, and a scores file about other examples is refused, naming ids that differ.

:func:`removal_curve` is the "what cleaning would do" experiment of the demo's report: validation
accuracy and loss after removing the top 0, 5, 10, 20 % by each ranking, each retrain cached.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from datainf.errors import ConfigError, DatasetError
from datainf.runs import RunDir, removed_on_error
from datainf.scores import Scores
from datainf.store import atomic_write_bytes, atomic_write_json
from datainf.workflows import FinetuneSettings, finetune_run

__all__ = [
    "REVIEW_FILE",
    "CleanSettings",
    "CleanResult",
    "clean_dataset",
    "harmful_order",
    "check_same_examples",
    "removal_curve",
]

logger = logging.getLogger(__name__)

#: The review table's stem inside the output folder (``review.csv`` / ``review.parquet``).
REVIEW_FILE = "review"
_SUMMARY_FILE = "clean.json"


@dataclass(frozen=True)
class CleanSettings:
    """Settings of :func:`clean_dataset` (``datainf clean``).

    Attributes:
        out: the output folder.
        scores: a scores file (``datainf score``) about the examples of ``data``.
        data: the dataset to clean (.jsonl/.json/.csv/.tsv/.parquet or a ``save_to_disk`` folder).
        text_column, label_column, id_column: the data's columns for the text, label and id
            (defaults ``text``, ``label``, ``id``; without an id column ids are row numbers).
        remove_top: percent of the examples to flag, in [0, 100) (default 10).
        relabel: relabel the flagged examples (lowest-loss class) instead of removing them; needs
            ``model`` and ``adapter``.
        model, adapter: the base model and the fine-tuned adapter (``relabel``).
        retrain: fine-tune the recipe (a ``datainf finetune`` run folder or its ``config.json``, or
            :class:`~datainf.workflows.FinetuneSettings`) on the original and the cleaned data, and
            report both models' validation metrics.
        eval_data: validation data for ``retrain`` (default: the recipe's ``eval_data``).
        review_format: ``csv`` or ``parquet``.
    """

    out: str | None = None
    scores: str | None = None
    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    id_column: str | None = None
    remove_top: float = 10.0
    relabel: bool = False
    model: str | None = None
    adapter: str | None = None
    retrain: FinetuneSettings | str | None = None
    eval_data: str | None = None
    review_format: Literal["csv", "parquet"] = "csv"


@dataclass
class CleanResult:
    """What :func:`clean_dataset` wrote.

    Attributes:
        data: the cleaned dataset (``<out>/<input name>``).
        review: the review table.
        flagged: the flagged ids, most harmful first.
        removed: ids left out (empty with ``relabel``).
        relabelled: id -> (given label, suggested label) of the flagged examples whose label changed.
        before, after: with ``retrain``: the validation metrics (``eval_loss``, ``eval_accuracy``) of
            the recipe trained on the original and on the cleaned data.
    """

    out: Path
    data: Path
    review: Path
    flagged: list[str]
    removed: list[str]
    relabelled: dict[str, tuple[str, str]] = field(default_factory=dict)
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None


def harmful_order(scores: Scores) -> list[str]:
    """The scores' training ids, most harmful (largest score) first; ties keep file order.

    Pairwise scores rank by the mean over their test rows (:meth:`~datainf.scores.Scores.top_harmful`).
    """
    return [tid for tid, _ in scores.top_harmful(len(scores.train_ids))]


def check_same_examples(scores: Scores, ids: Sequence[str], where: str) -> None:
    """Refuse scores about other examples than ``ids`` (the ids of ``where``), naming ids that differ.

    Raises:
        DatasetError: the id sets differ.
    """
    have, want = set(scores.train_ids), set(ids)
    if have != want:
        extra = [i for i in scores.train_ids if i not in want][:5]
        lacking = [i for i in ids if i not in have][:5]
        raise DatasetError(
            f"The {scores.method} scores are about other examples than {where}: ids in the scores but not the data "
            f"{extra}, in the data but not the scores {lacking} ({len(have)} vs {len(want)} ids). Pass the scores "
            "computed on this very dataset (and the same --id-column)."
        )


def _flag_count(remove_top: float, n: int) -> int:
    if isinstance(remove_top, bool) or not isinstance(remove_top, (int, float)) or not 0 <= remove_top < 100:
        raise ConfigError(f"remove_top is a percentage in [0, 100), e.g. 10; got {remove_top!r}.")
    return int(round(remove_top / 100.0 * n))


# ---------------------------------------------------------------------------------------------- reading and writing


def _format_of(path: Path) -> str:
    if path.is_dir():
        return "hf_disk"
    from datainf.data.tabular import SUPPORTED_FORMATS

    fmt = SUPPORTED_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(
            f"Cannot tell the format of {path} (suffix {path.suffix!r}); use jsonl, json, csv or parquet."
        )
    return fmt


def _relabelled_value(original: Any, name: str, class_id: int) -> Any:
    """The new label in the file's own type: an integer column keeps integers (the class id, or the name
    when names are digits), a text column gets the class name."""
    if isinstance(original, int) and not isinstance(original, bool):
        return int(name) if name.lstrip("-").isdigit() else class_id
    return name


def _write_cleaned(
    source: Path,
    target: Path,
    keep: Sequence[bool],
    new_labels: Mapping[int, tuple[str, int]],
    label_column: str,
) -> None:
    """Write the rows of ``source`` whose ``keep`` is true to ``target`` in the same format, with the
    labels of the rows in ``new_labels`` (row -> (name, class id)) replaced."""
    fmt = _format_of(source)
    if fmt == "jsonl":
        lines = [line for line in source.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
        out = []
        for row, line in enumerate(lines):
            if not keep[row]:
                continue
            if row in new_labels:
                data = json.loads(line)
                data[label_column] = _relabelled_value(data.get(label_column), *new_labels[row])
                line = json.dumps(data, ensure_ascii=False) + "\n"
            out.append(line if line.endswith("\n") else line + "\n")
        atomic_write_bytes(target, "".join(out).encode("utf-8"))
    elif fmt == "json":
        rows = json.loads(source.read_text(encoding="utf-8"))
        kept = []
        for row, data in enumerate(rows):
            if keep[row]:
                if row in new_labels:
                    data = {**data, label_column: _relabelled_value(data.get(label_column), *new_labels[row])}
                kept.append(data)
        atomic_write_bytes(target, (json.dumps(kept, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    elif fmt in ("csv", "tsv"):
        import pandas as pd

        sep = "\t" if fmt == "tsv" else ","
        frame = pd.read_csv(source, sep=sep, dtype=str, keep_default_na=False)  # every cell as the text it is
        for row, (name, _) in new_labels.items():
            frame.at[frame.index[row], label_column] = name
        atomic_write_bytes(target, frame[list(keep)].to_csv(index=False, sep=sep).encode("utf-8"))
    elif fmt == "parquet":
        import pandas as pd

        frame = pd.read_parquet(source)
        for row, (name, class_id) in new_labels.items():
            original = frame[label_column].iloc[row]
            frame.at[frame.index[row], label_column] = _relabelled_value(
                original.item() if hasattr(original, "item") else original, name, class_id
            )
        buffer = io.BytesIO()
        frame[list(keep)].to_parquet(buffer, index=False)
        atomic_write_bytes(target, buffer.getvalue())
    else:
        if new_labels:
            raise ConfigError(
                f"{source} is a saved Hugging Face dataset folder; relabelling writes JSONL, CSV or Parquet only. "
                "Export it (Dataset.to_json) and rerun, or remove the flagged examples instead of relabelling."
            )
        import datasets

        loaded = datasets.load_from_disk(str(source))
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            loaded.select([i for i, k in enumerate(keep) if k]).save_to_disk(str(tmp / "data"))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / "data", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_review(stem: Path, rows: list[dict[str, Any]], fmt: str) -> Path:
    import pandas as pd

    columns = ["rank", "id", "score", "action", "given_label", "suggested_label", "text"]
    frame = pd.DataFrame(rows, columns=columns)
    if fmt == "parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            raise ConfigError("--review-format parquet needs the pyarrow package (pip install pyarrow); use csv.")
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        path = stem.with_suffix(".parquet")
        atomic_write_bytes(path, buffer.getvalue())
        return path
    path = stem.with_suffix(".csv")
    atomic_write_bytes(path, frame.to_csv(index=False).encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------- datainf clean


def _records(settings: CleanSettings) -> list[dict[str, Any]]:
    from datainf.data.tabular import load_records

    if not settings.data:
        raise ConfigError("No data given: pass --data PATH (the dataset the scores are about).")
    columns = {
        ours: theirs
        for ours, theirs in (
            ("text", settings.text_column),
            ("label", settings.label_column),
            ("id", settings.id_column),
        )
        if theirs
    }
    return load_records(settings.data, columns=columns)


def _suggestions(settings: CleanSettings, records: list[dict[str, Any]], flagged: list[str]) -> Any:
    """Relabel suggestions (lowest loss) for the flagged ids, from the base model and the adapter."""
    from datainf.models import load_model, read_adapter_metadata
    from datainf.relabel import suggest_labels
    from datainf.tasks import SequenceClassificationConfig, SequenceClassificationTask

    if not settings.model or not settings.adapter:
        raise ConfigError(
            "--relabel asks the fine-tuned classifier for each flagged example's best label: pass --model (the base "
            "model) and --adapter (the adapter the scores were computed with)."
        )
    meta = read_adapter_metadata(settings.adapter)
    max_length = (meta.get("finetune_config") or {}).get("max_length")
    model, tokenizer = load_model(settings.model, kind="classification", adapter=settings.adapter)
    task = SequenceClassificationTask(tokenizer, SequenceClassificationConfig(max_length=max_length))
    task.setup(model)
    return suggest_labels(model, task, records, flagged, criterion="loss", batch_size=32)


def clean_dataset(settings: CleanSettings, *, overwrite: bool = False, progress: bool = True) -> CleanResult:
    """Write the dataset without its top ``remove_top`` % by score (or relabelled), a review table, and
    with ``retrain`` the validation metrics before and after (module docstring).

    Raises:
        ConfigError: no scores or data, ``remove_top`` outside [0, 100), ``relabel`` without a model and
            adapter, ``out`` holds another configuration (without ``overwrite``), or ``out`` is the
            data's own folder.
        DatasetError: the scores are about other examples (the message names ids that differ), unreadable data.
    """
    if not settings.scores:
        raise ConfigError("No scores given: pass --scores FILE (written by `datainf score`).")
    if not settings.out:
        raise ConfigError("No output folder: pass --out DIR.")
    scores = Scores.load(settings.scores)
    records = _records(settings)
    ids = [str(r["id"]) for r in records]
    check_same_examples(scores, ids, str(settings.data))
    source = Path(str(settings.data)).absolute()
    out_dir = Path(settings.out).absolute()
    if out_dir == source.parent or out_dir == source:
        raise ConfigError(f"--out {out_dir} would overwrite the input {source}; choose another folder.")
    k = _flag_count(settings.remove_top, len(ids))
    if settings.review_format not in ("csv", "parquet"):
        raise ConfigError(f"review_format must be csv or parquet, got {settings.review_format!r}.")
    recipe = _retrain_recipe(settings) if settings.retrain is not None else None
    order = harmful_order(scores)
    flagged = order[:k]
    row_values = scores.values if scores.values.ndim == 1 else scores.values.mean(dim=0)  # pairwise: the mean row
    values = dict(zip(scores.train_ids, row_values.tolist(), strict=True))
    row_of = {rid: i for i, rid in enumerate(ids)}
    label_column = settings.label_column or "label"
    by_id = {str(r["id"]): r for r in records}

    suggestions = _suggestions(settings, records, flagged) if settings.relabel and flagged else None
    keep = [True] * len(ids)
    new_labels: dict[int, tuple[str, int]] = {}
    relabelled: dict[str, tuple[str, str]] = {}
    review: list[dict[str, Any]] = []
    suggested = {s.id: s for s in suggestions.suggestions} if suggestions is not None else {}
    for rank, rid in enumerate(flagged, start=1):
        record = by_id[rid]
        row: dict[str, Any] = {
            "rank": rank,
            "id": rid,
            "score": values[rid],
            "given_label": record.get("label"),
            "suggested_label": None,
            "text": record.get("text"),
        }
        if settings.relabel:
            s = suggested[rid]
            row["suggested_label"] = s.suggested_name
            if s.suggested_name != str(record.get("label")):
                new_labels[row_of[rid]] = (s.suggested_name, s.suggested_label)
                relabelled[rid] = (str(record.get("label")), s.suggested_name)
                row["action"] = "relabelled"
            else:
                row["action"] = "kept (suggestion = given label)"
        else:
            keep[row_of[rid]] = False
            row["action"] = "removed"
        review.append(row)

    with removed_on_error(out_dir):
        run = RunDir.claim(
            out_dir,
            kind="clean",
            settings={
                "scores": str(Path(settings.scores).absolute()),
                "data": str(source),
                "remove_top": settings.remove_top,
                "relabel": settings.relabel,
                "columns": [settings.text_column, settings.label_column, settings.id_column],
                "retrain": json.loads(json.dumps(asdict(recipe), default=str)) if recipe is not None else None,
                "eval_data": recipe.eval_data if recipe is not None else None,
            },
            overwrite=overwrite,
        )
        review_path = _write_review(run.path / REVIEW_FILE, review, settings.review_format)
        cleaned = run.path / source.name
        _write_cleaned(source, cleaned, keep, new_labels, label_column)
        removed = [rid for rid in flagged if not keep[row_of[rid]]]
        logger.info(
            "Flagged %d of %d examples (top %s %%): %s.",
            k,
            len(ids),
            settings.remove_top,
            f"{len(relabelled)} relabelled" if settings.relabel else f"{len(removed)} removed",
        )
        result = CleanResult(
            out=run.path, data=cleaned, review=review_path, flagged=flagged, removed=removed, relabelled=relabelled
        )
        if recipe is not None:
            result.before = _retrained_metrics(recipe, str(source), run.path / "retrain-original", progress)
            result.after = _retrained_metrics(recipe, str(cleaned), run.path / "retrain-cleaned", progress)
        run.write_json(
            _SUMMARY_FILE,
            {
                "flagged": len(flagged),
                "removed": removed,
                "relabelled": {rid: list(pair) for rid, pair in relabelled.items()},
                "before": result.before,
                "after": result.after,
            },
        )
        return result


def _retrain_recipe(settings: CleanSettings) -> FinetuneSettings:
    """The recipe of ``retrain`` with the validation data it is judged on.

    Raises:
        ConfigError: no validation data (neither ``eval_data`` nor the recipe's).
    """
    from datainf.counterfactual import load_recipe

    assert settings.retrain is not None
    recipe = load_recipe(settings.retrain)
    eval_data = settings.eval_data or recipe.eval_data
    if not eval_data:
        raise ConfigError(
            "--retrain compares validation loss and accuracy before and after cleaning: pass --eval-data PATH "
            "(or a recipe trained with --eval-data)."
        )
    if not recipe.model:
        raise ConfigError("The retrain recipe names no base model; pass a `datainf finetune` run folder.")
    return replace(recipe, eval_data=str(Path(eval_data).absolute()), keep_best=False)


def _retrained_metrics(recipe: FinetuneSettings, data: str, out: Path, progress: bool) -> dict[str, float]:
    """Fine-tune ``recipe`` on ``data`` into ``out`` (cached), return the last epoch's validation metrics."""
    result = finetune_run(replace(recipe, out=str(out), data=data), progress=progress)
    last = result.epochs[-1] if result.epochs else {}
    return {key: float(last[key]) for key in ("eval_loss", "eval_accuracy") if key in last}


# ---------------------------------------------------------------------------------------------- the removal curve


def removal_curve(
    records: Sequence[Mapping[str, Any]],
    rankings: Mapping[str, Scores],
    shares: Sequence[float],
    evaluate: Callable[[list[dict[str, Any]]], Mapping[str, float]],
    *,
    cache: RunDir | None = None,
    baseline: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Validation metrics after removing the top ``share`` of ``records`` by each ranking.

    Args:
        records: the training records (with ``id``).
        rankings: name -> scores over those records (ranked largest first, :func:`harmful_order`).
        shares: shares to remove, in [0, 1) (e.g. ``(0.05, 0.1, 0.2)``).
        evaluate: trains on the given records and returns metrics such as ``eval_accuracy`` and ``eval_loss``.
        cache: each ``(ranking, share)``'s metrics go to ``cache/cleaning/<name>-<share>.json`` and are reused.
        baseline: the metrics with nothing removed (share 0), when already known (the model at hand).

    Returns:
        One dict per (ranking, share): ``method``, ``share``, ``removed``, and the metrics.
    """
    rows: list[dict[str, Any]] = []
    ids = [str(r["id"]) for r in records]
    for name, scores in rankings.items():
        check_same_examples(scores, ids, "the records")
        order = harmful_order(scores)
        for share in shares:
            if not 0 <= share < 1:
                raise ConfigError(f"Shares to remove lie in [0, 1), got {share}.")
            count = int(round(share * len(ids)))
            if count == 0 and baseline is not None:
                rows.append({"method": name, "share": share, "removed": 0, **baseline})
                continue
            stage = f"cleaning/{name.replace(' ', '_')}-{share:.3f}.json"
            known = cache.read_json(stage) if cache is not None else None
            if not isinstance(known, dict):
                dropped = set(order[:count])
                known = dict(evaluate([dict(r) for r in records if str(r["id"]) not in dropped]))
                if cache is not None:
                    cache.stage(stage).parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(cache.stage(stage), known, default=float)
            rows.append({"method": name, "share": share, "removed": count, **known})
            logger.info("Cleaning %s: removed %d (%.0f %%): %s", name, count, 100 * share, known)
    return rows
