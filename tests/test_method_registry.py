"""One method registry everywhere: a method added with ``register_method`` works at every entry point."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import torch

import datainf
from datainf.errors import ConfigError
from datainf.methods import (
    InfluenceMethod,
    MethodContext,
    Preconditioned,
    available_methods,
    check_method_names,
    get_method,
    register_method,
    unknown_methods,
    unregister_method,
)
from datainf.store import GradientStore

DIMS = {"layer.lora_A": 6, "layer.lora_B": 4}


class ScaledHessianFree(InfluenceMethod):
    """A toy method: ``R_l = factor * V_l`` (Hessian-free scaled), with one option."""

    name = "toy_scaled"
    passes_description = "0 passes"

    from dataclasses import dataclass as _dataclass

    @_dataclass(frozen=True)
    class Options:
        """factor: the scale of the test gradients."""

        factor: float = 2.0

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        return Preconditioned({b: self.options.factor * test[b] for b in ctx.blocks})


@pytest.fixture
def toy() -> Iterator[str]:
    register_method(ScaledHessianFree)
    try:
        yield ScaledHessianFree.name
    finally:
        unregister_method(ScaledHessianFree.name)


def gradients(n: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {b: torch.randn(n, d, generator=generator, dtype=torch.float64) for b, d in DIMS.items()}


def test_registry_lists_and_unregisters(toy):
    assert toy in available_methods() and {"datainf", "exact", "lissa", "hessian_free", "diagonal"} <= set(
        available_methods()
    )
    assert unknown_methods(["toy-scaled", "Exact", "magic"]) == ["magic"]
    assert check_method_names(["toy-scaled", "datainf"]) == ("toy_scaled", "datainf")
    with pytest.raises(ValueError, match="already registered"):
        register_method(ScaledHessianFree)
    with pytest.raises(ConfigError, match="no option"):
        get_method(toy, {"scale": 3})


def test_unregistered_name_is_refused_everywhere_after_removal():
    register_method(ScaledHessianFree)
    unregister_method("toy_scaled")
    assert "toy_scaled" not in available_methods()
    with pytest.raises(ConfigError, match="Unknown influence method"):
        datainf.influence(gradients(5, 0), gradients(2, 1), method="toy_scaled", progress=False)
    with pytest.raises(ConfigError, match="No influence method named"):
        unregister_method("toy_scaled")
    for bad in ([], ["datainf", "datainf"], ["magic"]):
        with pytest.raises(ConfigError):
            check_method_names(bad)


def test_toy_method_through_influence_and_config(toy):
    train, test = gradients(9, 0), gradients(3, 1)
    plain = datainf.influence(train, test, method="hessian_free", mode="pairwise", progress=False)
    scaled = datainf.influence(train, test, method=toy, mode="pairwise", method_options={"factor": 3.0}, progress=False)
    assert scaled.method == toy and scaled.settings["method_options"] == {"factor": 3.0}
    torch.testing.assert_close(scaled.values, 3.0 * plain.values, rtol=1e-12, atol=1e-12)
    config = datainf.InfluenceConfig(method=toy)
    from_config = datainf.influence_from_config(train, test, config, progress=False)
    torch.testing.assert_close(from_config.values, 2.0 * plain.values.mean(dim=0), rtol=1e-12, atol=1e-12)


def test_toy_method_gets_self_influence_from_the_default(toy):
    """A method with only ``precondition`` still has ``mode="self"``: its training rows are preconditioned in chunks."""
    train = gradients(9, 0)
    scores = datainf.influence(train, method=toy, mode="self", batch_size=4, progress=False)
    expected = 2.0 * sum(t.square().sum(dim=1) for t in train.values())
    torch.testing.assert_close(scores.values, expected, rtol=1e-12, atol=1e-12)
    assert scores.diagnostics["passes"] == 1  # the chunks read once; the toy makes no pass of its own


def test_toy_method_through_the_cli(toy, tmp_path, capsys):
    from datainf.cli import main
    from datainf.scores import Scores

    for name, n, seed in (("train", 8, 0), ("test", 2, 1)):
        store = GradientStore.create(tmp_path / name, block_dims=DIMS, dtype="float64", fingerprint={"model": "toy"})
        store.append([f"{name}{i}" for i in range(n)], gradients(n, seed))
        store.finalize()
    code = main(
        [
            "score",
            "--train-grads",
            str(tmp_path / "train"),
            "--test-grads",
            str(tmp_path / "test"),
            "--method",
            "toy-scaled,hessian_free",
            "--out",
            str(tmp_path / "s"),
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    toy_scores = Scores.load(tmp_path / "s" / "scores-toy_scaled.safetensors")
    plain = Scores.load(tmp_path / "s" / "scores-hessian_free.safetensors")
    assert toy_scores.method == toy and toy_scores.train_ids == [f"train{i}" for i in range(8)]
    torch.testing.assert_close(toy_scores.values, 2.0 * plain.values, rtol=1e-12, atol=1e-12)
    code = main(
        [
            "score",
            "--train-grads",
            str(tmp_path / "train"),
            "--test-grads",
            str(tmp_path / "test"),
            "--method",
            "magic",
            "--out",
            str(tmp_path / "s2"),
            "-q",
        ]
    )
    assert code == 2 and "toy_scaled" in capsys.readouterr().err  # the refusal lists the registered toy


def test_toy_method_in_the_explain_configs(toy):
    from datainf.explain.text_generation import TextGenerationConfig
    from datainf.explain.text_to_image import TextToImageConfig

    assert TextGenerationConfig(methods=("datainf", toy)).methods == ("datainf", toy)
    assert TextToImageConfig(methods=(toy,)).methods == (toy,)
    with pytest.raises(ConfigError, match="magic"):
        TextGenerationConfig(methods=("magic",))
    with pytest.raises(ConfigError, match="toy_scaled"):  # the message lists what is registered
        TextToImageConfig(methods=("magic",))


def test_toy_method_in_score_and_evaluate(toy):
    import numpy as np

    from datainf.explain.common import score_and_evaluate

    train, test = GradientStore.from_tensors(gradients(8, 0)), GradientStore.from_tensors(gradients(4, 1))
    classes = np.arange(8) % 2
    scores, metrics = score_and_evaluate(train, test, classes, np.arange(4) % 2, methods=(toy,), progress=False)
    assert list(scores) == [toy] and metrics[0]["method"] == toy
    with pytest.raises(ConfigError, match="magic"):
        score_and_evaluate(train, test, classes, np.arange(4) % 2, methods=("magic",), progress=False)


def test_demo_accepts_any_registered_method(toy, monkeypatch, tmp_path):
    """The demo validates its method list against the registry before any work (data loading is stubbed out)."""
    import datainf.data.bbc as bbc
    from datainf.demos import run_mislabel_demo

    class Reached(Exception):
        pass

    def stop(**_: object) -> None:
        raise Reached

    monkeypatch.setattr(bbc, "load_bbc_news", stop)
    with pytest.raises(Reached):  # validation passed: the demo went on to load its data
        run_mislabel_demo(out_dir=tmp_path, methods=("datainf", toy), progress=False)
    with pytest.raises(ConfigError, match="magic"):
        run_mislabel_demo(out_dir=tmp_path, methods=("magic",), progress=False)
