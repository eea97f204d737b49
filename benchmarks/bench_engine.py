"""Engine benchmark: influence methods on synthetic LoRA-shaped gradients in a disk store.

Measures, each against a baseline run in the same process (this machine is noisy):

* DataInf time / one plain streaming read of the same store (the floor any method pays), m = 1 and 100;
* peak RSS of a DataInf run at n = 40,000 vs n = 4,000 (each in a fresh subprocess);
* Exact / DataInf and LiSSA / DataInf time on RoBERTa-large-like LoRA shapes for r = 1, 2, 4, 8.

Usage::

    .venv/bin/python benchmarks/bench_engine.py            # full run (~15 min, ~25 GB of disk)
    .venv/bin/python benchmarks/bench_engine.py --quick    # smaller sizes, a minute

Writes benchmarks/results_engine.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import datainf
from datainf.store import GradientStore

HERE = Path(__file__).resolve().parent


def write_store(path: Path, *, n: int, blocks: int, dim: int, seed: int = 0, chunk: int = 500) -> GradientStore:
    """Random gradients shaped like LoRA blocks, written in chunks (norms vary per example, as real ones do)."""
    generator = torch.Generator().manual_seed(seed)
    names = {f"layer{i // 2}.{'lora_A' if i % 2 == 0 else 'lora_B'}.weight": dim for i in range(blocks)}
    store = GradientStore.create(path, block_dims=names, shard_size=1024, overwrite=True)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        scale = torch.rand(size, 1, generator=generator) * 2 + 0.1
        store.append(
            [f"ex{i}" for i in range(start, start + size)],
            {name: torch.randn(size, dim, generator=generator) * scale * 1e-3 for name in names},
        )
    store.finalize()
    return store


def test_grads(store: GradientStore, m: int, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(m, dim, generator=generator) * 1e-3 for name, dim in store.block_dims.items()}


def plain_read_seconds(store: GradientStore, batch_size: int = 1024) -> float:
    """One pass that reads every stored number: a norm per block (safetensors maps lazily, so data that is
    not touched is never read; the norm is the cheapest reduction that touches every byte)."""
    started = time.perf_counter()
    total = 0.0
    for _, batch in store.iter_batches(batch_size):
        for tensor in batch.values():
            total += float(torch.linalg.vector_norm(tensor))
    return time.perf_counter() - started


def timed(
    method: str, store: GradientStore, test: dict[str, torch.Tensor], **kwargs: object
) -> tuple[float, datainf.Scores]:
    started = time.perf_counter()
    scores = datainf.influence(store, test, method=method, progress=False, **kwargs)  # type: ignore[arg-type]
    return time.perf_counter() - started, scores


def child_peak_rss(store_path: Path, m: int) -> float:
    """Run DataInf on a store in a fresh process; return its peak RSS (VmHWM) in MiB.

    ``ru_maxrss`` survives ``exec`` and would report the parent's peak, so read VmHWM of the child instead.
    """
    code = (
        "import torch, datainf\n"
        "from datainf.store import GradientStore\n"
        f"store = GradientStore.open({str(store_path)!r})\n"
        f"test = {{b: torch.randn({m}, d) * 1e-3 for b, d in store.block_dims.items()}}\n"
        "datainf.influence(store, test, method='datainf', progress=False)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="datainf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    command = "python benchmarks/bench_engine.py" + (" --quick" if args.quick else "")
    emit("## Influence engine (synthetic LoRA-shaped gradients, disk store, float32)")
    emit()
    emit(f"Command: `{command}`; torch threads = 2; machine: 2-core CPU.")
    emit()

    # 1. DataInf vs a plain streaming read.
    configs = (
        [("24 x 3072", 24, 3072, [1000, 4000]), ("160 x 40960", 160, 40960, [40])]
        if args.quick
        else [
            ("24 x 3072 (MiniLM r=8 q/v)", 24, 3072, [2000, 4000, 40000]),
            ("160 x 40960 (Llama-13B r=8 q/v)", 160, 40960, [100, 200]),
        ]
    )
    emit("### DataInf time / plain streaming read of the same store")
    emit()
    emit(
        "| blocks x d_l | n | store GB | read s | DataInf m=1 s | ratio m=1 | DataInf m=100 s | ratio m=100 | Hessian-free m=1 / read |"
    )
    emit("|---|---|---|---|---|---|---|---|---|")
    rss_paths: dict[int, Path] = {}
    for label, blocks, dim, sizes in configs:
        for n in sizes:
            path = work / f"store-{blocks}x{dim}-{n}"
            store = write_store(path, n=n, blocks=blocks, dim=dim)
            gigabytes = n * blocks * dim * 4 / 1e9
            plain_read_seconds(store)  # warm the page cache so both sides read from memory
            read = min(plain_read_seconds(store) for _ in range(2))
            t1, _ = timed("datainf", store, test_grads(store, 1))
            t100, _ = timed("datainf", store, test_grads(store, 100), mode="pairwise")
            thf, _ = timed("hessian_free", store, test_grads(store, 1))
            emit(
                f"| {label} | {n} | {gigabytes:.2f} | {read:.2f} | {t1:.2f} | {t1 / read:.2f}x | {t100:.2f} | "
                f"{t100 / read:.2f}x | {thf / read:.2f}x |"
            )
            if blocks == 24:
                rss_paths[n] = path
            else:
                shutil.rmtree(path)
    emit()
    emit("DataInf makes 2 streaming passes (the c_i-weighted sum, then the scores); lambda and ||g_i||^2 come from the")
    emit("norms the store recorded at write time. The goal is <= 3x a single read for m = 1.")
    emit()

    # 2. Peak RSS vs n.
    small, large = (1000, 4000) if args.quick else (4000, 40000)
    rss_small = child_peak_rss(rss_paths[small], 1)
    rss_large = child_peak_rss(rss_paths[large], 1)
    emit("### Peak RSS of a DataInf run (fresh process, m = 1, 24 x 3072 blocks)")
    emit()
    emit(f"| n | peak RSS MiB |\n|---|---|\n| {small} | {rss_small:.0f} |\n| {large} | {rss_large:.0f} |")
    emit()
    emit(f"Ratio {large} / {small}: {rss_large / rss_small:.3f} (goal: within 1.20).")
    emit()
    for path in rss_paths.values():
        shutil.rmtree(path, ignore_errors=True)

    # 3. Exact and LiSSA vs DataInf on RoBERTa-large-like shapes (24 layers, LoRA on value: A r x 1024, B 1024 x r).
    n = 500 if args.quick else 2000
    emit(f"### Exact and LiSSA vs DataInf, RoBERTa-large-like shapes (48 blocks of 1024 r), n = {n}, m = 1")
    emit()
    emit(
        "| r | d_l | DataInf s | Exact s | Exact / DataInf | Exact branch | LiSSA (10 it.) s | LiSSA / DataInf | LiSSA diverged | Pearson(DataInf, Exact) |"
    )
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for rank in (1, 2, 4, 8):
        path = work / f"store-r{rank}"
        store = write_store(path, n=n, blocks=48, dim=1024 * rank)
        test = test_grads(store, 1)
        plain_read_seconds(store)
        t_datainf, s_datainf = timed("datainf", store, test)
        t_exact, s_exact = timed("exact", store, test)
        t_lissa, s_lissa = timed("lissa", store, test)
        branch = "direct" if 1024 * rank <= n else "Woodbury"
        corr = float(torch.corrcoef(torch.stack([s_datainf.values, s_exact.values]))[0, 1])
        emit(
            f"| {rank} | {1024 * rank} | {t_datainf:.2f} | {t_exact:.2f} | {t_exact / t_datainf:.1f}x | {branch} | "
            f"{t_lissa:.2f} | {t_lissa / t_datainf:.1f}x | {s_lissa.diagnostics['lissa_diverged']} | {corr:.3f} |"
        )
        shutil.rmtree(path)
    emit()
    emit("Random gradients are not real ones: the correlations above only show the code paths agree in sign and")
    emit("scale; real-model correlations are in the mislabel benchmark.")
    (HERE / ("results_engine_quick.md" if args.quick else "results_engine.md")).write_text("\n".join(lines) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"written": str(HERE / "results_engine.md")}))


if __name__ == "__main__":
    main()
