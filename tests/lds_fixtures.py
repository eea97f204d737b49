"""A retrain that takes microseconds (logistic regression, NumPy only), for the LDS tests: light to import,
so that the worker processes of ``jobs > 1`` start fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def logistic_data(n: int = 24, n_test: int = 12, d: int = 3, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n + n_test, d))
    y = (x @ w + 0.8 * rng.normal(size=n + n_test) > 0).astype(np.float64)
    return x[:n], y[:n], x[n:], y[n:]


def fit(x: np.ndarray, y: np.ndarray, reg: float) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method (deterministic, float64): minimises
    sum_i loss_i + reg / 2 ||w||^2, so removing an example changes the optimum by about one example's weight."""
    w = np.zeros(x.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-x @ w))
        grad = x.T @ (p - y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg * np.eye(x.shape[1])
        w -= np.linalg.solve(hess, grad)
    return w


def losses(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = x @ w
    return np.logaddexp(0, z) - y * z


@dataclass(frozen=True)
class LogisticTrainer:
    """A retrain that takes microseconds: logistic regression on the included examples, test log-losses."""

    seed: int = 0
    reg: float = 1.0
    fail_at_call: int | None = None  # raise on this call (a kill in the middle of an evaluation)
    calls_file: str | None = None  # appends each retrained subset size (to count retrains across processes)

    def _data(self) -> tuple[np.ndarray, ...]:
        return logistic_data(seed=self.seed)

    @property
    def train_ids(self) -> list[str]:
        return [f"tr{i}" for i in range(len(self._data()[0]))]

    @property
    def test_ids(self) -> list[str]:
        return [f"te{i}" for i in range(len(self._data()[2]))]

    def describe(self) -> dict[str, Any]:
        return {"trainer": "logistic", "seed": self.seed, "reg": self.reg}

    def __call__(self, included: np.ndarray) -> np.ndarray:
        if self.calls_file is not None:
            path = Path(self.calls_file)
            calls = path.read_text().count("\n") if path.exists() else 0
            if self.fail_at_call is not None and calls + 1 == self.fail_at_call:
                raise KeyboardInterrupt("killed")
            with path.open("a") as handle:
                handle.write(f"{len(included)}\n")
        x, y, xt, yt = self._data()
        return losses(fit(x[included], y[included], self.reg), xt, yt)
