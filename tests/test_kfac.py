"""K-FAC / EK-FAC: factors from the hooks vs a per-example loop, resume, the methods vs dense float64, refusals."""

from __future__ import annotations

import pytest
import torch
from gradient_fixtures import bert_classifier, classification_data, word_tokenizer

import datainf
from datainf.errors import ConfigError, FingerprintMismatchError, StoreError
from datainf.factors import FACTORS_FOLDER, BlockFactorSums, KroneckerFactors, attach_factors, load_factors
from datainf.gradients import SequenceClassificationTask, collect_gradients, find_lora_blocks, gradient_mode
from datainf.store import GradientStore

# ---------------------------------------------------------------------------------------------- dense reference


def dense_preconditioner(
    grads: torch.Tensor, a: torch.Tensor, s: torch.Tensor, lam: float, *, ekfac: bool
) -> torch.Tensor:
    """``(S (x) A + lam I)^-1`` (K-FAC) or ``Q (Lambda + lam)^-1 Q^T`` (EK-FAC), as a dense ``d x d`` float64 matrix.

    ``grads``: ``(n, q p)`` row-major per-example gradients; ``a``: ``(p, p)``; ``s``: ``(q, q)``.
    """
    kron = torch.kron(s, a)  # row-major vec(g) = sum_t delta_t (x) x_t
    if not ekfac:
        return torch.linalg.inv(kron + lam * torch.eye(kron.shape[0], dtype=torch.float64))
    _, qa = torch.linalg.eigh(a)
    _, qs = torch.linalg.eigh(s)
    q = torch.kron(qs, qa)
    second_moment = ((grads @ q) ** 2).mean(dim=0)  # (1/n) sum_i ((Q_S (x) Q_A)^T g_i)^2
    return q @ torch.diag(1.0 / (second_moment + lam)) @ q.T


