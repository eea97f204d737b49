"""Influence at scale on one machine (issue 13): on-the-fly training gradients, projected stores, `datainf plan`.

A random-init Llama-architecture causal LM sized for this CPU (4 layers, hidden 512, LoRA r=8 on
q_proj / v_proj, the response-loss task of ``datainf.tasks.causal_lm``), for each n:

* store mode: gradient collection into a disk store + DataInf on it; on the fly: DataInf with the
  training gradients recomputed on every pass (``OnTheFlyGradients``); projected: collection of a
  projected store (``--project-dim``) + DataInf on it. Each mode runs in its own process, so its peak
  RSS (``ru_maxrss``) is its own; seconds exclude loading the model.
* the ratio on-the-fly / (collection + DataInf), training-gradient bytes on disk, the projected
  store's bytes ratio and the Spearman correlation of its scores with the unprojected ones;
* the Spearman / bytes curve for several k (sketches of the stored unprojected gradients with the
  same projection the hooks apply: equal to collection-time sketches up to round-off, tested in
  tests/test_projection.py);
* ``datainf plan``'s predictions (store bytes, peak RSS, seconds) next to the measured figures.

The demo section does the same curve on the mislabel demo's cached MiniLM stores (BBC News, 400
training examples, 20 % flipped): Spearman with the unprojected DataInf scores and mislabel AUC vs store size.

Usage (2 threads; under nice on the shared machine)::

    nice -n 15 .venv/bin/python benchmarks/bench_scale.py --n 1000 2000 --k 1024
    nice -n 15 .venv/bin/python benchmarks/bench_scale.py --demo-only

Results: benchmarks/results_scale.json (raw) and benchmarks/results_scale.md (the section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_JSON = HERE / "results_scale.json"
RESULTS_MD = HERE / "results_scale.md"
WORK = Path(os.environ.get("DATAINF_BENCH_WORK", "/tmp/datainf-bench-scale"))
VOCAB_WORDS = 2000
MAX_LENGTH = 16
SHARD_SIZE = 256
SCORE_BATCH = 256
TEST_M = 32
GRAD_BATCH = 16
THREADS = 2
CURVE_K = (64, 128, 256, 512, 1024, 2048)
MODES = ("store", "onthefly", "onthefly-unfused", "onthefly-lossdiff", "projected")
DEMO_CACHE = Path("/work/main/datainf-out/demo/cache-6786655285")
HAND_RUN_TITLE = "## Scoring without a training store (on-the-fly gradients): one measurement, no script yet"
KEPT_TITLE = "### Part 1's hand-run measurement (kept as recorded)"


def _uptime() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


# ---------------------------------------------------------------------------------------------- model and data


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i + len(specials) for i in range(VOCAB_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


def build_model(folder: Path) -> None:
    """Save the random-init base model (+ tokenizer) and a random LoRA adapter under ``folder``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "adapter" / "adapter_config.json").is_file():
        return
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=VOCAB_WORDS + 4,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    base = LlamaForCausalLM(config)
    base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, lora)
    model.save_pretrained(folder / "adapter")


def records(n: int, seed: int) -> list[dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def words(low: int, high: int) -> str:
        count = int(torch.randint(low, high + 1, (1,), generator=gen))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB_WORDS, (count,), generator=gen))

    return [{"id": f"s{seed}-{i}", "prompt": words(3, 8), "response": words(2, 6)} for i in range(n)]


def _model_and_task(folder: Path) -> tuple[Any, Any]:
    from datainf.models import load_model
    from datainf.tasks import get_task_kind

    model, tokenizer = load_model(str(folder / "base"), kind="causal-lm", adapter=str(folder / "adapter"))
    task = get_task_kind("causal-lm").make_task(tokenizer, max_length=MAX_LENGTH)
    return model, task


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ---------------------------------------------------------------------------------------------- workers


