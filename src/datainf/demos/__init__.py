"""The demos behind ``datainf demo``: ready-made runs on packaged data and models.

* :mod:`datainf.demos.mislabel` (``--task mislabel``, the default): find mislabeled BBC News articles
  with DataInf and its baselines (:func:`run_mislabel_demo`);
* :mod:`datainf.demos.explain` (``--task text-generation|text-to-image``): the paper's
  explain-a-generation experiments, which training examples drove a generated answer or image
  (:func:`run_generation_demo`).

Each caches its artefacts in a :class:`~datainf.runs.RunDir` named after its configuration and reuses
them on a rerun (``recompute=True`` / ``--recompute`` starts over).
"""

from __future__ import annotations

import argparse

from datainf.demos.explain import DATASETS, main_generation_demo, run_generation_demo
from datainf.demos.mislabel import (
    MislabelDemoConfig,
    MislabelDemoResult,
    format_table,
    main_mislabel_demo,
    mislabel_cache,
    run_mislabel_demo,
)

__all__ = [
    "main_demo",
    "MislabelDemoConfig",
    "MislabelDemoResult",
    "run_mislabel_demo",
    "mislabel_cache",
    "main_mislabel_demo",
    "format_table",
    "DATASETS",
    "run_generation_demo",
    "main_generation_demo",
]


def main_demo(args: argparse.Namespace) -> int:
    """``datainf demo``: the mislabel demo for ``args.task`` ``"mislabel"`` (or unset), else the explain demo
    of that task (``text-generation``, ``text-to-image``; an unknown task is refused there)."""
    task = getattr(args, "task", "mislabel") or "mislabel"
    if task == "mislabel":
        return main_mislabel_demo(args)
    return main_generation_demo(args)
