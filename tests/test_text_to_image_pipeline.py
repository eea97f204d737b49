"""A user's diffusers pipeline + LoRA and captioned images: loading, the task, per-example gradients, ``grads``.

Everything runs on the tiny random Stable-Diffusion-shaped pipeline of ``tiny_diffusers`` (built and
saved here, no downloads).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from datainf.data.images import load_image_records
from datainf.diffusers_io import LoRAMismatchError, PipelineLoadError, load_pipeline, lora_format
from datainf.errors import DatasetError
from datainf.tasks.diffusion import TextToImageTaskConfig, text_to_image_task
from tiny_diffusers import (  # noqa: F401 - tiny_sd is a fixture
    CAPTIONS,
    IMAGE_SIZE,
    add_unet_lora,
    save_diffusers_lora,
    save_peft_unet_lora,
    save_tiny_pipeline,
    tiny_sd,
    write_imagefolder,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def files(tiny_sd: dict[str, Path]) -> dict[str, Path]:  # noqa: F811
    return tiny_sd


def _reference_unet(pipe: Path):
    from diffusers import UNet2DConditionModel

    return add_unet_lora(UNet2DConditionModel.from_pretrained(str(pipe), subfolder="unet"), r=2, seed=1).eval()


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 8, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def test_pipeline_folder_layout(files):
    folder = files["pipe"]
    assert (folder / "model_index.json").is_file()
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in folder.iterdir()}
    loaded = load_pipeline(folder)
    assert loaded.lora is None and loaded.resolution == IMAGE_SIZE
    assert type(loaded.pipeline).__name__ == "StableDiffusionPipeline"
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_lora_formats_load_the_same_adapter(files, tmp_path):
    """Every LoRA layout diffusers / peft / kohya write gives the UNet the adapter that was saved."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = files["pipe"]
    ref = _reference_unet(pipe)
    want = _unet_out(ref)
    assert not torch.allclose(want, _unet_out(load_pipeline(pipe).unet))  # the LoRA changes the output

    ref.save_lora_adapter(str(tmp_path / "unet-only"))  # keys without the "unet." prefix
    kohya = {f"lora_unet_{k}": v for k, v in convert_state_dict_to_kohya(get_peft_model_state_dict(ref)).items()}
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    sources = {
        "diffusers": files["lora"],  # the file itself
        "unet": tmp_path / "unet-only",
        "kohya": tmp_path / "kohya.safetensors",
    }
    for fmt, source in [*sources.items(), ("diffusers", files["lora"].parent)]:
        loaded = load_pipeline(pipe, lora=source)
        assert loaded.lora_format == fmt == lora_format(source)
        torch.testing.assert_close(_unet_out(loaded.unet), want, rtol=1e-5, atol=1e-6, msg=fmt)

    # a peft adapter folder (lora_alpha != r): the same output as peft's own loader
    from diffusers import UNet2DConditionModel

    peft_dir = save_peft_unet_lora(pipe, tmp_path / "peft", r=2, alpha=4.0)
    peft_model = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(str(pipe), subfolder="unet"), peft_dir)
    loaded = load_pipeline(pipe, lora=peft_dir)
    assert loaded.lora_format == "peft"
    torch.testing.assert_close(_unet_out(loaded.unet), _unet_out(peft_model.eval()), rtol=1e-5, atol=1e-6)