def worker(mode: str, n: int, k: int, folder: Path) -> dict[str, Any]:
    """One mode in this process: its seconds, bytes and peak RSS (printed as one JSON line)."""
    import torch

    import datainf
    from datainf.gradients import OnTheFlyGradients, collect_gradients
    from datainf.gradients.projection import ProjectionConfig

    torch.set_num_threads(THREADS)
    model, task = _model_and_task(folder)
    train, test = records(n, 0), records(TEST_M, 1)
    projection = ProjectionConfig(dim=k, seed=0) if mode == "projected" else None
    test_store = collect_gradients(model, task, test, batch_size=GRAD_BATCH, projection=projection, progress=False)
    out: dict[str, Any] = {"mode": mode, "n": n, "load_before": _uptime()}
    if mode in ("store", "projected"):
        path = folder / f"store-{mode}-{n}"
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        store = collect_gradients(
            model,
            task,
            train,
            store=path,
            batch_size=GRAD_BATCH,
            shard_size=SHARD_SIZE,
            projection=projection,
            progress=False,
        )
        out["collect_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = datainf.influence(store, test_store, batch_size=SCORE_BATCH, progress=False)
        out["score_seconds"] = time.perf_counter() - start
        out["train_bytes"] = _folder_bytes(path)
        out["numbers_per_example"] = sum(store.block_dims.values())
    else:  # "onthefly": DataInf's fused norms pass (the default); "onthefly-unfused": norms pass + sum pass;
        # "onthefly-lossdiff": the fused pass, then the scoring pass by loss differences (docs/method.md 6.2)
        source = OnTheFlyGradients(model, task, train, batch_size=GRAD_BATCH, progress=False)
        start = time.perf_counter()
        scores = datainf.influence(
            source,
            test_store,
            batch_size=SCORE_BATCH,
            progress=False,
            fuse_norms_pass=mode != "onthefly-unfused",
            scoring="loss-difference" if mode == "onthefly-lossdiff" else "gradients",
        )
        out["score_seconds"] = time.perf_counter() - start
        out["train_bytes"] = 0
        out["gradient_passes"] = source.passes
        out["rows_computed"] = source.rows_computed
        out["forward_rows"] = source.forward_rows
        out["fused_norms_pass"] = scores.diagnostics.get("fused_norms_pass")
        out["loss_difference"] = scores.diagnostics.get("loss_difference")
        out["numbers_per_example"] = sum(source.block_dims.values())
    save_file({"values": scores.values.contiguous()}, str(folder / f"scores-{mode}-{n}.safetensors"))
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["load_after"] = _uptime()
    return out


def second_pass_worker(n: int, folder: Path) -> dict[str, Any]:
    """Seconds per example of three ways to get ``g_k . u`` for ``n`` examples (one direction ``u``).

    The ways are: the gradient pass (per-example gradients through the hooks, then the dots), forward-mode AD
    (``torch.autograd.forward_ad``; eager attention, since SDPA has no forward AD on the CPU), and one forward
    pass at the moved weights (the loss difference, ``L(theta)`` taken as known). Each is timed as the fastest
    of 3 passes (the machine is shared); each error is the largest difference from the gradient pass over its
    largest value.
    """
    import torch
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call

    from datainf.gradients import OnTheFlyGradients, find_lora_blocks
    from datainf.gradients.session import GradientSession

    torch.set_num_threads(THREADS)
    model, task = _model_and_task(folder)
    train = records(n, 0)
    blocks = find_lora_blocks(model).blocks
    gen = torch.Generator().manual_seed(0)
    direction = {b.name: torch.randn(b.numel, generator=gen) for b in blocks}
    parts = [range(i, min(i + GRAD_BATCH, n)) for i in range(0, n, GRAD_BATCH)]

    def timed(run: Any, repeats: int = 3) -> tuple[float, Any]:
        """Seconds per example (the fastest of ``repeats`` passes) and the values ``(n,)``."""
        run(parts[0])  # warm-up
        best, out = math.inf, None
        for _ in range(repeats):
            start = time.perf_counter()
            out = torch.cat([run(part) for part in parts])
            best = min(best, (time.perf_counter() - start) / n)
        return best, out

    with GradientSession(model, task, find_lora_blocks(model)) as session:

        def gradients(part: range) -> Any:
            chunk = train[part.start : part.stop]
            _, _, grads = session.compute(chunk, [r["id"] for r in chunk])
            return sum(grads[b.name].double() @ direction[b.name].double() for b in blocks)

        def forward_ad(part: range) -> Any:
            chunk = train[part.start : part.stop]
            batch = task.collate(chunk, [r["id"] for r in chunk])
            with torch.no_grad(), fwad.dual_level():
                duals = {b.name: fwad.make_dual(b.parameter.detach(), direction[b.name].view(b.shape)) for b in blocks}
                losses = task.per_example_loss(lambda **kw: functional_call(model, duals, (), kw, strict=False), batch)
                return fwad.unpack_dual(losses).tangent.double()

        gradient_s, exact = timed(gradients)
        model.config._attn_implementation = "eager"
        forward_ad_s, tangents = timed(forward_ad)
        model.config._attn_implementation = "sdpa"
    source = OnTheFlyGradients(model, task, train, batch_size=GRAD_BATCH, progress=False)
    source.to_dict()  # a gradient pass: the losses L(theta) recorded
    step = source.loss_difference_step(direction)
    difference_s, differences = timed(lambda part: source.directional_derivatives(direction, part, steps=[step])[0])

    def error(values: Any) -> float:
        return float((values - exact).abs().max() / exact.abs().max())

    return {
        "n": n,
        "gradient_pass_ms": 1000 * gradient_s,
        "forward_ad_ms": 1000 * forward_ad_s,
        "forward_ad_error": error(tangents),
        "loss_difference_ms": 1000 * difference_s,
        "loss_difference_error": error(differences),
        "load": _uptime(),
    }


def score_run_worker(n: int, folder: Path, recorded: bool) -> dict[str, Any]:
    """``datainf score --train-data`` end to end (DataInf + the training-loss baseline) on ``n`` examples.

    ``recorded=False`` makes the baseline run its own forward pass, as before the losses of the gradient
    passes were kept (``OnTheFlyGradients.recorded_losses`` returns ``None``).
    """
    import torch

    from datainf.gradients import OnTheFlyGradients
    from datainf.scores import Scores
    from datainf.workflows import ScoreSettings, score_run

    torch.set_num_threads(THREADS)
    data = folder / "score-run"
    data.mkdir(exist_ok=True)
    for name, count, seed in (("train", n, 0), ("test", TEST_M, 1)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(count, seed)))
    if not recorded:
        OnTheFlyGradients.recorded_losses = lambda self: None  # type: ignore[method-assign]
    out = data / f"out-{'recorded' if recorded else 'own-pass'}"
    shutil.rmtree(out, ignore_errors=True)
    settings = ScoreSettings(
        out=str(out),
        model=str(folder / "base"),
        adapter=str(folder / "adapter"),
        kind="causal-lm",
        train_data=str(data / "train.jsonl"),
        test_data=str(data / "test.jsonl"),
        max_length=MAX_LENGTH,
        grad_batch_size=GRAD_BATCH,
    )
    start = time.perf_counter()
    result = score_run(settings, progress=False)
    seconds = time.perf_counter() - start
    losses = Scores.load(out / "scores-loss.safetensors").values
    save_file(
        {"values": losses.contiguous()}, str(data / f"losses-{'recorded' if recorded else 'own-pass'}.safetensors")
    )
    return {"n": n, "recorded": recorded, "seconds": seconds, "stages": result.stage_seconds, "load": _uptime()}


