"""Self-influence (``mode="self"``), the ``diagonal`` method and normalised scores against float64 references."""

from __future__ import annotations

import pytest
import torch

import datainf
from datainf import reference
from datainf.errors import ConfigError
from datainf.influence import SELF_SIGN_CONVENTION
from datainf.methods import LissaDivergenceWarning, available_methods, get_method
from datainf.scores import Scores
from datainf.store import GradientStore

DIMS = {"layer0.lora_A": 6, "layer0.lora_B": 9, "head.weight": 4}
OPTIONS = {"lissa": {"iterations": 7, "scale": 3.0}}
#: Methods that work from the gradients alone (kfac / ekfac need Kronecker factors: tests/test_kfac.py).
GRADIENT_ONLY_METHODS = [m for m in available_methods() if not get_method(m).needs_factors]


def random_gradients(n: int, m: int, seed: int = 0, scale: float = 1.0, dims: dict[str, int] = DIMS):
    generator = torch.Generator().manual_seed(seed)
    train = {b: scale * torch.randn(n, d, generator=generator, dtype=torch.float64) for b, d in dims.items()}
    test = {b: scale * torch.randn(m, d, generator=generator, dtype=torch.float64) for b, d in dims.items()}
    return train, test


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> bool:
    return torch.allclose(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------- self-influence


@pytest.mark.parametrize(
    ("method", "n"),
    [("datainf", 14), ("exact", 40), ("exact", 5), ("lissa", 14), ("hessian_free", 9), ("diagonal", 14)],
    ids=["datainf", "exact-direct", "exact-woodbury", "lissa", "hessian_free", "diagonal"],
)
def test_self_influence_matches_dense_float64_reference(method, n):
    train, _ = random_gradients(n, 1, seed=1, scale=0.3)
    lambdas = reference.reference_lambdas(train)
    options = OPTIONS.get(method, {})
    dense = reference.reference_preconditioners(train, lambdas, method, **options)
    expected = reference.reference_self_influence(train, dense)
    scores = datainf.influence(train, method=method, mode="self", method_options=options, batch_size=4, progress=False)
    assert scores.mode == "self" and scores.values.shape == (n,) and scores.test_ids == []
    assert scores.sign_convention == SELF_SIGN_CONVENTION
    assert close(scores.values, expected), (scores.values - expected).abs().max()
    if method != "lissa":  # a positive definite P: every self-influence is positive
        assert (scores.values > 0).all()
    if method == "exact":
        branches = scores.diagnostics["exact_branches"]
        assert branches == ({"direct": 3, "woodbury": 0} if n == 40 else {"direct": 1, "woodbury": 2})


def test_datainf_self_closed_form_by_hand():
    """``s_k = sum_l (1/lambda) [ ||g_k||^2 - (1/n) sum_i (g_i . g_k)^2 / (lambda + ||g_i||^2) ]``, one block, loops."""
    train, _ = random_gradients(7, 1, seed=2, dims={"only": 5})
    x = train["only"]
    lam = reference.reference_lambdas(train)["only"]
    expected = torch.tensor(
        [
            (float(x[k] @ x[k]) - sum(float(x[i] @ x[k]) ** 2 / (lam + float(x[i] @ x[i])) for i in range(7)) / 7) / lam
            for k in range(7)
        ],
        dtype=torch.float64,
    )
    assert close(datainf.influence(train, mode="self", progress=False).values, expected)


@pytest.mark.parametrize("method", GRADIENT_ONLY_METHODS)
def test_self_is_minus_the_diagonal_of_pairwise_on_the_training_set(method):
    """``s_k = - I[k, k]`` with the training gradients as test gradients, for every registered method."""
    train, _ = random_gradients(11, 1, seed=3, scale=0.3)
    options = {"iterations": 5, "scale": "trace"} if method == "lissa" else {}
    own = datainf.influence(train, method=method, mode="self", method_options=options, batch_size=4, progress=False)
    pairwise = datainf.influence(train, train, method=method, mode="pairwise", method_options=options, progress=False)
    assert close(own.values, -pairwise.values.diagonal(), rtol=1e-9)


@pytest.mark.parametrize("method", ["datainf", "exact", "lissa", "hessian_free", "diagonal"])
def test_self_is_invariant_to_batches_shards_and_block_order(tmp_path, method):
    train, _ = random_gradients(23, 1, seed=4, scale=0.3)
    options = {"iterations": 4, "scale": "trace"} if method == "lissa" else {}
    baseline = datainf.influence(train, method=method, mode="self", method_options=options, progress=False)
    store = GradientStore.create(tmp_path / "s", block_dims=DIMS, dtype="float64", shard_size=5)
    for start in range(0, 23, 3):
        store.append(
            [f"e{i}" for i in range(start, min(23, start + 3))], {b: t[start : start + 3] for b, t in train.items()}
        )
    store.finalize()
    on_disk = datainf.influence(
        GradientStore.open(tmp_path / "s"),
        method=method,
        mode="self",
        method_options=options,
        batch_size=2,
        progress=False,
    )
    reordered = datainf.influence(
        {b: train[b] for b in reversed(list(train))},
        method=method,
        mode="self",
        method_options=options,
        batch_size=7,
        progress=False,
    )
    for other in (on_disk, reordered):
        assert close(other.values, baseline.values, rtol=1e-10)
    assert on_disk.train_ids == [f"e{i}" for i in range(23)]


def test_self_mode_refuses_test_gradients_and_other_modes_need_them():
    train, test = random_gradients(6, 2)
    with pytest.raises(ConfigError, match="mode='self'.*uses no test gradients"):
        datainf.influence(train, test, mode="self", progress=False)
    with pytest.raises(ConfigError, match="needs test gradients"):
        datainf.influence(train, mode="pairwise", progress=False)
    with pytest.raises(ConfigError, match="'average', 'pairwise' or 'self'"):
        datainf.InfluenceConfig(mode="selfish")


def test_lissa_self_divergence_is_flagged():
    train, _ = random_gradients(10, 1, seed=5, scale=3.0)
    with pytest.warns(LissaDivergenceWarning):
        scores = datainf.influence(train, method="lissa", mode="self", batch_size=4, progress=False)
    assert scores.diagnostics["lissa_diverged"] is True and set(scores.diagnostics["lissa_diverged_blocks"]) == set(
        DIMS
    )
    assert scores.diagnostics["passes"] == 1 + 3 * 10  # the chunk read + 10 iterations for each of 3 chunks


def test_self_scores_round_trip_and_rank(tmp_path):
    train, _ = random_gradients(8, 1, seed=6)
    for name in DIMS:
        train[name][3] *= 10.0  # one example far from the others: the largest self-influence
    scores = datainf.influence(train, mode="self", progress=False)
    assert scores.top_harmful(1)[0][0] == "3"
    again = Scores.load(scores.save(tmp_path / "self.safetensors"))
    assert (
        again.mode == "self"
        and torch.equal(again.values, scores.values)
        and again.sign_convention == SELF_SIGN_CONVENTION
    )
    assert list(again.to_pandas().columns) == ["train_id", "influence", "rank"]


# ---------------------------------------------------------------------------------------------- diagonal


def test_diagonal_matches_loop_reference_and_modes_agree():
    train, test = random_gradients(16, 3, seed=7)
    lambdas = reference.reference_lambdas(train)
    expected = reference.reference_diagonal(train, test, lambdas)
    pairwise = datainf.influence(train, test, method="diagonal", mode="pairwise", batch_size=5, progress=False)
    assert close(pairwise.values, expected)
    average = datainf.influence(train, test, method="diagonal", progress=False)
    assert close(average.values, expected.mean(dim=0))
    assert pairwise.diagnostics["passes"] == 2  # the diagonal + the scoring pass


def test_diagonal_equals_exact_when_the_gradients_have_orthogonal_columns():
    """With orthogonal parameter columns, ``G_l`` is diagonal and the diagonal method is exact."""
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    train = {"a": q[:, :5] * torch.arange(1.0, 6.0, dtype=torch.float64), "b": q[:, 5:8]}
    test = {"a": torch.randn(2, 5, dtype=torch.float64), "b": torch.randn(2, 3, dtype=torch.float64)}
    diagonal = datainf.influence(train, test, method="diagonal", mode="pairwise", progress=False)
    exact = datainf.influence(train, test, method="exact", mode="pairwise", progress=False)
    assert close(diagonal.values, exact.values, rtol=1e-9)


# ---------------------------------------------------------------------------------------------- normalised scores


def test_normalized_hessian_free_is_minus_cosine_similarity():
    train, test = random_gradients(12, 3, seed=9)
    scores = datainf.influence(train, test, method="hessian_free", mode="pairwise", normalize=True, progress=False)
    flat_train = torch.cat([train[b] for b in DIMS], dim=1)  # (n, D)
    flat_test = torch.cat([test[b] for b in DIMS], dim=1)  # (m, D)
    cosine = torch.tensor(
        [
            [float(torch.nn.functional.cosine_similarity(flat_test[j], flat_train[k], dim=0)) for k in range(12)]
            for j in range(3)
        ],
        dtype=torch.float64,
    )
    assert close(scores.values, -cosine)
    assert scores.values.abs().max() <= 1.0 + 1e-12 and scores.settings["normalize"] is True


@pytest.mark.parametrize("method", GRADIENT_ONLY_METHODS)
@pytest.mark.parametrize("mode", ["average", "pairwise", "self"])
def test_normalize_equals_scoring_unit_gradients(method, mode):
    train, test = random_gradients(13, 3, seed=10)
    options = {"iterations": 5, "scale": "trace"} if method == "lissa" else {}
    given = None if mode == "self" else test
    unit_test = None if mode == "self" else reference.reference_normalize(test)
    normalized = datainf.influence(
        train, given, method=method, mode=mode, method_options=options, normalize=True, batch_size=4, progress=False
    )
    on_unit = datainf.influence(
        reference.reference_normalize(train),
        unit_test,
        method=method,
        mode=mode,
        method_options=options,
        batch_size=4,
        progress=False,
    )
    assert close(normalized.values, on_unit.values, rtol=1e-9)
    assert normalized.settings["lambdas"] == pytest.approx(on_unit.settings["lambdas"], rel=1e-12)


def test_normalized_scores_ignore_each_example_s_gradient_scale():
    train, test = random_gradients(10, 2, seed=11)
    factors = torch.linspace(0.1, 30.0, 10, dtype=torch.float64).unsqueeze(1)
    rescaled = {b: t * factors for b, t in train.items()}
    for method in ("datainf", "exact", "diagonal"):
        a = datainf.influence(train, test, method=method, mode="pairwise", normalize=True, progress=False)
        b = datainf.influence(rescaled, test, method=method, mode="pairwise", normalize=True, progress=False)
        raw_a = datainf.influence(train, test, method=method, mode="pairwise", progress=False)
        raw_b = datainf.influence(rescaled, test, method=method, mode="pairwise", progress=False)
        assert close(b.values, a.values, rtol=1e-9), method
        assert not close(raw_b.values, raw_a.values, rtol=1e-3), method  # without normalize the scale matters


def test_normalize_keeps_zero_gradients_at_zero(caplog):
    train, test = random_gradients(6, 2, seed=12)
    for name in DIMS:
        train[name][2] = 0.0
    scores = datainf.influence(train, test, mode="pairwise", normalize=True, progress=False)
    assert torch.equal(scores.values[:, 2], torch.zeros(2, dtype=torch.float64))
    assert torch.isfinite(scores.values).all()
    assert scores.diagnostics["zero_gradient_examples"] == {"train": ["2"], "test": []}
    assert "all-zero gradient" in caplog.text
    with pytest.raises(ConfigError, match="normalize"):
        datainf.InfluenceConfig(normalize="yes")  # type: ignore[arg-type]


def test_normalize_off_changes_nothing():
    train, test = random_gradients(9, 2, seed=13)
    default = datainf.influence(train, test, mode="pairwise", progress=False)
    off = datainf.influence(train, test, mode="pairwise", normalize=False, progress=False)
    assert torch.equal(default.values, off.values)
    assert "zero_gradient_examples" not in default.diagnostics and default.settings["normalize"] is False
