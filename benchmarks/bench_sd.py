"""Benchmark: per-example gradients of a user's Stable-Diffusion pipeline + LoRA (``datainf grads --kind text-to-image``).

Not a test. Two random Stable-Diffusion-shaped pipelines are built and saved here (no downloads):
``tiny`` (the test fixture of ``tests/tiny_diffusers.py``: 8x8 latents, 16x16 images, UNet 52 k
parameters) and ``small`` (16x16 latents, 64x64 images, UNet with 32/64 channels), each with a LoRA (r=4 on to_q, to_k, to_v, to_out.0) saved as
``pytorch_lora_weights.safetensors`` and loaded back through :func:`datainf.diffusers_io.load_pipeline`.

For each pipeline, dtype (float32 / bfloat16) and UNet gradient checkpointing (off / on), one
subprocess measures, on the same batches of captioned random images and the default recipe (6
timesteps, one gradient block per timestep):

* ``grads``: :func:`datainf.collect_gradients` with :func:`~datainf.tasks.diffusion.text_to_image_task`
  (VAE encoding, text encoding, hooks, store in RAM), seconds per example;
* ``train``: one training step of the same settings: the same loss (same VAE / text encoder / 6
  timesteps) averaged over the batch, backward, AdamW on the LoRA tensors, seconds per example;
* the ratio grads / train, and the peak resident memory each adds over the loaded pipeline
  (``ru_maxrss``; the training step runs in its own subprocess, after the gradients).

Rounds alternate the two; the median is reported. torch runs on one thread (the machine is shared).

    nice -n 15 .venv/bin/python benchmarks/bench_sd.py          # writes benchmarks/results_sd.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny pipeline builder

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {
        "sample_size": 16,
        "block_out_channels": (32, 64),
        "cross_attention_dim": 16,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
}
BATCH = 4
ROUNDS = 3


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(folder: Path, size: str) -> tuple[Path, Path]:
    from tiny_diffusers import save_diffusers_lora, save_tiny_pipeline

    pipe = save_tiny_pipeline(folder / f"pipe-{size}", **SIZES[size])
    if size == "small":  # a VAE with three blocks: 16x16 latents <-> 64x64 images
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 32),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            layers_per_block=1,
        ).save_pretrained(str(pipe / "vae"))
    lora = save_diffusers_lora(pipe, folder / f"lora-{size}", r=4, **SIZES[size])
    return pipe, lora


def _records(n: int, size: int, seed: int = 0) -> list[dict[str, Any]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ["a photo of cat", "a red dog", "an image in blue style", "a sks dog"]
    return [
        {
            "id": f"img-{i}",
            "prompt": words[i % len(words)],
            "image": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
        }
        for i in range(n)
    ]


def worker(pipe: str, lora: str, dtype: str, checkpointing: bool, part: str) -> dict[str, Any]:
    """One configuration in this process: seconds per example of ``part`` (``grads`` or ``train``) and its peak RSS."""
    from datainf.diffusers_io import load_pipeline
    from datainf.gradients import collect_gradients, find_lora_blocks
    from datainf.tasks.diffusion import text_to_image_task

    torch.set_num_threads(1)
    loaded = load_pipeline(pipe, lora=lora, dtype=dtype)
    if checkpointing:
        loaded.unet.enable_gradient_checkpointing()
    task = text_to_image_task(loaded)
    records = _records(BATCH * ROUNDS + BATCH, loaded.resolution)
    params = [b.parameter for b in find_lora_blocks(loaded.unet)]
    base = _rss_mib()
    times: list[float] = []
    if part == "grads":
        for r in range(ROUNDS + 1):  # round 0 warms up
            chunk = records[r * BATCH : (r + 1) * BATCH]
            t0 = time.perf_counter()
            collect_gradients(loaded.unet, task, chunk, batch_size=BATCH, progress=False)
            times.append((time.perf_counter() - t0) / BATCH)
    else:
        loaded.unet.train()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        task.setup(loaded.unet)
        for r in range(ROUNDS + 1):
            chunk = records[r * BATCH : (r + 1) * BATCH]
            t0 = time.perf_counter()
            batch = task.collate(chunk, [c["id"] for c in chunk])
            loss = task.per_example_loss(loaded.unet, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append((time.perf_counter() - t0) / BATCH)
    return {
        "seconds_per_example": statistics.median(times[1:]),
        "peak_added_mib": _rss_mib() - base,
        "unet_parameters": sum(p.numel() for p in loaded.unet.parameters()),
        "lora_parameters": sum(p.numel() for p in params),
        "resolution": loaded.resolution,
    }


def _run_worker(pipe: Path, lora: Path, dtype: str, checkpointing: bool, part: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", str(pipe), str(lora), dtype, str(int(checkpointing)), part]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=5, metavar=("PIPE", "LORA", "DTYPE", "CKPT", "PART"))
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--from-log",
        nargs=4,
        metavar=("LOG", "TOOK", "LOAD_BEFORE", "LOAD_AFTER"),
        help="write the report of a run's printed rows",
    )
    parser.add_argument("--out", default=str(HERE / "results_sd.md"))
    args = parser.parse_args()
    if args.worker:
        pipe, lora, dtype, ckpt, part = args.worker
        print(json.dumps(worker(pipe, lora, dtype, ckpt == "1", part)))
        return

    if args.from_log:
        log, took, before, after = args.from_log
        logged = [json.loads(line) for line in Path(log).read_text().splitlines() if line.startswith("{")]
        write_report(logged, Path(args.out), took, before, after)
        return
    rows: list[dict[str, Any]] = []
    load_before = _load()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            pipe, lora = _build(Path(tmp), size)
            for dtype in args.dtypes.split(","):
                for ckpt in (False, True):
                    grads = _run_worker(pipe, lora, dtype, ckpt, "grads")
                    train = _run_worker(pipe, lora, dtype, ckpt, "train")
                    rows.append({"size": size, "dtype": dtype, "checkpointing": ckpt, "grads": grads, "train": train})
                    print(json.dumps(rows[-1]), flush=True)
    write_report(rows, Path(args.out), f"{time.perf_counter() - started:.0f} s", load_before, _load())
    print(f"wrote {args.out}")


def write_report(rows: list[dict[str, Any]], out: Path, took: str, load_before: str, load_after: str) -> None:
    """The results table of ``rows`` (one per configuration, as printed by :func:`main`) into ``out``."""
    lines = [
        "## Text-to-image: per-example gradients of a user's Stable-Diffusion pipeline + LoRA",
        "",
        f"`nice -n 15 .venv/bin/python benchmarks/bench_sd.py` ({took}; load average "
        f"before {load_before}, after {load_after}; torch {torch.__version__}, 1 thread). Random SD-shaped pipelines "
        "built and saved by the script, LoRA r=4 on to_q/to_k/to_v/to_out.0 loaded from "
        f"`pytorch_lora_weights.safetensors`; batch {BATCH}, the default recipe (6 timesteps, a block per timestep), "
        f"median of {ROUNDS} batches after a warm-up. `grads`: `collect_gradients` end to end (VAE + text encoder + hooks); "
        "`train`: one training step of the same loss (batch mean, backward, AdamW). Peak memory: `ru_maxrss` added "
        "over the loaded pipeline, each part in its own process.",
        "",
        "| pipeline | UNet params | LoRA params | image | dtype | UNet checkpointing | grads s/example | train s/example "
        "| grads / train | grads peak MiB | train peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        g, t = row["grads"], row["train"]
        if "error" in g or "error" in t:
            lines.append(
                f"| {row['size']} | | | | {row['dtype']} | {'on' if row['checkpointing'] else 'off'} | "
                f"failed: {g.get('error') or t.get('error')} | | | | |"
            )
            continue
        lines.append(
            f"| {row['size']} | {g['unet_parameters']:,} | {g['lora_parameters']:,} | {g['resolution']}px | {row['dtype']} "
            f"| {'on' if row['checkpointing'] else 'off'} | {g['seconds_per_example']:.4f} | {t['seconds_per_example']:.4f} "
            f"| {g['seconds_per_example'] / t['seconds_per_example']:.2f} | {g['peak_added_mib']:.0f} "
            f"| {t['peak_added_mib']:.0f} |"
        )
    lines += [
        "",
        "Gradient checkpointing: datainf's gradient collection switches the UNet's checkpointing off while it takes "
        "per-example gradients (`gradients.lora.gradient_mode`; the setting is restored afterwards), so the `grads` "
        "columns with checkpointing on measure that path; the `train` columns are the training step with "
        "checkpointing really on.",
    ]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