def curve_worker(n: int, folder: Path) -> dict[str, Any]:
    """Spearman of sketched-store DataInf scores with the unprojected ones, for each k in CURVE_K."""
    import torch

    from datainf.gradients import find_lora_blocks
    from datainf.store import GradientStore

    torch.set_num_threads(THREADS)
    from datainf.gradients import collect_gradients

    model, task = _model_and_task(folder)
    blocks = find_lora_blocks(model).blocks
    store = GradientStore.open(folder / f"store-store-{n}")
    full = store.to_dict()
    reference = load_file(str(folder / f"scores-store-{n}.safetensors"))["values"]
    test_full = collect_gradients(model, task, records(TEST_M, 1), batch_size=GRAD_BATCH, progress=False).to_dict()
    rows = []
    for k in CURVE_K:
        scores, numbers = _sketched_scores(blocks, k, full, test_full)
        rows.append(
            {
                "k": k,
                "numbers_per_example": numbers,
                "bytes_ratio": (4 * sum(store.block_dims.values()) + 8 * len(full)) / (4 * numbers + 8 * len(full)),
                "spearman": _spearman(scores.values, reference),
            }
        )
    return {"n": n, "curve": rows}


def _sketched_scores(blocks: Any, k: int, train: dict[str, Any], test: dict[str, Any]) -> tuple[Any, int]:
    """DataInf scores on ``kron-gaussian-v1`` sketches (``dim = k``, seed 0) of in-memory ``{block: (n, d_l)}``
    train / test gradients, and the numbers per example the sketch keeps."""
    import datainf
    from datainf.gradients.projection import GradientProjector, ProjectionConfig
    from datainf.store import GradientStore

    projector = GradientProjector(ProjectionConfig(dim=k, seed=0), blocks)
    train_k = GradientStore.from_tensors({name: projector.project_rows(name, t) for name, t in train.items()})
    test_k = GradientStore.from_tensors({name: projector.project_rows(name, t) for name, t in test.items()})
    return datainf.influence(train_k, test_k, progress=False), sum(train_k.block_dims.values())


def _spearman(a: Any, b: Any) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


def _accuracy(approx: Any, exact: Any) -> dict[str, float]:
    """How close loss-difference scores are to the exact ones: largest error / largest score, Spearman, top-50."""
    import torch

    top = min(50, len(exact))
    overlap = len(set(torch.topk(approx, top).indices.tolist()) & set(torch.topk(exact, top).indices.tolist()))
    return {
        "max_error": float((approx - exact).abs().max() / exact.abs().max()),
        "spearman": _spearman(approx, exact),
        "top50_overlap": overlap / top,
    }


