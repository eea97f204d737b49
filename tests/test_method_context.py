"""The engine's streaming helpers (``MethodContext``): scores unchanged, process shares combined for every method.

* the scores of every method equal values recorded at commit 48755a2, before the methods moved onto
  the context's helpers (``tests/data/scores_48755a2.safetensors``; float64 inputs);
* a *twin* two-process job, run in one process: the store holds every training row twice, this
  "rank 0" streams the first copy, and the collectives answer as if rank 1 had streamed the
  identical second copy (sums doubled, rows gathered twice). Any method that reads its sums through
  the helpers gives the single-process scores of the doubled store; one that sums its own rows by
  hand does not (the negative control below), which is what makes a method wrong under torchrun.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import datainf
from datainf.distributed import DistributedContext
from datainf.methods import (
    InfluenceMethod,
    MethodContext,
    Preconditioned,
    available_methods,
    get_method,
    register_method,
    unregister_method,
)

engine = importlib.import_module("datainf.influence")  # the module (the package attribute is the function)

FIXTURE = Path(__file__).parent / "data" / "scores_48755a2.safetensors"
RECORDED_DIMS = {"layer0.lora_A": 6, "layer0.lora_B": 9, "head.weight": 4, "wide.lora_B": 20}  # 20 > n: Woodbury

#: key -> (input dtype, method, options, mode, batch size) of the recorded scores
RECORDED_CASES: dict[str, tuple[str, str, dict[str, Any], str, int]] = {
    f"{dtype}-{method}{'-' + tag if tag else ''}-{mode}": (dtype, method, options, mode, batch)
    for dtype in ("float64", "float32")
    for method, tag, options, batch in (
        ("datainf", "", {}, 4),
        ("exact", "", {}, 5),
        ("exact", "groups", {"max_memory_gb": 1e-9}, 1024),
        ("lissa", "", {"iterations": 3}, 4),
        ("lissa", "trace", {"iterations": 6, "scale": "trace"}, 1024),
        ("hessian_free", "", {}, 3),
    )
    for mode in ("average", "pairwise")
}


def recorded_inputs(dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train ``(13, d_l)`` and test ``(3, d_l)`` gradients of the recorded cases."""
    generator = torch.Generator().manual_seed(11)
    train = {b: 0.3 * torch.randn(13, d, generator=generator, dtype=torch.float64) for b, d in RECORDED_DIMS.items()}
    test = {b: 0.3 * torch.randn(3, d, generator=generator, dtype=torch.float64) for b, d in RECORDED_DIMS.items()}
    target = getattr(torch, dtype)
    return {b: t.to(target) for b, t in train.items()}, {b: t.to(target) for b, t in test.items()}


@pytest.mark.filterwarnings("ignore::datainf.methods.LissaDivergenceWarning")
def test_scores_equal_those_recorded_before_the_helpers():
    recorded = load_file(str(FIXTURE))
    assert set(recorded) == set(RECORDED_CASES)
    for key, (dtype, method, options, mode, batch) in RECORDED_CASES.items():
        train, test = recorded_inputs(dtype)
        values = datainf.influence(
            train, test, method=method, mode=mode, method_options=options, batch_size=batch, progress=False
        ).values
        expected = recorded[key]
        # bit-identical on the machine that recorded them; elsewhere BLAS may round differently
        tolerance = 1e-12 if dtype == "float64" else 1e-5
        assert values.shape == expected.shape, key
        assert torch.allclose(values, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max())), key


# ---------------------------------------------------------------------------------------------- twin processes


@dataclass(frozen=True)
class TwinContext(DistributedContext):
    """Rank 0 of 2 whose partner holds an identical copy of every row: sums double, gathers repeat."""

    rank: int = 0
    world_size: int = 2

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + tensor

    def all_gather_cat(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.cat([tensor, tensor], dim=dim)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj, obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj


def doubled(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {b: torch.cat([t, t]) for b, t in grads.items()}


def _run_all(
    train: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor], methods: list[str]
) -> dict[str, torch.Tensor]:
    out = {}
    for method in methods:
        options = {"iterations": 4, "scale": "trace"} if method == "lissa" else {}
        for mode in ("average", "pairwise", "self"):
            for normalize in (False, True):
                scores = datainf.influence(
                    train,
                    None if mode == "self" else test,
                    method=method,
                    mode=mode,
                    method_options=options,
                    batch_size=4,
                    normalize=normalize,
                    progress=False,
                )
                out[f"{method}-{mode}-{normalize}"] = scores.values
    return out


def test_every_registered_method_combines_the_process_shares(monkeypatch):
    train, test = recorded_inputs("float64")
    train2 = doubled(train)
    methods = [m for m in available_methods() if not get_method(m).needs_factors]  # kfac/ekfac: test_kfac.py
    single = _run_all(train2, test, methods)
    monkeypatch.setattr(engine, "dist_context", lambda: TwinContext())
    twinned = _run_all(train2, test, methods)
    for key, expected in single.items():
        assert torch.allclose(twinned[key], expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max())), key


