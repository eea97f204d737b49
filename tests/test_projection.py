"""Projected (compressed) gradients: the sketches the hooks form equal the projected full gradient (float64),
the projection is recorded and checked, and every consumer (store, on-the-fly source, influence) agrees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gradient_fixtures import bert_classifier, classification_data, llama_lm, lm_data, word_tokenizer
from peft import LoraConfig, get_peft_model
from torch import nn

import datainf
from datainf.errors import ConfigError, ProjectionMismatchError, StoreMismatchError
from datainf.gradients import (
    CausalLMTask,
    OnTheFlyGradients,
    SequenceClassificationTask,
    collect_gradients,
    find_lora_blocks,
)
from datainf.gradients.projection import (
    PROJECTION_KEY,
    GradientProjector,
    ProjectionConfig,
    kron_sides,
    side_seed,
)
from datainf.store import GradientStore
from datainf.tasks import GradientTask, TaskBatch


def _reference(projector: GradientProjector, block: Any, full: torch.Tensor) -> torch.Tensor:
    """``vec(G) @ (P_out kron P_in)``: the projection applied to the full flattened gradient, built independently
    of the projector's own application code (only its matrices are read)."""
    kind, k_out, k_in = projector.block_plan(block.name)
    if kind == "identity":
        return full
    if kind == "dense":
        return full @ projector.matrix(block.name, "dense")
    out = block.shape[0]
    inn = full.shape[1] // out if block.attr == "weight" else 1
    p_out = projector.matrix(block.module_name, "out") if k_out else torch.eye(out, dtype=torch.float64)
    if block.attr == "bias":
        return full @ p_out
    p_in = projector.matrix(block.module_name, "in") if k_in else torch.eye(inn, dtype=torch.float64)
    return full @ torch.kron(p_out, p_in)


def _check_against_full(model: nn.Module, task: GradientTask, data: list[dict[str, Any]], dim: int) -> None:
    model = model.double()
    config = ProjectionConfig(dim=dim, seed=3)
    full = collect_gradients(model, task, data, batch_size=3, dtype="float64", progress=False).to_dict()
    sketched = collect_gradients(model, task, data, batch_size=3, dtype="float64", progress=False, projection=config)
    blocks = find_lora_blocks(model).blocks
    projector = GradientProjector(config, blocks)
    assert sketched.block_dims == projector.block_dims()
    rows = sketched.to_dict()
    kinds = set()
    for block in blocks:
        kinds.add(projector.block_plan(block.name)[0])
        assert rows[block.name].dtype == torch.float64
        assert rows[block.name].shape[1] <= max(dim, block.numel if block.numel <= dim else 0)
        expected = _reference(projector, block, full[block.name])
        torch.testing.assert_close(rows[block.name], expected, rtol=1e-10, atol=1e-12, msg=block.name)
        # the formed-gradient path (conv modules, stored blocks) gives the same numbers
        torch.testing.assert_close(
            projector.project_rows(block.name, full[block.name]), expected, rtol=1e-10, atol=1e-12
        )
    assert "kron" in kinds


def test_llama_lora_sketches_equal_the_projected_full_gradient_float64() -> None:
    """lora_A (4 x 32): its activation side goes to 8; lora_B (32 x 4): its output side goes to 8 (k = 32)."""
    model = llama_lm()
    _check_against_full(model, CausalLMTask(word_tokenizer("lm")), lm_data(7, seed=2), dim=32)
    projector = GradientProjector(ProjectionConfig(dim=32), find_lora_blocks(model).blocks)
    a = next(b for b in find_lora_blocks(model).blocks if "lora_A" in b.name)
    b = next(b for b in find_lora_blocks(model).blocks if "lora_B" in b.name)
    assert projector.block_plan(a.name) == ("kron", None, 8) and projector.block_plan(b.name) == ("kron", 8, None)


def test_bert_with_a_trained_head_float64() -> None:
    """The classifier head (3 x 32 weight, 3 bias) next to the LoRA blocks: bias kept, weight's input side projected."""
    model = bert_classifier()
    _check_against_full(model, SequenceClassificationTask(word_tokenizer()), classification_data(7, seed=1), dim=40)


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.hidden(x)))).squeeze(-1)