def test_bad_pipelines_and_loras(files, tmp_path):
    pipe = files["pipe"]
    bad = save_diffusers_lora(pipe, tmp_path / "other", block_out_channels=(8, 32))
    with pytest.raises(LoRAMismatchError, match=r"does not fit this pipeline's UNet .*mid_block.*in size is 32"):
        load_pipeline(pipe, lora=bad)
    with pytest.raises(PipelineLoadError, match="holds no model_index.json.*single model"):
        load_pipeline(pipe / "unet")
    with pytest.raises(PipelineLoadError, match="holds no model_index.json.*pass it as the adapter"):
        load_pipeline(files["lora"].parent)
    with pytest.raises(PipelineLoadError, match="not a folder on this machine"):
        load_pipeline("runwayml/stable-diffusion-v1-5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineLoadError, match="neither pytorch_lora_weights.safetensors nor a peft adapter"):
        load_pipeline(pipe, lora=tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(PipelineLoadError, match="not a .safetensors file"):
        load_pipeline(pipe, lora=tmp_path / "w.bin")


def test_imagefolder_and_parquet_records(files, tmp_path):
    import pandas as pd
    from PIL import Image

    records = load_image_records(files["images"])
    assert [r["id"] for r in records] == list(CAPTIONS)
    assert [r["prompt"] for r in records] == list(CAPTIONS.values())
    assert all(isinstance(r["image"], Image.Image) and r["image"].mode == "RGB" for r in records)

    # Parquet as datasets writes an Image feature ({"bytes", "path"}), raw bytes, and paths
    blobs = [(files["images"] / name).read_bytes() for name in CAPTIONS]
    frame = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "caption": list(CAPTIONS.values()),
            "image": [{"bytes": b, "path": None} for b in blobs],
        }
    )
    frame.to_parquet(tmp_path / "structs.parquet")
    frame.assign(image=blobs).to_parquet(tmp_path / "bytes.parquet")
    frame.assign(image=[str(files["images"] / n) for n in CAPTIONS]).to_parquet(tmp_path / "paths.parquet")
    for name in ("structs", "bytes", "paths"):
        got = load_image_records(tmp_path / f"{name}.parquet")
        assert [r["id"] for r in got] == ["a", "b", "c", "d"] and got[2]["prompt"] == "an image in blue style"
        for r, ref in zip(got, records, strict=True):
            assert np.array_equal(np.asarray(r["image"]), np.asarray(ref["image"])), name