def plan_worker(mode: str, n: int, k: int, folder: Path, scoring: str = "gradients") -> dict[str, Any]:
    """``datainf plan``'s figures for one mode (in a fresh process: the runtime baseline matches a worker's)."""
    import torch

    import datainf.gradients  # the same imports as a worker before it plans
    import datainf.models  # noqa: F401
    from datainf.plan import PlanSettings, make_plan

    torch.set_num_threads(THREADS)
    plan = make_plan(
        PlanSettings(
            model=str(folder / "base"),
            adapter=str(folder / "adapter"),
            n=n,
            seq_len=MAX_LENGTH,
            mode=mode,
            project_dim=k if mode == "projected" else None,
            test_examples=TEST_M,
            batch_size=GRAD_BATCH,
            shard_size=SHARD_SIZE,
            score_batch_size=SCORE_BATCH,
            measure=True,
            scoring=scoring,
        )
    )
    return {"mode": mode, "n": n, "plan": plan.to_dict(), "text": plan.format()}


def _spawn(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = str(THREADS)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- demo


def demo_curve() -> dict[str, Any]:
    """Sketches of the demo's cached MiniLM stores for each k: Spearman with the unprojected DataInf scores, AUC."""
    import torch

    import datainf
    from datainf.data.bbc import load_bbc_news
    from datainf.demos.mislabel import MislabelDemoConfig, _minilm_path
    from datainf.evaluation import mislabel_detection_auc
    from datainf.gradients import find_lora_blocks
    from datainf.models import load_model
    from datainf.store import GradientStore

    torch.set_num_threads(THREADS)
    from datainf.data.bbc import make_noisy_split

    config = MislabelDemoConfig()
    split = make_noisy_split(
        load_bbc_news(),
        n_train=config.n_train,
        n_val=config.n_val,
        flip_fraction=config.flip_fraction,
        seed=config.seed,
    )
    train = GradientStore.open(DEMO_CACHE / "grads-train")
    val = GradientStore.open(DEMO_CACHE / "grads-val")
    order = {str(r["id"]): i for i, r in enumerate(split.train)}
    flipped = split.is_flipped
    model, _ = load_model(_minilm_path(), kind="classification", adapter=str(DEMO_CACHE / "adapter"))
    blocks = find_lora_blocks(model).blocks
    assert {b.name for b in blocks} == set(train.block_dims), "the cached store's blocks are not the model's"
    full, val_full = train.to_dict(), val.to_dict()
    base = datainf.influence(train, val, progress=False)
    positions = [order[i] for i in base.train_ids]

    def auc(values: Any) -> float:
        return float(mislabel_detection_auc(values.numpy(), flipped[positions]))

    numbers = sum(train.block_dims.values())
    rows = [
        {
            "k": None,
            "numbers_per_example": numbers,
            "bytes_ratio": 1.0,
            "spearman": 1.0,
            "auc": auc(base.values),
        }
    ]
    for k in CURVE_K:
        scores, kept = _sketched_scores(blocks, k, full, val_full)
        rows.append(
            {
                "k": k,
                "numbers_per_example": kept,
                "bytes_ratio": (4 * numbers + 8 * len(full)) / (4 * kept + 8 * len(full)),
                "spearman": _spearman(scores.values, base.values),
                "auc": auc(scores.values),
            }
        )
    return {"n_train": len(split.train), "flipped": int(flipped.sum()), "blocks": len(full), "curve": rows}


# ---------------------------------------------------------------------------------------------- report


def _baseline(run: dict[str, Any], store_seconds: float) -> float:
    """The store's collection + DataInf seconds a run is compared with: those measured in the run's own session
    (``run["baseline_seconds"]``, kept when the store row was measured again later), else the store row's."""
    return float(run.get("baseline_seconds", store_seconds))


def _mb(count: float) -> str:
    return f"{count / 2**20:,.1f}"


def render(results: dict[str, Any]) -> str:
    lines = [
        "## Influence at scale: on-the-fly training gradients, projected stores, `datainf plan` (issue 13)",
        "",
        "Produced by `.venv/bin/python benchmarks/bench_scale.py` (commands below) (raw numbers: "
        "`benchmarks/results_scale.json`). 2 threads; each mode runs in its own process (peak RSS is its own, "
        "seconds exclude loading the model).",
    ]
    runs = results.get("runs", [])
    if runs:
        setting = results["setting"]
        lines += [
            "",
            f"Model: random-init Llama ({setting['model']}), LoRA r=8 on q_proj / v_proj, D = "
            f"{setting['numbers_per_example']:,} numbers per example, response-loss task (prompt 3-8 words, "
            f"response 2-6, at most {MAX_LENGTH} tokens), m = {TEST_M} test examples, DataInf in average mode, "
            f"gradient batches of {GRAD_BATCH}, shards of {SHARD_SIZE} examples, DataInf reading {SCORE_BATCH} rows per "
            f"batch (`--shard-size` / `--score-batch-size`: what keeps memory flat in n). Projection k = {setting['k']}.",
            "",
            "| n | store: collection s | store: DataInf s | on the fly, fused norms pass: DataInf s (gradient passes) "
            "| ratio (goal <= 1.6) | on the fly, separate norms pass: s (gradient passes) | its ratio | "
            "store bytes | on-the-fly bytes | projected store bytes (ratio) | projected: collection + DataInf s | "
            "Spearman projected vs full | load before / after |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in sorted({r["n"] for r in runs}):
            by = {r["mode"]: r for r in runs if r["n"] == n}
            s, p = by.get("store"), by.get("projected")
            fused, unfused = by.get("onthefly"), by.get("onthefly-unfused")
            if s is None or (fused is None and unfused is None):
                continue
            base = s["collect_seconds"] + s["score_seconds"]

            def cells(run: dict[str, Any] | None, base: float = base) -> str:
                if run is None:
                    return "- | -"
                base = _baseline(run, base)
                if "rows_computed" in run:  # gradient rows computed / n: the pilot counted as its share of a pass
                    passes = f" ({run['rows_computed'] / run['n']:.2f})"
                else:
                    passes = f" ({run['gradient_passes']})" if "gradient_passes" in run else ""
                return f"{run['score_seconds']:.1f}{passes} | **{run['score_seconds'] / base:.2f}**"

            proj = f"{p['train_bytes']:,} ({s['train_bytes'] / p['train_bytes']:.1f}x)" if p else "-"
            proj_s = f"{p['collect_seconds'] + p['score_seconds']:.1f}" if p else "-"
            rho = f"{p['spearman']:.4f}" if p and "spearman" in p else "-"
            last = fused or unfused
            assert last is not None
            lines.append(
                f"| {n:,} | {s['collect_seconds']:.1f} | {s['score_seconds']:.2f} | {cells(fused)} | {cells(unfused)} | "
                f"{s['train_bytes']:,} | 0 | {proj} | {proj_s} | {rho} | {s['load_before']} / {last['load_after']} |"
            )
        lines += [
            "",
            "Peak RSS per mode (MiB) against n (goal: flat within 20 % from the smallest to the largest n):",
            "",
        ]
        ns = sorted({r["n"] for r in runs})
        lines += [
            "| mode | " + " | ".join(f"n={n:,}" for n in ns) + " | largest / smallest |",
            "|---" * (len(ns) + 2) + "|",
        ]
        for mode in MODES:
            values = [next((r["peak_rss"] for r in runs if r["n"] == n and r["mode"] == mode), None) for n in ns]
            present = [v for v in values if v]
            spread = f"{max(present) / min(present):.2f}" if len(present) > 1 else "-"
            lines.append(f"| {mode} | " + " | ".join(_mb(v) if v else "-" for v in values) + f" | {spread} |")
        approximate = sorted((r for r in runs if r["mode"] == "onthefly-lossdiff"), key=lambda r: r["n"])
        if approximate:
            lines += [
                "",
                'On the fly with the scoring pass by loss differences (`scoring="loss-difference"`, docs/method.md '
                "section 6.2; approximate, checked on 64 rows at 3 steps): seconds against the same store row, and the "
                "scores against the store path's exact ones:",
                "",
                "| n | store: collection + DataInf s | loss-difference scoring: DataInf s | ratio (goal <= 1.6) | "
                "gradient rows / n | forward-only rows / n | check: error / largest score (rows) | largest error vs "
                "store / largest score | Spearman vs store | top-50 overlap | load before / after |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for run in approximate:
                store = next((r for r in runs if r["n"] == run["n"] and r["mode"] == "store"), None)
                if store is None:
                    continue
                base = store["collect_seconds"] + store["score_seconds"]
                check = run["loss_difference"]
                acc = run.get("accuracy", {})
                lines.append(
                    f"| {run['n']:,} | {base:.1f} | {run['score_seconds']:.1f} | **{run['score_seconds'] / base:.2f}** | "
                    f"{run['rows_computed'] / run['n']:.2f} | {run['forward_rows'] / run['n']:.2f} | "
                    f"{check['check_error']:.1e} ({check['check_rows']}) | {acc.get('max_error', float('nan')):.1e} | "
                    f"{acc.get('spearman', float('nan')):.6f} | {acc.get('top50_overlap', float('nan')):.2f} | "
                    f"{run['load_before']} / {run['load_after']} |"
                )
        plans = results.get("plans", [])
        if plans:
            lines += [
                "",
                "`datainf plan` next to the measurements (same n, same settings; plan figures from the config, the "
                "meta-device activation count and one timed batch):",
                "",
                "| mode | n | plan: store bytes | measured bytes | plan / measured | plan: peak RSS MiB | measured MiB | "
                "plan / measured | plan: seconds | measured s | plan / measured |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for entry in plans:
                run = next((r for r in runs if r["n"] == entry["n"] and r["mode"] == entry["mode"]), None)
                if run is None:
                    continue
                plan = entry["plan"]
                method = plan["methods"][0]
                planned_bytes = plan["store_bytes"]
                if entry["mode"].startswith("onthefly") or entry["mode"] == "on-the-fly":
                    planned_peak = method["peak_bytes"]
                    measured_s = run["score_seconds"]
                else:
                    planned_peak = max(plan["collection_peak_bytes"], method["peak_bytes"])
                    measured_s = run["collect_seconds"] + run["score_seconds"]
                planned_s = method["seconds"] or 0.0
                bytes_ratio = f"{planned_bytes / run['train_bytes']:.3f}" if run["train_bytes"] else "-"
                lines.append(
                    f"| {run['mode']} | {run['n']:,} | {planned_bytes:,} | {run['train_bytes']:,} | {bytes_ratio} | "
                    f"{_mb(planned_peak)} | {_mb(run['peak_rss'])} | {planned_peak / run['peak_rss']:.2f} | "
                    f"{planned_s:.0f} | {measured_s:.0f} | {planned_s / measured_s:.2f} |"
                )
    for key, title in (("curve", "this model"), ("demo", "the mislabel demo (MiniLM, cached stores)")):
        block = results.get(key)
        if not block:
            continue
        has_auc = "auc" in block["curve"][0]
        lines += [
            "",
            f"Projected stores on {title}: sketches of the stored unprojected gradients for several k "
            f"(n = {block.get('n', block.get('n_train'))}"
            + (f", {block['flipped']} flipped labels" if "flipped" in block else "")
            + "); DataInf scores against the unprojected ones:",
            "",
            "| k | numbers per example | store bytes ratio | Spearman vs unprojected |"
            + (" mislabel AUC |" if has_auc else ""),
            "|---|---|---|---|" + ("---|" if has_auc else ""),
        ]
        for row in block["curve"]:
            k = "none (full)" if row["k"] is None else str(row["k"])
            lines.append(
                f"| {k} | {row['numbers_per_example']:,} | {row['bytes_ratio']:.1f}x | {row['spearman']:.4f} |"
                + (f" {row['auc']:.4f} |" if has_auc else "")
            )
    cli = results.get("score_run")
    if cli:
        by = {run["recorded"]: run for run in cli["runs"]}
        if True in by and False in by:
            new, old = by[True], by[False]
            lines += [
                "",
                f"`datainf score --train-data` end to end (DataInf average + the training-loss baseline, n = "
                f"{new['n']:,}, `--score-run-only`): the baseline from the losses the gradient passes recorded, "
                "against its own forward pass (the loss values are "
                + ("identical, bit for bit" if cli["same_losses"] else "NOT identical")
                + "):",
                "",
                "| baseline losses | total s | DataInf s | baseline s | load |",
                "|---|---|---|---|---|",
            ]
            for label, run in (("recorded by the gradient passes", new), ("its own forward pass", old)):
                stages = run["stages"]
                lines.append(
                    f"| {label} | {run['seconds']:.1f} | {stages.get('influence-datainf', float('nan')):.1f} | "
                    f"{stages.get('loss-baseline', float('nan')):.2f} | {run['load']} |"
                )
            lines.append(f"| ratio | {new['seconds'] / old['seconds']:.2f} | | | |")
    probe = results.get("second_pass")
    if probe:
        lines += [
            "",
            f"Ways of taking the scoring pass without a backward pass (n = {probe['n']}, one direction, "
            f"`--second-pass-only`, load {probe['load']}); ms per example, error = largest difference from the "
            "gradient pass / its largest value:",
            "",
            "| way | ms per example | / gradient pass | error |",
            "|---|---|---|---|",
            f"| per-example gradients, then the dot (the gradient pass) | {probe['gradient_pass_ms']:.2f} | 1.00 | 0 |",
            f"| forward-mode AD (eager attention) | {probe['forward_ad_ms']:.2f} | "
            f"{probe['forward_ad_ms'] / probe['gradient_pass_ms']:.2f} | {probe['forward_ad_error']:.1e} |",
            f"| one forward pass at the moved weights (loss difference, `L(theta)` known) | "
            f"{probe['loss_difference_ms']:.2f} | {probe['loss_difference_ms'] / probe['gradient_pass_ms']:.2f} | "
            f"{probe['loss_difference_error']:.1e} |",
        ]
    lines += ["", *_verdicts(results)]
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _verdicts(results: dict[str, Any]) -> list[str]:
    """One line per goal of issue 13, computed from the numbers above."""
    out = ["Verdicts (computed from the rows above):", ""]
    runs = results.get("runs", [])
    ns = sorted({r["n"] for r in runs})
    ratios = []
    for n in ns:
        by = {r["mode"]: r for r in runs if r["n"] == n}
        for mode in ("onthefly", "onthefly-unfused", "onthefly-lossdiff"):
            if "store" in by and mode in by:
                s = by["store"]
                base = _baseline(by[mode], s["collect_seconds"] + s["score_seconds"])
                ratios.append((mode, n, by[mode]["score_seconds"] / base))
    for mode, what in (
        ("onthefly", "fused norms pass"),
        ("onthefly-unfused", "separate norms pass"),
        ("onthefly-lossdiff", "fused norms pass, scoring by loss differences (approximate)"),
    ):
        mine = [(n, r) for m, n, r in ratios if m == mode]
        if mine:
            text = ", ".join(f"{r:.2f} at n={n:,}" for n, r in mine)
            met = all(r <= 1.6 for _, r in mine)
            out.append(
                f"* on-the-fly ({what}) / (collection + DataInf): {text} (goal <= 1.6: {'met' if met else 'missed'})."
            )
    for key, what in (("curve", "this model"), ("demo", "the demo")):
        block = results.get(key)
        if block:
            good = [r for r in block["curve"] if r["k"] is not None and r["spearman"] >= 0.9]
            best = max(good, key=lambda r: r["bytes_ratio"], default=None)
            if best is None:
                out.append(f"* projected store on {what}: no k reaches Spearman 0.9.")
            else:
                verdict = "met" if best["bytes_ratio"] >= 16 else "missed"
                out.append(
                    f"* projected store on {what}: largest reduction at Spearman >= 0.9 is {best['bytes_ratio']:.1f}x "
                    f"(k={best['k']}, Spearman {best['spearman']:.3f}); goal >= 16x: {verdict}."
                )
    if len(ns) > 1:
        for mode in MODES:
            values = [r["peak_rss"] for r in runs if r["mode"] == mode]
            if len(values) > 1:
                spread = max(values) / min(values)
                out.append(
                    f"* peak RSS, {mode}: largest / smallest over n = {ns[0]:,}..{ns[-1]:,} is {spread:.2f} "
                    f"(goal: within 1.20: {'met' if spread <= 1.2 else 'missed'})."
                )
    elif ns:
        out.append(f"* peak RSS vs n: only n = {ns[0]:,} was measured, so flatness in n is not shown.")
    plans = results.get("plans", [])
    worst = []
    for entry in plans:
        run = next((r for r in runs if r["n"] == entry["n"] and r["mode"] == entry["mode"]), None)
        if run is None:
            continue
        plan = entry["plan"]
        peak = plan["methods"][0]["peak_bytes"]
        if not entry["mode"].startswith("onthefly"):
            peak = max(peak, plan["collection_peak_bytes"])
        worst.append(abs(peak / run["peak_rss"] - 1))
        if run["train_bytes"]:
            worst.append(abs(plan["store_bytes"] / run["train_bytes"] - 1))
    if worst:
        out.append(
            f"* `datainf plan` against the measurements: largest relative error of its bytes and peak RSS figures "
            f"{max(worst):.0%} (goal: within 20 %: {'met' if max(worst) <= 0.2 else 'missed'}); its seconds come from "
            "one batch timed on the same busy machine, so they are a rough guide only."
        )
    return out


def _hand_run_section() -> str:
    """Part 1's hand-run measurement, kept below this benchmark's own section."""
    if not RESULTS_MD.is_file():
        return ""
    text = RESULTS_MD.read_text()
    for title in (HAND_RUN_TITLE, KEPT_TITLE):
        start = text.find(title)
        if start >= 0:
            body = text[start + len(title) :].split("\n## ", 1)[0]
            return "\n" + KEPT_TITLE + "\n" + body.strip("\n") + "\n"
    return ""


def write(results: dict[str, Any]) -> None:
    hand = _hand_run_section()
    RESULTS_JSON.write_text(json.dumps(results, indent=1, default=str))
    RESULTS_MD.write_text(render(results) + hand)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[1000])
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--demo-only", action="store_true")
    parser.add_argument("--curve-n", type=int, help="the n whose stores the k curve sketches (default: the first --n)")
    parser.add_argument("--no-demo", action="store_true")
    parser.add_argument("--no-curve", action="store_true", help="keep the recorded k curve (do not sketch again)")
    parser.add_argument(
        "--score-run-only",
        action="store_true",
        help="only time `datainf score --train-data` at the first --n, with and without the recorded losses",
    )
    parser.add_argument(
        "--second-pass-only",
        action="store_true",
        help="only time the ways of taking the scoring pass on 256 examples (gradients, forward AD, loss differences)",
    )
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--plans-only", action="store_true", help="recompute the plan rows of the measured runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "curve":
            result = curve_worker(args.worker_n, WORK)
        elif args.worker == "second-pass":
            result = second_pass_worker(args.worker_n, WORK)
        elif args.worker.startswith("score-run-"):
            result = score_run_worker(args.worker_n, WORK, recorded=args.worker == "score-run-recorded")
        elif args.worker.startswith("plan-"):
            mode = args.worker[len("plan-") :]
            scoring = "loss-difference" if mode == "onthefly-lossdiff" else "gradients"
            planned = "on-the-fly" if mode.startswith("onthefly") else mode
            result = plan_worker(planned, args.worker_n, args.k, WORK, scoring=scoring)
            result["mode"] = mode
        else:
            result = worker(args.worker, args.worker_n, args.k, WORK)
        print(json.dumps(result, default=str))
        return 0

    results: dict[str, Any] = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {}
    if args.render_only:
        write(results)
        return 0
    if args.plans_only:
        for run in results.get("runs", []):
            entry = _spawn("--worker", f"plan-{run['mode']}", "--worker-n", str(run["n"]), "--k", str(args.k))
            results["plans"] = [
                p for p in results["plans"] if not (p["n"] == run["n"] and p["mode"] == run["mode"])
            ] + [entry]
            write(results)
        return 0
    if args.score_run_only:
        WORK.mkdir(parents=True, exist_ok=True)
        build_model(WORK)
        runs = [
            _spawn("--worker", f"score-run-{way}", "--worker-n", str(args.n[0])) for way in ("recorded", "own-pass")
        ]
        same = load_file(str(WORK / "score-run" / "losses-recorded.safetensors"))["values"].equal(
            load_file(str(WORK / "score-run" / "losses-own-pass.safetensors"))["values"]
        )
        results["score_run"] = {"runs": runs, "same_losses": bool(same)}
        write(results)
        return 0
    if args.second_pass_only:
        WORK.mkdir(parents=True, exist_ok=True)
        build_model(WORK)
        results["second_pass"] = _spawn("--worker", "second-pass", "--worker-n", "256")
        write(results)
        return 0
    if not args.no_demo:
        print(f"demo curve (load {_uptime()})", flush=True)
        results["demo"] = demo_curve()
        write(results)
    if args.demo_only:
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    build_model(WORK)
    results["setting"] = {"model": "4 layers, hidden 512, intermediate 1376, 8 heads, vocab 2,004", "k": args.k}
    results.setdefault("runs", [])
    results["plans"] = results.get("plans", [])
    for n in args.n:
        for mode in args.modes:
            print(f"n={n} {mode} (load {_uptime()})", flush=True)
            run = _spawn("--worker", mode, "--worker-n", str(n), "--k", str(args.k))
            if mode == "store":  # the on-the-fly runs not measured again keep the store seconds of their own session
                for old in results["runs"]:
                    if old["n"] == n and old["mode"] == "store":
                        for other in results["runs"]:
                            if (
                                other["n"] == n
                                and other["mode"].startswith("onthefly")
                                and other["mode"] not in args.modes
                            ):
                                other.setdefault("baseline_seconds", old["collect_seconds"] + old["score_seconds"])
            results["runs"] = [r for r in results["runs"] if not (r["n"] == n and r["mode"] == mode)] + [run]
            results["setting"]["numbers_per_example"] = (
                next(r["numbers_per_example"] for r in results["runs"] if r["mode"] != "projected")
                if any(r["mode"] != "projected" for r in results["runs"])
                else None
            )
            write(results)

        lossdiff = WORK / f"scores-onthefly-lossdiff-{n}.safetensors"
        if "onthefly-lossdiff" in args.modes and (WORK / f"scores-store-{n}.safetensors").is_file():
            full = load_file(str(WORK / f"scores-store-{n}.safetensors"))["values"]
            approx = load_file(str(lossdiff))["values"]
            for r in results["runs"]:
                if r["n"] == n and r["mode"] == "onthefly-lossdiff":
                    r["accuracy"] = _accuracy(approx, full)
        if "projected" in args.modes and "store" in args.modes:
            full = load_file(str(WORK / f"scores-store-{n}.safetensors"))["values"]
            sketch = load_file(str(WORK / f"scores-projected-{n}.safetensors"))["values"]
            for r in results["runs"]:
                if r["n"] == n and r["mode"] == "projected":
                    r["spearman"] = _spearman(sketch, full)
        for mode in args.modes:
            print(f"plan n={n} {mode}", flush=True)
            entry = _spawn("--worker", f"plan-{mode}", "--worker-n", str(n), "--k", str(args.k))
            results["plans"] = [p for p in results["plans"] if not (p["n"] == n and p["mode"] == mode)] + [entry]
        write(results)
    curve_n = args.curve_n or args.n[0]
    if not args.no_curve and (WORK / f"store-store-{curve_n}").is_dir():
        print(f"curve n={curve_n}", flush=True)
        results["curve"] = _spawn("--worker", "curve", "--worker-n", str(curve_n))
        write(results)
    for n in {*args.n, curve_n}:
        for mode in ("store", "projected"):
            shutil.rmtree(WORK / f"store-{mode}-{n}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
