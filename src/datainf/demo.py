"""Deprecated: the demos moved to :mod:`datainf.demos` (:mod:`datainf.demos.mislabel`,
:mod:`datainf.demos.explain`); import from there. This module re-exports their names for old imports."""

from __future__ import annotations

import warnings

from datainf.demos import (
    DATASETS,
    MislabelDemoConfig,
    MislabelDemoResult,
    format_table,
    main_demo,
    main_generation_demo,
    main_mislabel_demo,
    mislabel_cache,
    run_generation_demo,
    run_mislabel_demo,
)
from datainf.demos.mislabel import METHODS, _minilm_path  # noqa: F401  (old private imports: benchmarks/bench_distributed.py)

warnings.warn(
    "datainf.demo is deprecated; import from datainf.demos (datainf.demos.mislabel, datainf.demos.explain).",
    DeprecationWarning,
    stacklevel=2,
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
