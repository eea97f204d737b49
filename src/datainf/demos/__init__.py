"""The demos behind ``datainf demo``: ready-made runs on packaged data and models.

* :mod:`datainf.demos.mislabel` (``--task mislabel``, the default): find mislabeled BBC News articles
  with DataInf and its baselines (:func:`run_mislabel_demo`);
* :mod:`datainf.demos.explain` (``--task text-generation|text-to-image``): the paper's
  explain-a-generation experiments, which training examples drove a generated answer or image
  (:func:`run_generation_demo`).
"""

from __future__ import annotations

from datainf.demos.explain import DATASETS, main_generation_demo, run_generation_demo
from datainf.demos.mislabel import MislabelDemoConfig, MislabelDemoResult, format_table, main_demo, run_mislabel_demo

__all__ = [
    "main_demo",
    "MislabelDemoConfig",
    "MislabelDemoResult",
    "run_mislabel_demo",
    "format_table",
    "DATASETS",
    "run_generation_demo",
    "main_generation_demo",
]