def synthetic(n: int, m: int, seed: int = 0):
    """Gradients ``g_i = sum_t delta_it x_it^T`` of two Kronecker blocks (+ one without factors), their factors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"lin.lora_A": (5, 2), "lin.lora_B": (2, 4)}  # (p, q): gradients q x p
    train: dict[str, torch.Tensor] = {}
    test: dict[str, torch.Tensor] = {}
    sums: dict[str, BlockFactorSums] = {}
    for name, (p, q) in shapes.items():
        tokens = 3
        x = torch.randn(n + m, tokens, p, generator=gen, dtype=torch.float64)
        d = torch.randn(n + m, tokens, q, generator=gen, dtype=torch.float64)
        d[:, -1] = 0.0  # a padding position: no output gradient, left out of A
        g = torch.einsum("bto,bti->boi", d, x).reshape(n + m, q * p)
        train[name], test[name] = g[:n], g[n:]
        xa, da = x[:n, :2].reshape(-1, p), d[:n].reshape(-1, q)
        sums[name] = BlockFactorSums(xa.T @ xa, da.T @ da, float(xa.shape[0]))
    train["ln.weight"] = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    test["ln.weight"] = torch.randn(m, 3, generator=gen, dtype=torch.float64)
    store = GradientStore.from_tensors(train, fingerprint={"model": "toy"})
    attach_factors(store, KroneckerFactors({"model": "toy"}, shapes, sums, store.ids))
    return store, train, test, shapes


def dense_scores(train, test, factors: KroneckerFactors, lambdas, *, ekfac: bool) -> torch.Tensor:
    """Pairwise ``(m, n)``: ``- sum_l v_l^T P_l g_kl``, blocks without factors by their damped diagonal."""
    n = next(iter(train.values())).shape[0]
    total = torch.zeros(next(iter(test.values())).shape[0], n, dtype=torch.float64)
    for name, g in train.items():
        if name in factors.shapes:
            a, s = factors.input_factor(name), factors.output_factor(name)
            precond = dense_preconditioner(g, a, s, lambdas[name], ekfac=ekfac)
        else:
            precond = torch.diag(1.0 / ((g**2).mean(dim=0) + lambdas[name]))
        total -= test[name] @ precond @ g.T
    return total


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_methods_match_dense_float64_construction(method):
    store, train, test, _ = synthetic(n=9, m=3)
    factors = load_factors(store)
    pairwise = datainf.influence(store, test, method=method, mode="pairwise", batch_size=4, progress=False)
    lambdas = pairwise.settings["lambdas"]
    expected = dense_scores(train, test, factors, lambdas, ekfac=method == "ekfac")
    torch.testing.assert_close(pairwise.values, expected, rtol=1e-10, atol=1e-12)
    assert pairwise.diagnostics["kfac_diagonal_blocks"] == ["ln.weight"]
    average = datainf.influence(store, test, method=method, mode="average", batch_size=4, progress=False)
    torch.testing.assert_close(average.values, expected.mean(dim=0), rtol=1e-10, atol=1e-12)
    own = datainf.influence(store, method=method, mode="self", batch_size=4, progress=False)
    on_train = dense_scores(train, train, factors, lambdas, ekfac=method == "ekfac")
    torch.testing.assert_close(own.values, -on_train.diagonal(), rtol=1e-10, atol=1e-12)
    assert (own.values > 0).all()


def test_ekfac_differs_from_kfac_and_kfac_is_exact_for_kronecker_curvature():
    store, _, test, _ = synthetic(n=9, m=2)
    kfac = datainf.influence(store, test, method="kfac", mode="pairwise", progress=False).values
    ekfac = datainf.influence(store, test, method="ekfac", mode="pairwise", progress=False).values
    assert not torch.allclose(kfac, ekfac, rtol=1e-3)
    # one position per example and S (x) A equal to G by construction: both equal exact
    gen = torch.Generator().manual_seed(5)
    p, q, n = 3, 2, 6
    x = torch.randn(n, p, generator=gen, dtype=torch.float64)
    d = torch.randn(n, q, generator=gen, dtype=torch.float64)
    # the gradients d_a x_b^T of every pair (a, b) have G = S (x) A exactly
    pairs = torch.einsum("ao,bi->aboi", d, x).reshape(n * n, q * p)
    grads = {"w": pairs}
    pair_store = GradientStore.from_tensors(grads, fingerprint={"model": "pairs"})
    sums = {"w": BlockFactorSums(x.T @ x * n, d.T @ d * n, float(n * n))}
    attach_factors(pair_store, KroneckerFactors({"model": "pairs"}, {"w": (p, q)}, sums, pair_store.ids))
    probe = {"w": torch.randn(2, q * p, generator=gen, dtype=torch.float64)}
    exact = datainf.influence(pair_store, probe, method="exact", mode="pairwise", progress=False).values
    for method in ("kfac", "ekfac"):
        got = datainf.influence(pair_store, probe, method=method, mode="pairwise", progress=False).values
        torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- collection


def loop_factors(model, task, data) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{block: (A, S)}`` from one example at a time (no padding): plain forward hooks and autograd."""
    blocks = find_lora_blocks(model)
    modules = {b.module_name: b.module for b in blocks.blocks if b.module is not None}
    acc: dict[str, list] = {name: [0.0, 0.0, 0.0] for name in modules}
    with gradient_mode(model, blocks):
        task.setup(model)
        for ex in data:
            seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            handles = [
                module.register_forward_hook(
                    lambda mod, args, out, name=name, seen=seen: seen.__setitem__(name, (args[0], out))
                )
                for name, module in modules.items()
            ]
            try:
                loss = task.per_example_loss(model, task.collate([ex], [ex["id"]]))[0]
            finally:
                for h in handles:
                    h.remove()
            names = list(seen)
            outs = torch.autograd.grad(loss, [seen[k][1] for k in names], allow_unused=True)
            for name, go in zip(names, outs):
                x = seen[name][0].detach().reshape(-1, seen[name][0].shape[-1])
                d = torch.zeros_like(seen[name][1]) if go is None else go
                d = d.reshape(-1, d.shape[-1])
                for t in range(x.shape[0]):
                    if bool((d[t] != 0).any()):
                        acc[name][0] = acc[name][0] + torch.outer(x[t], x[t])
                        acc[name][2] += 1
                    acc[name][1] = acc[name][1] + torch.outer(d[t], d[t])
    out = {}
    for b in blocks.blocks:
        if b.module is None:
            continue
        a_sum, s_sum, count = acc[b.module_name]
        a = torch.ones(1, 1, dtype=torch.float64) if b.attr == "bias" else a_sum / count
        out[b.name] = (a, s_sum / len(data))
    return out