class HandSummed(InfluenceMethod):
    """Negative control: DataInf that sums its own rows (a private, per-process pass) and skips the all-reduce."""

    name = "hand_summed"
    passes_description = "1 pass"

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        sums = {b: torch.zeros_like(test[b]) for b in ctx.blocks}
        for batch in ctx._stream("by hand"):
            for b in ctx.blocks:
                x = batch[b]
                coefficients = (x @ test[b].T) / (ctx.lambdas[b] + x.square().sum(dim=1, keepdim=True))
                sums[b] += coefficients.T @ x
        return Preconditioned({b: (test[b] - sums[b] / ctx.total_examples) / ctx.lambdas[b] for b in ctx.blocks})


def test_a_method_that_bypasses_the_helpers_is_caught(monkeypatch):
    train, test = recorded_inputs("float64")
    train2 = doubled(train)
    register_method(HandSummed)
    try:
        single = datainf.influence(train2, test, method="datainf", mode="pairwise", progress=False).values
        hand_single = datainf.influence(train2, test, method="hand_summed", mode="pairwise", progress=False).values
        monkeypatch.setattr(engine, "dist_context", lambda: TwinContext())
        datainf_twin = datainf.influence(train2, test, method="datainf", mode="pairwise", progress=False).values
        hand_twin = datainf.influence(train2, test, method="hand_summed", mode="pairwise", progress=False).values
    finally:
        unregister_method("hand_summed")
    assert torch.allclose(hand_single, single, rtol=1e-10)  # right in one process ...
    assert torch.allclose(datainf_twin, single, rtol=1e-10)
    assert not torch.allclose(hand_twin, single, rtol=1e-3)  # ... half the sum under 2 processes: silently wrong


def test_context_reads_norms_by_block_name_in_any_store_order():
    train, _ = recorded_inputs("float64")
    forward = datainf.GradientStore.from_tensors(train)
    backward = datainf.GradientStore.from_tensors({b: train[b] for b in reversed(list(train))})
    for store in (forward, backward):
        ctx = MethodContext(
            train=store,
            lambdas={},
            blocks=sorted(train),
            batch_size=4,
            compute_dtype=torch.float64,
            device=torch.device("cpu"),
            total_examples=13,
        )
        for b, t in train.items():
            assert torch.allclose(ctx.squared_norms(b), t.square().sum(dim=1), rtol=1e-12)
            assert ctx.squared_norm_total(b) == pytest.approx(float(t.square().sum()), rel=1e-12)


def test_streamed_pass_sums_and_rows_in_store_order():
    train, _ = recorded_inputs("float64")
    store = datainf.GradientStore.from_tensors(train)
    ctx = MethodContext(
        train=store,
        lambdas={},
        blocks=sorted(train),
        batch_size=4,
        compute_dtype=torch.float64,
        device=torch.device("cpu"),
        total_examples=13,
        processes=TwinContext(),
        rows=range(0, 13),
    )

    def add(acc: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        acc["sum"] += batch["head.weight"].sum(dim=0)

    totals, rows = ctx.streamed_pass(
        "test",
        sums={"sum": torch.zeros(4, dtype=torch.float64)},
        add=add,
        rows_of=lambda batch: {"first": batch["head.weight"][:, 0]},
        blocks=["head.weight"],
    )
    head = train["head.weight"]
    assert torch.allclose(totals["sum"], 2 * head.sum(dim=0))
    assert torch.equal(rows["first"], torch.cat([head[:, 0], head[:, 0]]))
    assert ctx.passes == 1
    by_column = ctx.streamed_rows("test", lambda batch: {"t": batch["head.weight"].T}, blocks=["head.weight"], dim=1)
    assert torch.equal(by_column["t"], torch.cat([head.T, head.T], dim=1))
    with pytest.raises(datainf.errors.ConfigError, match="both"):
        ctx.streamed_pass("bad", sums={})
