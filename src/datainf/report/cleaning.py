"""What cleaning would do: the section of a report that shows the retrain with the flagged examples removed."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datainf.report.html import (
    _esc,
    _fmt,
    _plt,
)

logger = logging.getLogger(__name__)


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