class _Squared(GradientTask):
    def collate(self, examples: Any, ids: Any) -> TaskBatch:
        x = torch.tensor([ex["x"] for ex in examples], dtype=torch.float64)
        return TaskBatch(ids=list(ids), inputs={"x": x, "y": torch.tensor([ex["y"] for ex in examples])})

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        return 0.5 * (model(batch.inputs["x"]) - batch.inputs["y"].to(torch.float64)) ** 2


def _records(n: int, seed: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(6, generator=gen).tolist(), "y": float(torch.randn(1, generator=gen))} for i in range(n)]


@pytest.mark.filterwarnings("ignore:.*per-example autograd loop")
def test_fallback_blocks_get_a_dense_projection_float64() -> None:
    torch.manual_seed(0)
    config = LoraConfig(r=3, target_modules=["hidden"], modules_to_save=["norm", "head"], init_lora_weights=False)
    model = get_peft_model(_Normed(), config)
    blocks = find_lora_blocks(model).blocks
    assert any(not b.hooked for b in blocks)  # the LayerNorm's tensors
    _check_against_full(model, _Squared(), _records(6, 0), dim=5)
    projector = GradientProjector(ProjectionConfig(dim=5), blocks)
    norm_weight = next(b for b in blocks if b.name.endswith("norm.modules_to_save.default.weight"))
    assert projector.block_plan(norm_weight.name)[0] == "dense"


def test_side_choice() -> None:
    assert kron_sides(8, 5120, 1024) == (None, 128)  # lora_A of a 13B model: activation side only
    assert kron_sides(5120, 8, 1024) == (128, None)  # lora_B: output side only
    assert kron_sides(8, 64, 1024) == (None, None)  # small enough: kept as it is
    assert kron_sides(384, 384, 1024) == (32, 32)  # a square head layer: both sides
    assert kron_sides(8, 100, 32) == (5, 5)  # k < r^2: the rank side too


def test_sketch_preserves_inner_products_in_expectation() -> None:
    """Johnson-Lindenstrauss: ``E ||P^T v||^2 = ||v||^2`` and inner products are kept up to O(1/sqrt(k))."""

    class Fake:
        name, module_name, attr, shape, hooked = "w", "m", "weight", (8, 512), True

    projector = GradientProjector(ProjectionConfig(dim=1024, seed=1), [Fake()])
    assert projector.block_dims() == {"w": 1024}
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(300, 8 * 512, generator=gen, dtype=torch.float64)
    sketch = projector.project_rows("w", v)
    ratio = sketch.square().sum(1) / v.square().sum(1)
    assert abs(float(ratio.mean()) - 1.0) < 0.02 and float(ratio.std()) < 0.1
    shared = v[:50] + v[50:100]  # pairs with inner product ~ ||v||^2 / 2 ... correlation 0.5
    cos_full = torch.nn.functional.cosine_similarity(shared, v[:50])
    cos_sketch = torch.nn.functional.cosine_similarity(projector.project_rows("w", shared), sketch[:50])
    assert float((cos_full - cos_sketch).abs().max()) < 0.1


def test_seeds_are_deterministic_and_per_side() -> None:
    assert side_seed(0, "m", "in") == side_seed(0, "m", "in")
    assert (
        len({side_seed(0, "m", "in"), side_seed(1, "m", "in"), side_seed(0, "m", "out"), side_seed(0, "n", "in")}) == 4
    )
    blocks = find_lora_blocks(llama_lm()).blocks
    a, b = GradientProjector(ProjectionConfig(16, 0), blocks), GradientProjector(ProjectionConfig(16, 0), blocks)
    name = next(x.module_name for x in blocks if "lora_A" in x.name)
    assert torch.equal(a.matrix(name, "in"), b.matrix(name, "in"))
    assert not torch.equal(a.matrix(name, "in"), GradientProjector(ProjectionConfig(16, 1), blocks).matrix(name, "in"))
    assert a.matrix_numbers() == sum(x.numel for x in blocks)  # every (S, 4) LoRA block: one (S, 4) matrix


@pytest.fixture(scope="module")
def lm() -> tuple[nn.Module, CausalLMTask, list[dict[str, Any]], list[dict[str, Any]]]:
    return llama_lm(), CausalLMTask(word_tokenizer("lm")), lm_data(10, seed=0), lm_data(3, seed=1)