@pytest.fixture(scope="module")
def float64_model():
    return bert_classifier().double(), word_tokenizer()


def test_collected_factors_match_a_per_example_loop_and_any_batch_size(float64_model, tmp_path):
    model, tokenizer = float64_model
    data = classification_data(7, seed=3)
    task = SequenceClassificationTask(tokenizer)
    ram = collect_gradients(model, task, data, batch_size=3, progress=False, collect_factors=True)
    disk = collect_gradients(
        model, task, data, store=tmp_path / "g", batch_size=5, shard_size=2, progress=False, collect_factors=True
    )
    expected = loop_factors(model, SequenceClassificationTask(tokenizer), data)
    from_ram, from_disk = load_factors(ram), load_factors(GradientStore.open(tmp_path / "g"))
    assert set(from_ram.shapes) == set(expected) == set(ram.block_dims)  # every block is hooked here
    for name, (a, s) in expected.items():
        for got in (from_ram, from_disk):
            torch.testing.assert_close(got.input_factor(name), a, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got.output_factor(name), s, rtol=1e-10, atol=1e-12)
    assert (tmp_path / "g" / FACTORS_FOLDER / "index.json").is_file() and disk.is_complete
    # the store itself is unchanged by collecting factors
    plain = collect_gradients(model, task, data, batch_size=3, progress=False)
    for name, g in plain.to_dict().items():
        assert torch.equal(g, ram.to_dict()[name])


class _FailingTask(SequenceClassificationTask):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls, self.fail_on, self.collated = 0, None, 0

    def collate(self, examples, ids):
        self.collated += len(examples)
        return super().collate(examples, ids)

    def per_example_loss(self, model, batch):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt
        return super().per_example_loss(model, batch)


def _same_factors(a: KroneckerFactors, b: KroneckerFactors) -> None:
    assert set(a.ids) == set(b.ids) and a.shapes == b.shapes
    for name in a.shapes:
        torch.testing.assert_close(a.input_factor(name), b.input_factor(name), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.output_factor(name), b.output_factor(name), rtol=1e-10, atol=1e-12)


def test_interrupted_factor_collection_resumes(float64_model, tmp_path):
    model, tokenizer = float64_model
    data = classification_data(9, seed=4)
    task = _FailingTask(tokenizer)
    task.fail_on = 4
    with pytest.raises(KeyboardInterrupt):
        collect_gradients(
            model, task, data, store=tmp_path / "g", batch_size=2, shard_size=2, progress=False, collect_factors=True
        )
    with pytest.raises(StoreError, match="unfinished"):
        load_factors(GradientStore.open(tmp_path / "g"), tmp_path / "g" / FACTORS_FOLDER)
    task.fail_on, task.collated = None, 0
    store = collect_gradients(
        model, task, data, store=tmp_path / "g", batch_size=2, shard_size=2, progress=False, collect_factors=True
    )
    assert task.collated == 3  # only the examples not stored yet
    fresh = collect_gradients(
        model, SequenceClassificationTask(tokenizer), data, batch_size=4, progress=False, collect_factors=True
    )
    _same_factors(load_factors(GradientStore.open(tmp_path / "g")), load_factors(fresh))
    assert store.ids == fresh.ids


def test_factors_added_to_a_store_collected_without_them(float64_model, tmp_path):
    model, tokenizer = float64_model
    data = classification_data(6, seed=5)
    collect_gradients(model, _FailingTask(tokenizer), data, store=tmp_path / "g", progress=False)
    before = GradientStore.open(tmp_path / "g").to_dict()
    with pytest.raises(StoreError, match="collect_factors=True"):
        datainf.influence(GradientStore.open(tmp_path / "g"), before, method="ekfac", progress=False)
    task = _FailingTask(tokenizer)
    store = collect_gradients(model, task, data, store=tmp_path / "g", progress=False, collect_factors=True)
    assert task.collated == 6  # factors only: the gradients were kept
    for name, g in store.to_dict().items():
        assert torch.equal(g, before[name])
    fresh = collect_gradients(model, _FailingTask(tokenizer), data, progress=False, collect_factors=True)
    _same_factors(load_factors(store), load_factors(fresh))


