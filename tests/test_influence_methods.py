"""Fast influence methods against slow float64 references (docs/method.md sections 4-11)."""

from __future__ import annotations

import pytest
import torch

import datainf
from datainf import reference
from datainf.methods import LissaDivergenceWarning


def random_gradients(n: int, m: int, dims: dict[str, int], seed: int = 0, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    train = {b: scale * torch.randn(n, d, generator=generator, dtype=torch.float64) for b, d in dims.items()}
    test = {b: scale * torch.randn(m, d, generator=generator, dtype=torch.float64) for b, d in dims.items()}
    return train, test


DIMS = {"layer0.lora_A": 6, "layer0.lora_B": 9, "head.weight": 4}


def test_lambdas_match_loop_reference():
    train, _ = random_gradients(15, 2, DIMS)
    fast = datainf.block_lambdas(datainf.GradientStore.from_tensors(train), damping=0.3)
    slow = reference.reference_lambdas(train, damping=0.3)
    assert fast.keys() == slow.keys()
    for name in slow:
        assert fast[name] == pytest.approx(slow[name], rel=1e-12)


def test_datainf_equals_dense_inverse_and_gram_form():
    train, test = random_gradients(14, 3, DIMS, seed=1)
    lambdas = reference.reference_lambdas(train, damping=0.1)
    dense = reference.reference_datainf_dense(train, test, lambdas)
    gram = reference.reference_datainf_gram(train, test, lambdas)
    fast = datainf.influence(train, test, method="datainf", mode="pairwise", progress=False).values
    scale = dense.abs().max()
    assert torch.allclose(dense, gram, rtol=0, atol=1e-10 * scale)
    assert torch.allclose(fast, dense, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("n", [40, 5], ids=["direct-branch", "woodbury-branch"])
def test_exact_equals_dense_solve(n):
    train, test = random_gradients(n, 3, DIMS, seed=2)
    lambdas = reference.reference_lambdas(train)
    expected = reference.reference_exact(train, test, lambdas)
    scores = datainf.influence(train, test, method="exact", mode="pairwise", progress=False)
    branches = scores.diagnostics["exact_branches"]
    if n == 40:
        assert branches == {"direct": 3, "woodbury": 0}
    else:
        assert branches["woodbury"] == 2  # 6 and 9 > n = 5; the 4-wide head stays direct
    assert torch.allclose(scores.values, expected, rtol=0, atol=1e-10 * expected.abs().max())


def test_exact_small_memory_budget_uses_several_groups_same_answer():
    train, test = random_gradients(30, 2, DIMS, seed=3)
    one = datainf.influence(train, test, method="exact", mode="pairwise", progress=False)
    many = datainf.influence(
        train, test, method="exact", mode="pairwise", method_options={"max_memory_gb": 1e-9}, progress=False
    )
    assert many.diagnostics["exact_groups"] == 3
    assert torch.allclose(one.values, many.values, rtol=1e-12, atol=0)


def test_lissa_matches_recursion_reference_and_converges_to_exact_with_scale():
    train, test = random_gradients(25, 2, DIMS, seed=4, scale=0.2)
    lambdas = reference.reference_lambdas(train)
    scores = datainf.influence(
        train, test, method="lissa", mode="pairwise", method_options={"iterations": 7, "scale": 3.0}, progress=False
    )
    recursion = reference.reference_lissa(train, test, lambdas, iterations=7, scale=3.0)
    assert torch.allclose(scores.values, recursion, rtol=1e-10, atol=1e-12)

    exact = reference.reference_exact(train, test, lambdas)
    converged = datainf.influence(
        train,
        test,
        method="lissa",
        mode="pairwise",
        method_options={"iterations": 400, "scale": "trace"},
        progress=False,
    )
    assert not converged.diagnostics["lissa_diverged"]
    assert torch.allclose(converged.values, exact, rtol=1e-4, atol=1e-6 * exact.abs().max())
    few = datainf.influence(
        train, test, method="lissa", mode="pairwise", method_options={"iterations": 3, "scale": "trace"}, progress=False
    )
    assert (few.values - exact).abs().max() > (converged.values - exact).abs().max()


def test_lissa_divergence_is_flagged_not_silent():
    train, test = random_gradients(20, 2, DIMS, seed=5, scale=3.0)  # spectrum far above 2 with scale=1
    with pytest.warns(LissaDivergenceWarning):
        scores = datainf.influence(train, test, method="lissa", progress=False)
    assert scores.diagnostics["lissa_diverged"] is True
    assert set(scores.diagnostics["lissa_diverged_blocks"]) == set(DIMS)


def test_hessian_free_equals_dot_products():
    train, test = random_gradients(9, 4, DIMS, seed=6)
    expected = reference.reference_hessian_free(train, test)
    scores = datainf.influence(train, test, method="hessian_free", mode="pairwise", progress=False)
    assert torch.allclose(scores.values, expected, rtol=0, atol=1e-12 * expected.abs().max())


@pytest.mark.parametrize("method", ["datainf", "exact", "lissa", "hessian_free"])
def test_pairwise_rows_average_to_average_mode(method):
    train, test = random_gradients(18, 5, DIMS, seed=7, scale=0.3)
    pairwise = datainf.influence(train, test, method=method, mode="pairwise", progress=False)
    average = datainf.influence(train, test, method=method, mode="average", progress=False)
    assert pairwise.values.shape == (5, 18) and average.values.shape == (18,)
    assert torch.allclose(pairwise.values.mean(dim=0), average.values, rtol=1e-9, atol=1e-12)


def test_fixed_lambda_is_used_for_every_block():
    train, test = random_gradients(10, 2, DIMS, seed=8)
    lambdas = {b: 0.5 for b in DIMS}
    scores = datainf.influence(train, test, method="datainf", mode="pairwise", fixed_lambda=0.5, progress=False)
    assert scores.settings["lambdas"] == lambdas
    expected = reference.reference_datainf_dense(train, test, lambdas)
    assert torch.allclose(scores.values, expected, rtol=0, atol=1e-10 * expected.abs().max())


def test_sign_convention_a_duplicated_test_example_is_helpful():
    # Training example 0 equals the test gradient: up-weighting it lowers the test loss -> negative influence.
    train, test = random_gradients(12, 1, DIMS, seed=9)
    for name in DIMS:
        train[name][0] = test[name][0]
        train[name][1] = -test[name][0]
    for method in ("datainf", "exact", "hessian_free"):
        scores = datainf.influence(train, test, method=method, progress=False)
        assert scores.values[0] < 0 < scores.values[1], method
        assert scores.top_helpful(1)[0][0] == "0" and scores.top_harmful(1)[0][0] == "1"


def test_all_zero_block_is_skipped_with_a_warning(caplog):
    train, test = random_gradients(10, 2, DIMS, seed=10)
    train["head.weight"] = torch.zeros_like(train["head.weight"])
    scores = datainf.influence(train, test, mode="pairwise", progress=False)
    assert scores.diagnostics["zero_gradient_blocks"] == ["head.weight"]
    without = {k: v for k, v in train.items() if k != "head.weight"}
    expected = reference.reference_datainf_dense(without, test, reference.reference_lambdas(without))
    assert torch.allclose(scores.values, expected, rtol=0, atol=1e-10 * expected.abs().max())
    assert "all-zero" in caplog.text