def test_store_records_the_projection_and_refuses_another_on_resume(lm, tmp_path: Path) -> None:
    model, task, train, _ = lm
    config = ProjectionConfig(dim=32, seed=7)
    store = collect_gradients(model, task, train, store=tmp_path / "s", projection=config, progress=False)
    again = GradientStore.open(tmp_path / "s")
    assert again.fingerprint[PROJECTION_KEY] == "kron-gaussian-v1:dim=32:seed=7" == store.fingerprint[PROJECTION_KEY]
    assert sum(again.block_dims.values()) == 32 * len(again.block_dims)
    plain = collect_gradients(model, task, train, progress=False)
    assert PROJECTION_KEY not in plain.fingerprint  # unprojected fingerprints are unchanged
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        collect_gradients(
            model, task, train, store=tmp_path / "s", projection=ProjectionConfig(dim=32, seed=8), progress=False
        )


def test_train_and_test_with_different_projections_are_refused(lm) -> None:
    model, task, train, test = lm
    p0, p1 = ProjectionConfig(dim=32, seed=0), ProjectionConfig(dim=32, seed=1)
    train0 = collect_gradients(model, task, train, projection=p0, progress=False)
    test1 = collect_gradients(model, task, test, projection=p1, progress=False)
    with pytest.raises(ProjectionMismatchError, match="dim=32:seed=0.*dim=32:seed=1"):
        datainf.influence(train0, test1, progress=False)
    plain_test = collect_gradients(model, task, test, progress=False)
    with pytest.raises(
        ProjectionMismatchError, match="'kron-gaussian-v1:dim=32:seed=0' but test gradients with 'none'"
    ):
        datainf.influence(train0, plain_test, progress=False)
    source = OnTheFlyGradients(model, task, train, projection=ProjectionConfig(dim=16, seed=0), progress=False)
    with pytest.raises(ProjectionMismatchError, match="dim=16"):
        datainf.influence(source, collect_gradients(model, task, test, projection=p0, progress=False), progress=False)


def test_on_the_fly_projection_equals_the_projected_store(lm) -> None:
    model, task, train, test = lm
    config = ProjectionConfig(dim=24, seed=2)
    store = collect_gradients(model, task, train, batch_size=4, projection=config, progress=False)
    test_store = collect_gradients(model, task, test, projection=config, progress=False)
    source = OnTheFlyGradients(model, task, train, batch_size=3, projection=config, progress=False)
    assert source.block_dims == store.block_dims and source.fingerprint == store.fingerprint
    expected = datainf.influence(store, test_store, progress=False)
    actual = datainf.influence(source, test_store, progress=False)
    scale = float(expected.values.abs().max())
    torch.testing.assert_close(actual.values, expected.values, rtol=1e-4, atol=1e-6 * scale)


def test_bad_projection_settings_are_refused(lm) -> None:
    model, task, train, _ = lm
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="projection dimension"):
            ProjectionConfig(dim=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed"):
        ProjectionConfig(dim=4, seed=-1)
    with pytest.raises(ConfigError, match="collect_factors and a projection"):
        collect_gradients(model, task, train, projection=ProjectionConfig(dim=8), collect_factors=True, progress=False)
    assert ProjectionConfig.from_dict({"dim": 8, "seed": 1}) == ProjectionConfig(8, 1)


def test_unet_conv_lora_and_timestep_blocks_float64() -> None:
    """Convolution LoRA (formed-gradient path) and per-timestep row blocks, against the projected full gradient."""
    from gradient_fixtures import diffusion_text_data, scheduler, unet_cond

    from datainf.gradients import DiffusionTask, DiffusionTaskConfig

    model = unet_cond().double()
    task = DiffusionTask(scheduler(), DiffusionTaskConfig(timesteps=(25, 925)))
    data = diffusion_text_data(2, seed=4)
    config = ProjectionConfig(dim=12, seed=5)
    full = collect_gradients(model, task, data, batch_size=2, dtype="float64", progress=False).to_dict()
    sketched = collect_gradients(
        model, task, data, batch_size=2, dtype="float64", progress=False, projection=config
    ).to_dict()
    blocks = find_lora_blocks(model).blocks
    projector = GradientProjector(config, blocks)
    conv = [b for b in blocks if isinstance(b.module, nn.Conv2d)]
    assert conv and any(projector.block_plan(b.name)[0] == "kron" for b in conv)
    for block in blocks:
        for row in ("t25", "t925"):
            name = f"{block.name}@{row}"
            expected = _reference(projector, block, full[name])
            torch.testing.assert_close(sketched[name], expected, rtol=1e-9, atol=1e-12, msg=name)
