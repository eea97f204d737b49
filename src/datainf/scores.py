"""Influence scores: values, ids, settings, rankings and atomic persistence.

Sign convention (the paper's): ``I > 0`` means up-weighting the training example *raises* the test
loss (harmful); ``I < 0`` means it lowers it (helpful). dattri and pyDVL return ``-I``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from datainf.errors import ConfigError, StoreCorruptedError
from datainf.store import atomic_write_bytes

if TYPE_CHECKING:
    from datainf.store import GradientSource

__all__ = ["Scores", "SIGN_CONVENTION", "LOSS_METHOD", "LOSS_SIGN_CONVENTION"]

#: The ``method`` name of the training-loss baseline's scores (``scores-loss.safetensors``,
#: computed by :func:`datainf.baselines.loss_scores`).
LOSS_METHOD = "loss"

#: What the values of the training-loss baseline mean (recorded as their ``sign_convention``).
LOSS_SIGN_CONVENTION = (
    "training loss of each example under the fine-tuned model (a baseline, not an influence): high = the model does "
    "not fit the example's label (mislabel suspects rank first, like harmful examples)"
)

SIGN_CONVENTION = (
    "positive influence = harmful (up-weighting the training example raises the test loss); negative = helpful"
)
_FORMAT = "datainf-scores"


@dataclass(frozen=True)
class Scores:
    """Influence of every training example on the test loss.

    Attributes:
        values: ``(n,)`` in ``average`` mode (influence on the mean test loss), ``(m, n)`` in
            ``pairwise`` mode (row ``j`` = influence on test example ``j``'s loss), ``(n,)`` in
            ``self`` mode (self-influence, ``test_ids`` empty; see :attr:`sign_convention`). float64.
        train_ids: the ``n`` training example ids, in column order.
        test_ids: the ``m`` test example ids (in ``average`` mode, those averaged over; empty in
            ``self`` mode).
        method: ``datainf``, ``exact``, ``lissa``, ``hessian_free``, ``diagonal``, a registered
            method, or ``loss`` (the training-loss baseline, :mod:`datainf.baselines`; ``self`` mode).
        mode: ``average``, ``pairwise`` or ``self``.
        settings: damping, ``lambda_l`` per block, method options (JSON-able).
        diagnostics: timings, passes, method-specific flags such as LiSSA divergence (JSON-able).
    """

    values: torch.Tensor
    train_ids: list[str]
    test_ids: list[str]
    method: str
    mode: Literal["average", "pairwise", "self"]
    settings: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    sign_convention: str = SIGN_CONVENTION

    def __post_init__(self) -> None:
        expected = (
            (len(self.train_ids),) if self.mode in ("average", "self") else (len(self.test_ids), len(self.train_ids))
        )
        if tuple(self.values.shape) != expected:
            raise ConfigError(
                f"Scores of mode {self.mode!r} need values of shape {expected}, got {tuple(self.values.shape)}."
            )

    # ------------------------------------------------------------------ rankings
    def _row(self, test_index: int | None) -> torch.Tensor:
        if self.mode in ("average", "self"):
            if test_index is not None:
                raise ConfigError(
                    "These scores are averaged over the test set; test_index applies to pairwise scores only."
                )
            return self.values
        if test_index is None:
            return self.values.mean(dim=0)
        if not -len(self.test_ids) <= test_index < len(self.test_ids):
            raise ConfigError(f"test_index {test_index} is out of range for {len(self.test_ids)} test examples.")
        return self.values[test_index]

    def top_harmful(self, k: int = 10, *, test_index: int | None = None) -> list[tuple[str, float]]:
        """The ``k`` training examples with the largest influence (most harmful), as ``(id, score)``.

        In pairwise mode, ``test_index`` picks one test example; ``None`` ranks by the mean over test rows.
        """
        row = self._row(test_index)
        order = torch.argsort(row, descending=True, stable=True)[:k]
        return [(self.train_ids[i], float(row[i])) for i in order.tolist()]

    def top_helpful(self, k: int = 10, *, test_index: int | None = None) -> list[tuple[str, float]]:
        """The ``k`` training examples with the smallest (most negative) influence, as ``(id, score)``."""
        row = self._row(test_index)
        order = torch.argsort(row, descending=False, stable=True)[:k]
        return [(self.train_ids[i], float(row[i])) for i in order.tolist()]

    def to_pandas(self) -> Any:
        """A long-format DataFrame with columns ``test_id`` (pairwise only), ``train_id``, ``influence``, ``rank``.

        ``rank`` 1 is the most harmful training example (per test example in pairwise mode).
        """
        import pandas as pd

        if self.mode in ("average", "self"):
            frame = pd.DataFrame({"train_id": self.train_ids, "influence": self.values.numpy()})
            frame["rank"] = frame["influence"].rank(ascending=False, method="first").astype(int)
            return frame
        m, n = self.values.shape
        frame = pd.DataFrame(
            {
                "test_id": [t for t in self.test_ids for _ in range(n)],
                "train_id": self.train_ids * m,
                "influence": self.values.reshape(-1).numpy(),
            }
        )
        frame["rank"] = (
            frame.groupby("test_id", sort=False)["influence"].rank(ascending=False, method="first").astype(int)
        )
        return frame

    def write_table(self, path_stem: str | os.PathLike[str], fmt: Literal["csv", "parquet"] = "csv") -> Path:
        """Write :meth:`to_pandas` as ``<path_stem>.csv`` or ``<path_stem>.parquet``, atomically; returns the path.

        Raises:
            ConfigError: an unknown ``fmt``, or ``parquet`` without the pyarrow package.
        """
        frame = self.to_pandas()
        stem = Path(path_stem)
        if fmt == "parquet":
            if importlib.util.find_spec("pyarrow") is None:
                raise ConfigError("--table-format parquet needs the pyarrow package (pip install pyarrow); use csv.")
            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            path = stem.with_suffix(".parquet")
            atomic_write_bytes(path, buffer.getvalue())
            return path
        if fmt != "csv":
            raise ConfigError(f"Unknown table format {fmt!r}; choose csv or parquet.")
        path = stem.with_suffix(".csv")
        atomic_write_bytes(path, frame.to_csv(index=False).encode())
        return path

    def matches(self, train_store: GradientSource, test_store: GradientSource | None) -> bool:
        """Whether these scores were computed from these very gradients: the same training and test
        ids, in order, and the training store's fingerprint (recorded in :attr:`settings`).

        ``test_store=None`` stands for "no test set" (``self`` mode, the training-loss baseline):
        the scores must then have no test ids. A finished scores file is reused only when this
        holds (e.g. by ``datainf score``).
        """
        test_ids = [] if test_store is None else test_store.ids
        return bool(
            self.train_ids == train_store.ids
            and self.test_ids == test_ids
            and self.settings.get("fingerprint") == train_store.fingerprint
        )

    # ------------------------------------------------------------------ persistence
    def _metadata(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": 1,
            "method": self.method,
            "mode": self.mode,
            "train_ids": self.train_ids,
            "test_ids": self.test_ids,
            "settings": self.settings,
            "diagnostics": self.diagnostics,
            "sign_convention": self.sign_convention,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (values + JSON metadata in its header), atomically."""
        path = Path(path)
        payload = save(
            {"values": self.values.to(torch.float64).contiguous()}, metadata={"datainf": json.dumps(self._metadata())}
        )
        atomic_write_bytes(path, payload)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scores:
        """Read scores written by :meth:`save` (no pickle involved)."""
        path = Path(path)
        if not path.is_file():
            raise StoreCorruptedError(f"No scores file at {path}.")
        try:
            raw = path.read_bytes()
            values = load(raw)["values"]
            header_len = int.from_bytes(raw[:8], "little")
            meta = json.loads(json.loads(raw[8 : 8 + header_len])["__metadata__"]["datainf"])
            if meta.get("format") != _FORMAT:
                raise ValueError("not a datainf scores file")
        except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise StoreCorruptedError(
                f"{path} is not a readable datainf scores file ({err}); recompute it with datainf score."
            ) from err
        return cls(
            values=values,
            train_ids=list(meta["train_ids"]),
            test_ids=list(meta["test_ids"]),
            method=meta["method"],
            mode=meta["mode"],
            settings=meta.get("settings", {}),
            diagnostics=meta.get("diagnostics", {}),
            sign_convention=meta.get("sign_convention", SIGN_CONVENTION),
        )

    def __repr__(self) -> str:
        return (
            f"Scores(method={self.method!r}, mode={self.mode!r}, shape={tuple(self.values.shape)}, "
            f"sign='positive = harmful')"
        )
