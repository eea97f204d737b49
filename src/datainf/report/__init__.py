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

from datainf.report.cleaning import cleaning_section
from datainf.report.generation import write_generation_report
from datainf.report.html import SIGN_NOTE
from datainf.report.mislabel import write_mislabel_report
from datainf.report.scores import Prediction, listed_ids, predict_labels, write_scores_report

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
