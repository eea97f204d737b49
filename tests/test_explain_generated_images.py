"""``explain_images``: generate with a user's pipeline + LoRA, score the generated image against the training store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from datainf.data.images import load_image_records
from datainf.diffusers_io import load_pipeline
from datainf.errors import DatasetError, FingerprintMismatchError
from datainf.explain.generated_images import explain_images, generate_images
from datainf.gradients import collect_gradients, find_lora_blocks
from datainf.reference import reference_datainf_dense, reference_lambdas
from datainf.tasks.diffusion import TextToImageTaskConfig, text_to_image_task
from datainf.testing import loop_gradients
from tiny_diffusers import CAPTIONS, save_diffusers_lora, tiny_sd  # noqa: F401 - tiny_sd is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = TextToImageTaskConfig(timesteps=(100, 600), seed=5, resolution=16)


@pytest.fixture(scope="module")
def setup(tiny_sd: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    """The tiny pipeline + LoRA and the training store of its imagefolder (recipe :data:`RECIPE`)."""
    root = tmp_path_factory.mktemp("explain_images")
    loaded = load_pipeline(tiny_sd["pipe"], lora=tiny_sd["lora"])
    store = collect_gradients(
        loaded.unet,
        text_to_image_task(loaded, config=RECIPE),
        load_image_records(tiny_sd["images"]),
        store=root / "grads",
        progress=False,
    )
    return {**tiny_sd, "root": root, "loaded": loaded, "store": store}


def test_explain_images_writes_the_generation_beside_its_training_images(setup, tmp_path):
    prompts = ["a red cat", "a sks dog"]
    result = explain_images(
        pipeline=setup["loaded"],
        train_store=setup["root"] / "grads",
        train_data=setup["images"],
        prompts=prompts,
        out=tmp_path / "out",
        k=2,
        steps=2,
        guidance_scale=2.0,
        seed=7,
    )
    assert result.prompts == prompts and len(result.images) == 2
    assert tuple(result.scores.values.shape) == (2, 4) and result.scores.train_ids == list(CAPTIONS)
    for i in range(2):
        row = result.scores.values[i]
        assert [s for _, s in result.helpful[i]] == sorted(row.tolist())[:2]
        assert [s for _, s in result.harmful[i]] == sorted(row.tolist(), reverse=True)[:2]

    # the scores are DataInf's (float64 dense reference) on the generated image's plain autograd gradient,
    # with the training store's recipe (timesteps, seed) read back from its fingerprint
    loaded = setup["loaded"]
    from PIL import Image

    generated = [
        {"id": f"generated-{i}", "prompt": p, "image": Image.open(tmp_path / "out" / f"generated-{i}.png")}
        for i, p in enumerate(prompts)
    ]
    np.testing.assert_array_equal(np.asarray(generated[0]["image"]), np.asarray(result.images[0]))
    task = text_to_image_task(loaded, config=RECIPE)
    blocks = find_lora_blocks(loaded.unet)
    params = {b.name: b.parameter.requires_grad_(True) for b in blocks}
    task.setup(loaded.unet)
    _, test = loop_gradients(loaded.unet, task, generated, [g["id"] for g in generated], params, torch.device("cpu"))
    for p in params.values():
        p.requires_grad_(False)
    train = setup["store"].to_dict()
    want = reference_datainf_dense(train, test, reference_lambdas(train, 0.1))
    torch.testing.assert_close(result.scores.values.double(), want, rtol=2e-3, atol=1e-6 * float(want.abs().max()))

    page = (tmp_path / "out" / "explain.html").read_text()
    assert page.count("<h2>") == 2 and "Most helpful" in page and "data:image/png;base64," in page
    saved = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert [g["prompt"] for g in saved["generations"]] == prompts
    first = saved["generations"][0]
    assert first["image"] == "generated-0.png" and len(first["helpful"]) == len(first["harmful"]) == 2
    assert first["helpful"][0]["prompt"] == CAPTIONS[first["helpful"][0]["id"]]
    assert (tmp_path / "out" / "scores.safetensors").is_file()


def test_generation_is_seeded_per_prompt(setup):
    loaded = setup["loaded"]
    a = generate_images(loaded, ["a cat", "a dog"], steps=2, seed=3)
    b = generate_images(loaded, ["a dog"], steps=2, seed=4)  # prompt 1 of the first call had seed 3 + 1
    assert a[0].size == (16, 16)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[0]))


def test_explain_refuses_a_store_of_another_lora_and_missing_training_images(setup, tmp_path):
    other = load_pipeline(setup["pipe"], lora=save_diffusers_lora(setup["pipe"], tmp_path / "other", seed=9))
    with pytest.raises(FingerprintMismatchError, match="another pipeline \\(UNet\\) and LoRA"):
        explain_images(
            pipeline=other,
            train_store=setup["store"],
            train_data=setup["images"],
            prompts=["a cat"],
            out=tmp_path / "o1",
            steps=1,
        )
    few = load_image_records(setup["images"])[:2]
    with pytest.raises(DatasetError, match=r"2 training id\(s\) of the gradient store are not in the training data"):
        explain_images(
            pipeline=setup["loaded"], train_store=setup["store"], train_data=few, prompts=["a cat"], out=tmp_path / "o2"
        )


def test_the_explain_command_explains_images(setup, tmp_path, capsys):
    """``datainf explain --kind text-to-image``: the command's settings reach explain_images, the generated image
    is written beside its training images, and explanations.json lists them (positive influence = harmful)."""
    from datainf.cli import main

    (tmp_path / "prompts.jsonl").write_text('{"id": "p1", "prompt": "a blue dog"}\n')
    out = tmp_path / "out"
    argv = [
        "explain", "--kind", "text-to-image", "--model", str(setup["pipe"]), "--adapter", str(setup["lora"]),
        "--train-store", str(setup["root"] / "grads"), "--train-data", str(setup["images"]),
        "--prompts", str(tmp_path / "prompts.jsonl"), "--prompt", "a cat", "--k", "2", "--grad-batch-size", "2",
        "--out", str(out), "-q",
    ]  # fmt: skip
    code = main(argv)
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "explanations.json").read_text())
    explanations = summary["explanations"]
    assert summary["n_train"] == 4 and [e["id"] for e in explanations] == ["p1", "prompt"]
    assert [e["prompt"] for e in explanations] == ["a blue dog", "a cat"]
    first = explanations[0]
    assert first["generated"] and first["extra"]["image"] == "generated-0.png"
    assert (out / "generated-1.png").is_file() and (out / "explain.html").is_file()
    assert len(first["helpful"]) == len(first["harmful"]) == 2
    influences = [e["influence"] for e in first["helpful"]] + [e["influence"] for e in reversed(first["harmful"])]
    assert influences == sorted(influences)
    assert first["helpful"][0]["text"] == CAPTIONS[first["helpful"][0]["id"]]
    assert first["extra"]["helpful_images"][0] == first["helpful"][0]["id"]  # imagefolder ids are the file names

    # without the training images' gradient store: one clear error, exit 2
    no_store = [*argv[: argv.index("--train-store")], *argv[argv.index("--train-data") :]]
    no_store[no_store.index(str(out))] = str(tmp_path / "out-no-store")
    code = main(no_store)
    assert code == 2 and "--train-store" in capsys.readouterr().err
