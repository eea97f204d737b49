"""The report run (``datainf report``): an HTML page of the most harmful / helpful examples."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datainf.errors import ConfigError, DatasetError
from datainf.runs import RunDir, removed_on_error
from datainf.scores import Scores
from datainf.workflows.settings import (
    GradientsSettings,
    ReportRunResult,
    ReportSettings,
    _saved,
)
from datainf.workflows.steps import (
    _adapter_meta,
    _column_map,
    _model_and_task,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- report


def report_run(settings: ReportSettings, *, overwrite: bool = False) -> ReportRunResult:
    """An HTML report (``<out>/index.html``) of the most harmful / helpful training examples.

    Raises:
        ConfigError: no scores or data given, a scores file is missing, ``<out>`` holds another
            configuration (without ``overwrite``).
        DatasetError: none of the scores' training ids is in ``settings.data``.
    """
    from datainf.data.tabular import load_records
    from datainf.report import write_scores_report

    with removed_on_error(settings.out):
        files = settings.scores or ()
        if not files:
            raise ConfigError("Pass --scores FILE (a scores-<method>.safetensors written by `datainf score`).")
        if not settings.data:
            raise ConfigError("Pass --data PATH: the training data the scores are about (to show the texts).")
        loaded: dict[str, Scores] = {}
        for file in files:
            if not Path(file).is_file():
                raise ConfigError(f"Scores file {file} does not exist.")
            scores = Scores.load(file)
            key = scores.method if scores.method not in loaded else f"{scores.method} ({Path(file).name})"
            loaded[key] = scores
        records = load_records(settings.data, columns=_column_map(settings))
        test_records = load_records(settings.test_data, columns=_column_map(settings)) if settings.test_data else None
        ids = {str(r["id"]) for r in records}
        for name, scores in loaded.items():
            missing = [t for t in scores.train_ids if t not in ids]
            if len(missing) == len(scores.train_ids):
                raise DatasetError(
                    f"None of the {len(missing)} training ids of the {name} scores (e.g. {missing[:3]}) is in {settings.data}; "
                    "pass the training data the scores were computed on (and the same --id-column)."
                )
        run = RunDir.claim(settings.out, kind="report", settings=_saved_report(settings), overwrite=overwrite)
        predictions = _report_predictions(settings, loaded, records) if settings.model or settings.adapter else None
        path = write_scores_report(
            run.path,
            loaded,
            records,
            k=settings.k,
            test_records=test_records,
            max_test_examples=settings.max_test,
            predictions=predictions,
        )
        return ReportRunResult(out=run.path, path=path)


def _saved_report(settings: ReportSettings) -> dict[str, Any]:
    """:class:`ReportSettings` as ``config.json`` holds them: the model options only when given, so report
    folders written before they existed still match."""
    saved = _saved(settings)
    if saved.get("model") is None and saved.get("adapter") is None:
        for key in ("model", "adapter", "device"):
            saved.pop(key, None)
    return saved


def _report_predictions(
    settings: ReportSettings, scores: Mapping[str, Scores], records: list[dict[str, Any]]
) -> dict[str, Any]:
    """The classifier's predicted label and confidence of every training example the report lists."""
    from datainf.data.labels import LabelEncoder
    from datainf.report import listed_ids, predict_labels

    if not settings.model or not settings.adapter:
        raise ConfigError("Predicted labels need both --model (the base model) and --adapter (the fine-tuned adapter).")
    model_settings = GradientsSettings(
        model=settings.model,
        adapter=settings.adapter,
        device=settings.device,
        text_column=settings.text_column,
        label_column=settings.label_column,
        id_column=settings.id_column,
    )
    meta = _adapter_meta(model_settings)
    if (meta.get("kind") or "classification") != "classification":
        raise ConfigError(
            f"Predicted labels are shown for classification adapters; {settings.adapter} is a {meta.get('kind')} "
            "adapter. Drop --model / --adapter."
        )
    wanted = set(listed_ids(scores, settings.k, settings.max_test))
    rows = [r for r in records if str(r["id"]) in wanted]
    model, task, encoded = _model_and_task(model_settings, {"data": rows})
    names = LabelEncoder.from_model(model, meta).names
    return predict_labels(model, task, encoded["data"], label_names=names)