def test_bad_image_data(files, tmp_path):
    folder = write_imagefolder(tmp_path / "broken", {"ok.png": "a cat", "bad.png": "a dog", "gone.png": "a dog"})
    (folder / "bad.png").write_bytes(b"not a png")
    (folder / "gone.png").unlink()
    with pytest.raises(DatasetError, match=r"2 image\(s\) do not open: bad.png .*gone.png"):
        load_image_records(folder)

    rows = [{"file_name": "cat.png", "text": "a cat"}, {"file_name": "dog.png"}, {"file_name": "x.png", "text": " "}]
    (files["images"] / "metadata.jsonl").rename(tmp_path / "kept.jsonl")
    try:
        (files["images"] / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(
            DatasetError, match=r"2 image\(s\) have no caption in column 'text': \['dog.png', 'x.png'\]"
        ):
            load_image_records(files["images"])
        with pytest.raises(DatasetError, match=r"caption column 'title' does not exist"):
            load_image_records(files["images"], caption_column="title")
    finally:
        (tmp_path / "kept.jsonl").replace(files["images"] / "metadata.jsonl")
    (tmp_path / "bare").mkdir()
    with pytest.raises(DatasetError, match="without metadata.jsonl"):
        load_image_records(tmp_path / "bare")


def test_task_encodes_through_the_pipeline(files):
    """Prompt states are the pipeline's encode_prompt; latents its VAE's mean times scaling_factor."""
    from PIL import Image

    loaded = load_pipeline(files["pipe"], lora=files["lora"])
    task = text_to_image_task(loaded)
    assert task.config.resolution == IMAGE_SIZE and task.row_labels() == tuple(
        f"t{t}" for t in (25, 225, 425, 525, 725, 925)
    )
    records = load_image_records(files["images"])
    records[1]["image"] = records[1]["image"].resize((24, 20))  # another size: resized then centre-cropped
    task.setup(loaded.unet)
    batch = task.collate(records, [r["id"] for r in records])
    assert tuple(batch.inputs["pixel_values"].shape) == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ctx = loaded.text_encoder(batch.inputs["prompt_ids"])[0]
        embeds, _ = loaded.pipeline.encode_prompt([r["prompt"] for r in records], "cpu", 1, False)
        torch.testing.assert_close(ctx, embeds)
        px = np.asarray(Image.open(files["images"] / "cat.png").convert("RGB"), dtype=np.float32) / 127.5 - 1
        expect = torch.from_numpy(px).permute(2, 0, 1)
        torch.testing.assert_close(batch.inputs["pixel_values"][0], expect)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_per_example_gradients_match_a_float64_loop(files, prediction_type):
    from diffusers import DDPMScheduler

    from datainf.tasks.diffusion import TextToImageTask
    from datainf.testing import check_per_example_gradients

    loaded = load_pipeline(files["pipe"], lora=files["lora"], dtype="float64")
    scheduler = DDPMScheduler.from_config(loaded.scheduler.config, prediction_type=prediction_type)
    task = TextToImageTask(
        scheduler,
        TextToImageTaskConfig(timesteps=(25, 525, 925), resolution=IMAGE_SIZE, seed=3),
        vae=loaded.vae,
        text_encoder=loaded.text_encoder,
        tokenizer=loaded.tokenizer,
    )
    records = load_image_records(files["images"])[:3]
    report = check_per_example_gradients(loaded.unet, task, records, rtol=1e-9)
    assert report.ok and len(report.errors) == 3 * 64 and not report.fallback_blocks


def test_grads_command_end_to_end(files, tmp_path):
    """`datainf grads --kind text-to-image` on the pipeline folder, the LoRA file and the imagefolder."""
    from datainf.cli import main
    from datainf.gradients import find_lora_blocks
    from datainf.store import GradientStore
    from datainf.testing import loop_gradients

    out = tmp_path / "grads"
    argv = ["grads", "--kind", "text-to-image", "--model", str(files["pipe"]), "--adapter", str(files["lora"])]
    argv += ["--grad-batch-size", "3"]
    rc = main([*argv, "--data", str(files["images"]), "--out", str(out)])
    assert rc == 0
    store = GradientStore.open(out)
    assert store.ids == list(CAPTIONS)
    assert len(store.block_dims) == 64 * 6 and all("@t" in name for name in store.block_dims)

    # the stored gradient of one example is the plain autograd gradient of its denoising loss
    loaded = load_pipeline(files["pipe"], lora=files["lora"])
    task = text_to_image_task(loaded)
    blocks = find_lora_blocks(loaded.unet)
    records = load_image_records(files["images"])
    params = {b.name: b.parameter.requires_grad_(True) for b in blocks}
    task.setup(loaded.unet)
    _, ref = loop_gradients(loaded.unet, task, records[2:3], ["sub/blue.png"], params, torch.device("cpu"))
    stored = store.to_dict()
    row = store.ids.index("sub/blue.png")
    assert set(stored) == set(ref)
    for name in ref:
        torch.testing.assert_close(stored[name][row].float(), ref[name][0].float(), rtol=1e-4, atol=1e-7)

    # bad data is refused before the pipeline is loaded
    broken = write_imagefolder(tmp_path / "broken", {"a.png": "a cat", "b.png": "a dog"})
    (broken / "b.png").write_bytes(io.BytesIO(b"junk").getvalue())
    assert main([*argv, "--data", str(broken), "--out", str(tmp_path / "g2")]) != 0


def test_gradient_checkpointing_gives_the_same_gradients(files):
    """A UNet with diffusers' activation checkpointing switched on (as a training script leaves it) gives
    the per-example gradients of the same UNet without it, and keeps its setting afterwards."""
    from datainf.gradients import collect_gradients

    loaded = load_pipeline(files["pipe"], lora=files["lora"], dtype="float64")
    task = text_to_image_task(loaded, config=TextToImageTaskConfig(timesteps=(25, 525), resolution=IMAGE_SIZE))
    records = load_image_records(files["images"])
    plain = collect_gradients(loaded.unet, task, records, batch_size=4, progress=False).to_dict()
    loaded.unet.enable_gradient_checkpointing()
    try:
        checkpointed = collect_gradients(loaded.unet, task, records, batch_size=4, progress=False).to_dict()
        assert loaded.unet.is_gradient_checkpointing
    finally:
        loaded.unet.disable_gradient_checkpointing()
    assert set(checkpointed) == set(plain)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-12, atol=0.0)


def test_task_fingerprint_names_the_components_not_their_folder(files, tmp_path):
    import shutil

    moved = shutil.copytree(files["pipe"], tmp_path / "elsewhere")
    a = text_to_image_task(load_pipeline(files["pipe"])).describe()
    other = load_pipeline(moved)
    assert text_to_image_task(other).describe() == a and str(tmp_path) not in a
    assert a.startswith("TextToImageTask{") and '"resolution": 16' in a and "scheduler=DDPMScheduler" in a
    with torch.no_grad():
        next(other.text_encoder.parameters()).add_(1.0)  # another text encoder: another task
    assert text_to_image_task(other).describe() != a
