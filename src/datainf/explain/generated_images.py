"""Explain a user's generated image: which training images of their LoRA made the pipeline draw it.

:func:`explain_images` takes a diffusers pipeline folder with its LoRA (:mod:`datainf.diffusers_io`),
the gradient store of the LoRA's training images (``datainf grads --kind text-to-image``) and prompts:

1. each prompt is generated with the pipeline (its own scheduler, classifier-free guidance, the
   starting noise seeded by ``seed + i`` for prompt ``i``, independent of the other prompts);
2. the generated image, captioned with its prompt, gets the denoising-loss gradient of the training
   store's recipe (:class:`~datainf.tasks.diffusion.TextToImageTask`: the same fixed timesteps, noise
   seeded by the example id, a block per timestep, the image through the pipeline's VAE);
3. pairwise influence of every training image on each generated one (``method``, default DataInf);
4. per prompt, the ``k`` most helpful (most negative influence) and most harmful (most positive)
   training images are written beside the generated one: ``explain.html`` (images inline),
   ``explain.json``, ``generated-<i>.png`` and ``scores.safetensors`` in ``out``.

Sign convention: influence > 0 = harmful (up-weighting the training image raises the generated
image's denoising loss); the most helpful training images are those with the smallest influence.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datainf.errors import ConfigError, DatasetError, FingerprintMismatchError
from datainf.scores import SIGN_CONVENTION, Scores
from datainf.store import GradientStore, atomic_write_bytes, atomic_write_json

__all__ = ["ImageExplanation", "explain_images", "generate_images", "explain_text_to_image", "json_rows"]

logger = logging.getLogger(__name__)

_THUMB = 128


@dataclass
class ImageExplanation:
    """What :func:`explain_images` found and wrote.

    Attributes:
        prompts: the prompts, in order (generated example ``i`` has id ``"generated-<i>"``).
        images: the generated images (PIL, RGB), one per prompt.
        scores: pairwise :class:`~datainf.scores.Scores`, values ``(m, n)``: row ``i`` = prompt ``i``,
            columns = the training store's ids; positive = harmful.
        helpful: per prompt, the ``k`` most helpful training images as ``(id, score)``, most helpful first.
        harmful: per prompt, the ``k`` most harmful as ``(id, score)``, most harmful first.
        out: the output folder (``explain.html``, ``explain.json``, ``generated-<i>.png``, ``scores.safetensors``).
    """

    prompts: list[str]
    images: list[Any]
    scores: Scores
    helpful: list[list[tuple[str, float]]]
    harmful: list[list[tuple[str, float]]]
    out: Path
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def html(self) -> Path:
        """The HTML page: each generated image beside its most helpful and most harmful training images."""
        return self.out / "explain.html"

    @property
    def json(self) -> Path:
        """The same as JSON (ids, scores, captions, image files)."""
        return self.out / "explain.json"


def generate_images(
    pipeline: Any,
    prompts: Sequence[str],
    *,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    negative_prompt: str | None = None,
) -> list[Any]:
    """Generate one image per prompt with a loaded pipeline (:class:`~datainf.diffusers_io.LoadedPipeline`).

    Prompt ``i``'s starting noise comes from ``torch.Generator().manual_seed(seed + i)``, so an image
    does not depend on the other prompts. Images are ``pipeline.resolution`` pixels square (PIL, RGB).
    """
    pipe = pipeline.pipeline
    size = int(pipeline.resolution)
    images: list[Any] = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(int(seed) + i)
        with torch.no_grad():
            out = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=int(steps),
                guidance_scale=float(guidance_scale),
                generator=generator,
                height=size,
                width=size,
                output_type="pil",
            )
        images.append(out.images[0].convert("RGB"))
    return images


def _data_uri(image: Any, size: int = _THUMB) -> str:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _entry(train: Mapping[str, Mapping[str, Any]], ex_id: str, score: float) -> dict[str, Any]:
    rec = train[ex_id]
    return {"id": ex_id, "score": score, "prompt": rec.get("prompt"), "image_file": rec.get("image_file")}


def _html_page(
    prompts: Sequence[str],
    images: Sequence[Any],
    rows: Sequence[Mapping[str, Any]],
    train: Mapping[str, Mapping[str, Any]],
    settings: Mapping[str, Any],
) -> str:
    def cell(ex: Mapping[str, Any]) -> str:
        return (
            f'<figure><img src="{_data_uri(train[ex["id"]]["image"])}" alt="{html.escape(str(ex["id"]))}">'
            f"<figcaption><b>{ex['score']:+.3g}</b> {html.escape(str(ex['id']))}<br>"
            f"{html.escape(str(ex['prompt']))}</figcaption></figure>"
        )

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>datainf: explained images</title><style>"
        "body{font-family:sans-serif;margin:1.5em} figure{display:inline-block;margin:4px;width:140px;"
        "vertical-align:top;font-size:12px} img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;"
        "border:1px solid #ccc} .gen img{width:192px;height:192px} h3{margin:.6em 0 .2em}</style></head><body>",
        "<h1>Which training images made these generations</h1>",
        f"<p>Method {html.escape(str(settings['method']))}, damping {settings['damping']}; influence &gt; 0 = harmful "
        "(up-weighting the training image raises the generated image's denoising loss), &lt; 0 = helpful.</p>",
    ]
    for prompt, image, row in zip(prompts, images, rows, strict=True):
        parts.append(f"<hr><h2>{html.escape(prompt)}</h2>")
        parts.append(
            f'<figure class="gen"><img src="{_data_uri(image, 192)}" alt="generated"><figcaption>generated</figcaption></figure>'
        )
        parts.append("<h3>Most helpful</h3>" + "".join(cell(ex) for ex in row["helpful"]))
        parts.append("<h3>Most harmful</h3>" + "".join(cell(ex) for ex in row["harmful"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def explain_images(
    *,
    pipeline: str | os.PathLike[str] | Any,
    train_store: str | os.PathLike[str] | GradientStore,
    train_data: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    prompts: Sequence[str],
    out: str | os.PathLike[str],
    lora: str | os.PathLike[str] | None = None,
    k: int = 5,
    method: str = "datainf",
    damping: float = 0.1,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    caption_column: str | None = None,
    device: str = "cpu",
    grad_batch_size: int = 4,
    progress: bool = False,
) -> ImageExplanation:
    """Generate each prompt and show the training images that helped and harmed it most (module docstring).

    Args:
        pipeline: a pipeline folder (loaded with ``lora``) or a :class:`~datainf.diffusers_io.LoadedPipeline`.
        train_store: the training images' gradient store (``datainf grads --kind text-to-image --out``).
        train_data: the training images (an imagefolder / table, read with
            :func:`~datainf.data.images.load_image_records`, or its records): every id of the store
            must be among them.
        prompts: the prompts to generate (at least one).
        out: the output folder (created; the files of the module docstring are replaced).
        lora: the LoRA to load onto ``pipeline`` when it is a folder.
        k: training images shown per side.
        method: the influence method (:func:`datainf.methods.available_methods`).
        damping: ``lambda_l = damping * mean_i ||g_il||^2 / d_l``.
        steps: sampling steps of the pipeline's scheduler.
        guidance_scale: classifier-free guidance (``<= 1``: none).
        seed: prompt ``i`` is generated from seed ``seed + i``.
        caption_column: the caption column of ``train_data`` (default: ``text`` / ``caption`` / ``prompt``).
        device: where the pipeline runs.
        grad_batch_size: generated images per gradient pass.
        progress: show progress bars.

    Raises:
        ConfigError: no prompts, ``k < 1``.
        FingerprintMismatchError: the training store was made with another pipeline, LoRA or recipe.
        DatasetError: training ids missing from ``train_data``.
    """
    from datainf.data.images import load_image_records
    from datainf.diffusers_io import LoadedPipeline, load_pipeline
    from datainf.gradients import collect_gradients
    from datainf.influence import influence
    from datainf.tasks.diffusion import TextToImageTaskConfig, text_to_image_task

    prompts = [str(p) for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError("Give at least one non-empty prompt to explain (--prompt TEXT).")
    if k < 1:
        raise ConfigError(f"k={k} must be >= 1.")
    store = train_store if isinstance(train_store, GradientStore) else GradientStore.open(train_store)
    records = (
        load_image_records(train_data, caption_column=caption_column)
        if isinstance(train_data, (str, os.PathLike))
        else [dict(r) for r in train_data]
    )
    by_id = {str(r["id"]): r for r in records}
    missing = [i for i in store.ids if i not in by_id]
    if missing:
        raise DatasetError(
            f"{len(missing)} training id(s) of the gradient store are not in the training data, e.g. {missing[:5]}; "
            "pass the data the store was computed from."
        )
    loaded = pipeline if isinstance(pipeline, LoadedPipeline) else load_pipeline(pipeline, lora=lora, device=device)
    recipe = _store_recipe(store)  # the training store's timesteps / seed / resolution, so that both gradients agree
    task = text_to_image_task(loaded, config=TextToImageTaskConfig(**recipe) if recipe is not None else None)
    images = generate_images(loaded, prompts, steps=steps, guidance_scale=guidance_scale, seed=seed)
    generated = [{"id": f"generated-{i}", "prompt": p, "image": img} for i, (p, img) in enumerate(zip(prompts, images))]
    test_store = collect_gradients(
        loaded.unet, task, generated, batch_size=grad_batch_size, dtype=store.dtype, progress=progress
    )
    for key in ("model", "task"):
        a, b = store.fingerprint.get(key), test_store.fingerprint.get(key)
        if a is not None and a != b:
            what = "pipeline (UNet) and LoRA" if key == "model" else "task recipe (timesteps, seed, VAE, text encoder)"
            raise FingerprintMismatchError(
                f"The training gradient store was computed with another {what} than the one given: store {a!r}, "
                f"now {b!r}. Pass the pipeline and LoRA the store was made with, or recompute the store."
            )
    scores = influence(store, test_store, method=method, mode="pairwise", damping=damping, progress=progress)
    helpful = [scores.top_helpful(k, test_index=i) for i in range(len(prompts))]
    harmful = [scores.top_harmful(k, test_index=i) for i in range(len(prompts))]

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "method": method,
        "damping": damping,
        "k": k,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "pipeline": str(loaded.folder),
        "lora": str(loaded.lora) if loaded.lora is not None else None,
        "sign_convention": SIGN_CONVENTION,
    }
    rows: list[dict[str, Any]] = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write_bytes(folder / f"generated-{i}.png", buf.getvalue())
        rows.append(
            {
                "id": f"generated-{i}",
                "prompt": prompt,
                "image": f"generated-{i}.png",
                "helpful": [_entry(by_id, ex_id, s) for ex_id, s in helpful[i]],
                "harmful": [_entry(by_id, ex_id, s) for ex_id, s in harmful[i]],
            }
        )
    scores.save(folder / "scores.safetensors")
    atomic_write_json(folder / "explain.json", {"settings": settings, "generations": rows}, default=float)
    atomic_write_bytes(folder / "explain.html", _html_page(prompts, images, rows, by_id, settings).encode("utf-8"))
    logger.info("Explained %d generated image(s) against %d training images: %s", len(prompts), len(store.ids), folder)
    return ImageExplanation(
        prompts=prompts,
        images=images,
        scores=scores,
        helpful=helpful,
        harmful=harmful,
        out=folder,
        settings=settings,
    )


def _store_recipe(store: GradientStore) -> dict[str, Any] | None:
    """The :class:`~datainf.tasks.diffusion.TextToImageTaskConfig` a text-to-image store was made with
    (read back from its task fingerprint), ``None`` for another task."""
    import json

    task = str(store.fingerprint.get("task", ""))
    prefix = "TextToImageTask"
    if not task.startswith(prefix + "{"):
        raise FingerprintMismatchError(
            f"The training gradient store was not made by the text-to-image task (its task is {task[:80]!r}); compute "
            "it with `datainf grads --kind text-to-image`."
        )
    depth, end = 0, None
    for pos, ch in enumerate(task[len(prefix) :], start=len(prefix)):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            end = pos + 1
            break
    if end is None:
        return None
    config = json.loads(task[len(prefix) : end])
    config["timesteps"] = tuple(config.get("timesteps", ()))
    return config


def explain_text_to_image(settings: Any, progress: bool = True) -> tuple[list[Any], int]:
    """The ``text-to-image`` explainer of ``datainf explain`` (:func:`datainf.explain.prompts.register_explainer`).

    Maps the command's settings onto :func:`explain_images`: ``model`` is the pipeline folder, ``adapter``
    its LoRA, ``train_store`` the training images' gradient store (required: image gradients are not
    computed on the fly here), ``train_data`` the training images, ``prompt`` and / or ``prompts`` (a file
    with a ``prompt`` column, ``--prompt-column``) what to generate; ``k``, ``method``, ``damping``,
    ``device`` and ``grad_batch_size`` as given. The images and ``explain.html`` (generated image
    beside its training images) go into ``settings.out``.

    Returns:
        ``(explanations, number of training images)``: one ``PromptExplanation`` per prompt, ``extra``
        holding the generated image's file and the training images' files.
    """
    import importlib

    from datainf.data.tabular import load_records

    prompts_module = importlib.import_module("datainf.explain.prompts")
    if not settings.train_store or not settings.train_data:
        raise ConfigError(
            "Explaining an image needs --train-store (the training images' gradients: `datainf grads --kind "
            "text-to-image`) and --train-data (the training images, to show them)."
        )
    if not settings.model:
        raise ConfigError("Explaining an image needs --model PIPELINE_DIR (the diffusers pipeline folder).")
    texts: list[tuple[str, str]] = []
    if settings.prompts:
        column = {"prompt": settings.prompt_column} if settings.prompt_column else {}
        for r in load_records(settings.prompts, columns=column, required=["prompt"]):
            texts.append((str(r["id"]), str(r["prompt"])))
    if settings.prompt:
        texts.append(("prompt", str(settings.prompt)))
    result = explain_images(
        pipeline=settings.model,
        lora=settings.adapter,
        train_store=settings.train_store,
        train_data=settings.train_data,
        prompts=[p for _, p in texts],
        out=settings.out,
        k=int(settings.k),
        method=str(settings.method),
        damping=float(settings.damping),
        device=str(settings.device),
        grad_batch_size=int(settings.grad_batch_size),
        progress=progress,
    )
    records = json_rows(result)

    def examples(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        return [prompts_module.TrainingExample(id=r["id"], influence=r["score"], text=str(r["prompt"])) for r in rows]

    explanations = [
        prompts_module.PromptExplanation(
            id=ex_id,
            prompt=prompt,
            response="",
            generated=True,
            helpful=examples(row["helpful"]),
            harmful=examples(row["harmful"]),
            extra={
                "image": row["image"],
                "helpful_images": [r["image_file"] for r in row["helpful"]],
                "harmful_images": [r["image_file"] for r in row["harmful"]],
                "page": "explain.html",
            },
        )
        for (ex_id, prompt), row in zip(texts, records, strict=True)
    ]
    return explanations, len(result.scores.train_ids)


def json_rows(result: ImageExplanation) -> list[dict[str, Any]]:
    """The per-prompt rows of ``explain.json`` (``prompt``, ``image``, ``helpful``, ``harmful``)."""
    import json

    rows: list[dict[str, Any]] = json.loads(result.json.read_text())["generations"]
    return rows
