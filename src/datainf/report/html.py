"""What every report page is built from.

Escaping, number formats, the page frame with its sign note, matplotlib, and the atomic publishing of a
report folder.
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
from typing import Any

import numpy as np

from datainf.errors import ConfigError, EmptyInputError
from datainf.scores import LOSS_METHOD, SIGN_CONVENTION, Scores

logger = logging.getLogger(__name__)


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
