"""Every registered method in every mode under 2 gloo ranks equals one process (the engine's helpers combine the shares).

Covers what ``tests/test_distributed.py`` does not: ``mode="self"``, ``normalize=True``, the
``diagonal`` method, a method registered by the user (which only implements ``precondition``), and
a rank with no training rows at all (``n = 1``). One launch of two spawned ranks with torchrun's
environment variables, like ``tests/test_distributed.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

import datainf
from datainf.methods import (
    InfluenceMethod,
    MethodContext,
    Preconditioned,
    available_methods,
    get_method,
    register_method,
    unregister_method,
)
from two_ranks import free_port, launch, set_rank_env

WORLD = 2
DEADLINE_S = 240.0
DIMS = {"a.lora_A": 5, "b.lora_B": 24, "c.head": 3}  # b: 24 > n = 13, Exact's Woodbury branch


class DoubledHessianFree(InfluenceMethod):
    """A user's method: ``R = 2 V``; its self-influence comes from the default (chunked preconditioning)."""

    name = "doubled_hf"
    passes_description = "0 passes"

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        return Preconditioned({b: 2.0 * test[b] for b in ctx.blocks})


def _synthetic(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {b: torch.randn(n, d, generator=gen) * (1 + j) for j, (b, d) in enumerate(DIMS.items())}


def _every_score(n: int) -> dict[str, torch.Tensor]:
    train, test = _synthetic(n, 0), _synthetic(4, 1)
    out = {}
    for method in [m for m in available_methods() if not get_method(m).needs_factors]:  # kfac: test_kfac.py
        options = {"iterations": 4, "scale": "trace"} if method == "lissa" else {}
        for mode in ("average", "pairwise", "self"):
            for normalize in (False, True):
                scores = datainf.influence(
                    train,
                    None if mode == "self" else test,
                    method=method,
                    mode=mode,
                    method_options=options,
                    normalize=normalize,
                    batch_size=3,
                    progress=False,
                )
                out[f"{n}-{method}-{mode}-{normalize}"] = scores.values
    return out


def _job(rank: int, port: int, root: str) -> None:
    set_rank_env(rank, port, WORLD)
    register_method(DoubledHessianFree)
    try:
        assert datainf.distributed.dist_context().world_size == WORLD
        results = {**_every_score(13), **_every_score(1)}
    finally:
        unregister_method(DoubledHessianFree.name)
    torch.save(results, Path(root) / f"methods-rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("dist-methods")
    codes = launch(_job, (free_port(), str(root)), world=WORLD, deadline_s=DEADLINE_S, what="the distributed job")
    assert codes == [None] * WORLD, f"a rank failed: exit codes {codes}"
    return [torch.load(root / f"methods-rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.filterwarnings(
    "ignore::datainf.methods.LissaDivergenceWarning"
)  # n = 1: round-off "growth" of a zero residual
def test_every_method_mode_and_normalisation_equals_one_process(ranks) -> None:
    register_method(DoubledHessianFree)
    try:
        single = {**_every_score(13), **_every_score(1)}
    finally:
        unregister_method(DoubledHessianFree.name)
    assert set(ranks[0]) == set(single) and any(key.startswith("13-doubled_hf-self") for key in single)
    for key, expected in single.items():
        torch.testing.assert_close(ranks[0][key], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=key)
        assert torch.equal(ranks[1][key], ranks[0][key]), key  # every rank returns the same scores