def test_end_to_end_scores_match_dense_float64(float64_model):
    model, tokenizer = float64_model
    task = SequenceClassificationTask(tokenizer)
    train = collect_gradients(
        model, task, classification_data(8, seed=6), dtype="float64", progress=False, collect_factors=True
    )
    test = collect_gradients(model, task, classification_data(3, seed=7), dtype="float64", progress=False)
    factors = load_factors(train)
    grads, vectors = train.to_dict(), test.to_dict()
    for method in ("kfac", "ekfac"):
        scores = datainf.influence(train, test, method=method, mode="pairwise", progress=False)
        lambdas = scores.settings["lambdas"]
        expected = torch.zeros(3, 8, dtype=torch.float64)
        for name in scores.settings["lambdas"]:
            if lambdas[name] == 0:
                continue
            g = grads[name]
            precond = dense_preconditioner(
                g, factors.input_factor(name), factors.output_factor(name), lambdas[name], ekfac=method == "ekfac"
            )
            expected -= vectors[name] @ precond @ g.T
        torch.testing.assert_close(scores.values, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals(float64_model, tmp_path):
    model, tokenizer = float64_model
    data = classification_data(4, seed=8)
    task = _FailingTask(tokenizer)
    with pytest.raises(ConfigError, match=r"GB.*'diagonal'"):
        collect_gradients(model, task, data, progress=False, collect_factors=True, factor_memory_gb=1e-9)
    assert task.collated == 0  # refused before any work
    grads = collect_gradients(model, task, data, progress=False).to_dict()
    with pytest.raises(StoreError, match="collect_factors=True"):
        datainf.influence(grads, grads, method="kfac", progress=False)  # plain tensors carry no factors
    a = collect_gradients(model, task, data, store=tmp_path / "a", progress=False, collect_factors=True)
    other_model = bert_classifier(seed=1).double()
    collect_gradients(other_model, task, data, store=tmp_path / "b", progress=False, collect_factors=True)
    other_data = classification_data(4, seed=9)
    collect_gradients(model, task, other_data, store=tmp_path / "c", progress=False, collect_factors=True)
    for folder, pattern in (("b", "another model"), ("c", "other examples")):
        with pytest.raises(FingerprintMismatchError, match=pattern):
            datainf.influence(
                a,
                grads,
                method="ekfac",
                method_options={"factors": str(tmp_path / folder / FACTORS_FOLDER)},
                progress=False,
            )
    with pytest.raises(ConfigError, match="use ekfac"):
        datainf.influence(a, grads, method="kfac", normalize=True, progress=False)
    ok = datainf.influence(a, grads, method="ekfac", normalize=True, progress=False)
    assert torch.isfinite(ok.values).all()
    with pytest.raises(ConfigError, match="GB"):
        datainf.influence(a, grads, method="kfac", method_options={"max_memory_gb": 1e-9}, progress=False)


def test_row_labelled_conv_blocks_get_batch_invariant_factors():
    """Diffusion: one block per (LoRA tensor, timestep), 1x1 convolutions included; factors per row block."""
    from gradient_fixtures import diffusion_text_data, scheduler, unet_cond

    from datainf.gradients import DiffusionTask, DiffusionTaskConfig

    model = unet_cond().double()
    task = DiffusionTask(scheduler(), DiffusionTaskConfig(timesteps=(25, 925)))
    data = diffusion_text_data(4, seed=4)
    one = collect_gradients(model, task, data, batch_size=1, dtype="float64", progress=False, collect_factors=True)
    three = collect_gradients(model, task, data, batch_size=3, dtype="float64", progress=False, collect_factors=True)
    a, b = load_factors(one), load_factors(three)
    assert set(a.shapes) == set(one.block_dims) and any("@" in name for name in a.shapes)
    assert any("proj_in" in name for name in a.shapes)  # a conv block
    _same_factors(a, b)
    scores = datainf.influence(one, one, method="ekfac", mode="pairwise", progress=False)
    assert scores.values.shape == (4, 4) and torch.isfinite(scores.values).all()
