"""Whole runs into an output folder: fine-tune, gradients, scores, report (what each ``datainf`` command does).

Each function takes a settings dataclass (the same settings as the command line's flags, with the
same defaults) and writes into ``settings.out``, a :class:`~datainf.runs.RunDir`: the resolved
settings go to ``<out>/config.json``; a folder holding results of a *different* configuration is
refused with a :class:`~datainf.errors.ConfigError` unless ``overwrite=True``; rerunning the same
configuration resumes (finished outputs are kept, gradient stores continue where they stopped). A
run that fails on bad input leaves no claimed-but-empty folder behind.

=========================  =====================================================================
:func:`finetune_run`       LoRA fine-tuning -> ``<out>/adapter``
:func:`gradients_run`      per-example LoRA gradients -> the gradient store ``<out>``
:func:`score_run`          influence scores -> ``<out>/scores-<method>.safetensors`` + a table
:func:`report_run`         an HTML report of the most harmful / helpful examples -> ``<out>/index.html``
=========================  =====================================================================

Example::

    from datainf.workflows import ScoreSettings, score_run

    result = score_run(ScoreSettings(out="runs/s", train_grads="runs/g-train", test_grads="runs/g-test"))
    result.scores["datainf"].top_harmful(5)

Under ``torchrun`` every rank calls the same function with the same settings (checked): each rank
computes a share of the gradients and of every sum, rank 0 alone writes ``<out>``. Every rank
returns the same result.

Sign convention of every score: positive influence = harmful (raises the test loss).
"""

from __future__ import annotations

from datainf.workflows.report import report_run
from datainf.workflows.score import score_run
from datainf.workflows.settings import (
    FinetuneRunResult,
    FinetuneSettings,
    GradientsRunResult,
    GradientsSettings,
    MethodScores,
    ReportRunResult,
    ReportSettings,
    ScoreRunResult,
    ScoreSettings,
    settings_from_mapping,
)
from datainf.workflows.train import finetune_run, gradients_run

__all__ = [
    "FinetuneSettings",
    "GradientsSettings",
    "ScoreSettings",
    "ReportSettings",
    "FinetuneRunResult",
    "GradientsRunResult",
    "MethodScores",
    "ScoreRunResult",
    "ReportRunResult",
    "finetune_run",
    "gradients_run",
    "score_run",
    "report_run",
    "settings_from_mapping",
]
