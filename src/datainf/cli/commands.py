"""The ``datainf`` subcommands: each turns the resolved settings into one :mod:`datainf.workflows` call
and prints what it did. Everything that computes or writes lives in the library.

``score`` and ``demo`` take ``--json``: their summary is then printed as one JSON object on stdout
(nothing else goes to stdout; progress bars and logs go to stderr), for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datainf.cli.explain import cmd_explain
from datainf.distributed import is_main_process
from datainf.errors import ConfigError
from datainf.scores import SIGN_CONVENTION
from datainf.workflows import (
    FinetuneSettings,
    GradientsSettings,
    ReportSettings,
    ScoreSettings,
    finetune_run,
    gradients_run,
    report_run,
    score_run,
    settings_from_mapping,
)

__all__ = [
    "cmd_finetune",
    "cmd_grads",
    "cmd_score",
    "cmd_report",
    "cmd_evaluate",
    "cmd_clean",
    "cmd_plan",
    "cmd_demo",
    "HANDLERS",
    "scores_files",
]

logger = logging.getLogger(__name__)

#: Score tables ``datainf score`` writes next to each ``scores-<method>.safetensors``.
_TABLE_SUFFIXES = (".csv", ".parquet")


def _jsonable(value: Any) -> Any:
    """``json.dumps`` default: numpy / torch scalars as numbers, paths (and anything else) as strings."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(value)


def _print_json(summary: dict[str, Any]) -> None:
    """One JSON object on one line of stdout; non-finite numbers become ``null`` (strict JSON)."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    print(json.dumps(finite(json.loads(json.dumps(summary, default=_jsonable))), allow_nan=False))


def cmd_finetune(config: dict[str, Any]) -> int:
    """``datainf finetune``: LoRA fine-tuning; writes ``<out>/adapter`` and ``<out>/config.json``."""
    settings = settings_from_mapping(FinetuneSettings, config)
    result = finetune_run(settings, overwrite=config["overwrite"], progress=not config["quiet"])
    if result.reused:
        print(f"adapter (already trained with these settings): {result.adapter}")
        return 0
    for line in _epoch_table(result.epochs, result.best_epoch, result.kept_epoch, keep_best=result.settings.keep_best):
        print(line)
    print(f"adapter: {result.adapter}")
    return 0


def _epoch_table(epochs: Sequence[dict[str, Any]], best: int | None, kept: int | None, *, keep_best: bool) -> list[str]:
    """``datainf finetune``'s per-epoch table: training loss, and with ``--eval-data`` validation loss
    and accuracy, the best epoch marked; then which epoch's adapter was kept."""
    with_eval = any("eval_loss" in e for e in epochs)
    with_acc = any("eval_accuracy" in e for e in epochs)
    header = f"{'epoch':>5}  {'train loss':>10}"
    if with_eval:
        header += f"  {'val loss':>9}"
    if with_acc:
        header += f"  {'val acc':>7}"
    lines = [header]
    for e in epochs:
        row = f"{e['epoch']:>5}  {e['loss']:>10.4f}"
        if with_eval:
            row += f"  {e['eval_loss']:>9.4f}" if "eval_loss" in e else f"  {'-':>9}"
        if with_acc:
            row += f"  {e['eval_accuracy']:>7.3f}" if "eval_accuracy" in e else f"  {'-':>7}"
        if best is not None and e["epoch"] == best:
            row += "  best"
        lines.append(row)
    if best is not None:
        if keep_best:
            which = "the best (--keep-best)"
        else:
            which = "the last" + (" (--keep-best keeps the best)" if kept != best else "")
        lines.append(f"best epoch (lowest validation loss): {best}; adapter kept: epoch {kept}, {which}")
    return lines


def cmd_grads(config: dict[str, Any]) -> int:
    """``datainf grads``: per-example gradients of ``--data`` into the store folder ``<out>``.

    Under ``torchrun`` every rank runs the same command; rank 0 prints.
    """
    settings = settings_from_mapping(GradientsSettings, config)
    result = gradients_run(settings, overwrite=config["overwrite"], progress=not config["quiet"])
    if is_main_process():
        store = result.store
        processes = f" by {result.world_size} processes" if result.world_size > 1 else ""
        print(
            f"gradients: {store.num_examples} examples x {len(store.block_dims)} blocks "
            f"({sum(store.block_dims.values())} parameters){processes}"
        )
        print(f"store: {result.out}")
        if result.resumed_examples:
            print(
                f"resumed: {result.resumed_examples} of {store.num_examples} examples were already collected "
                "(kept, not recomputed)"
            )
    return 0


def cmd_score(config: dict[str, Any]) -> int:
    """``datainf score``: ``<out>/scores-<method>.safetensors`` + a table per method; rank 0 prints."""
    from datainf.methods.lissa import LissaDivergenceWarning

    settings = settings_from_mapping(ScoreSettings, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LissaDivergenceWarning)  # said once below, in the command line's words
        result = score_run(settings, overwrite=config["overwrite"], progress=not config["quiet"])
    if not is_main_process():
        return 0
    for row in result.methods:
        if _diverged(row.scores):
            blocks = row.scores.diagnostics.get("lissa_diverged_blocks") or []
            print(
                f"warning: LiSSA diverged on {len(blocks) or 'some'} block(s) (the residual grew); its scores are "
                'unreliable. Rerun with --method-options \'{"lissa": {"scale": "trace"}}\', which always '
                "converges.",
                file=sys.stderr,
            )
            break
    if config.get("json"):
        _print_json(
            {
                "command": "score",
                "sign_convention": SIGN_CONVENTION,
                "out": str(result.out),
                "mode": result.settings.mode,
                "methods": [
                    {
                        "method": row.method,
                        "reused": row.reused,
                        "seconds": row.scores.diagnostics.get("seconds"),
                        "diverged": _diverged(row.scores),
                        "scores": str(row.path),
                        "table": str(row.table),
                        "top_harmful": [{"id": i, "score": v} for i, v in row.scores.top_harmful(10)],
                        "top_helpful": [{"id": i, "score": v} for i, v in row.scores.top_helpful(10)],
                    }
                    for row in result.methods
                ],
                "stage_seconds": result.stage_seconds,
            }
        )
        return 0
    print(f"# {SIGN_CONVENTION}")
    others: dict[str, list[str]] = {}  # self-influence, the loss baseline: what their values mean
    for row in (r for r in result.methods if r.scores.sign_convention != SIGN_CONVENTION):
        others.setdefault(row.scores.sign_convention, []).append(row.method)
    for meaning, names in others.items():
        print(f"# {', '.join(names)}: {meaning}")
    print(f"{'method':<14} {'seconds':>8}  most harmful training examples")
    for row in result.methods:
        top = ", ".join(f"{tid} ({value:+.3g})" for tid, value in row.scores.top_harmful(3))
        seconds = row.scores.diagnostics.get("seconds")
        shown = "reused" if row.reused else (f"{seconds:.2f}" if isinstance(seconds, (int, float)) else "-")
        name = f"{row.method} (diverged)" if _diverged(row.scores) else row.method
        print(f"{name:<14} {shown:>8}  {top}")
    for row in result.methods:
        print(f"scores ({row.method}): {row.path}  table: {row.table}")
    return 0


def _diverged(scores: Any) -> bool:
    """Whether these scores come from a LiSSA run that diverged (``diagnostics["lissa_diverged"]``)."""
    return bool(scores.diagnostics.get("lissa_diverged"))


def scores_files(paths: Sequence[str] | None) -> list[str] | None:
    """The scores files that ``--scores`` names: a file as given; a folder (the ``--out`` of
    ``datainf score``) -> every ``scores-*.safetensors`` in it; a score table (``.csv`` / ``.parquet``) ->
    the ``.safetensors`` file ``datainf score`` wrote next to it.

    Raises:
        ConfigError: a folder without scores files, or a table without its scores file.
    """
    if paths is None:
        return None
    out: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(path.glob("scores-*.safetensors"))
            if not found:
                raise ConfigError(
                    f"--scores {path} is a folder without scores-*.safetensors files; pass the --out folder of "
                    "`datainf score` or one of its scores-<method>.safetensors files."
                )
            out.extend(str(file) for file in found)
        elif path.suffix.lower() in _TABLE_SUFFIXES:
            scores = path.with_suffix(".safetensors")
            if not scores.is_file():
                raise ConfigError(
                    f"--scores {path} is a score table; the report reads the scores file `datainf score` writes next "
                    f"to it, {scores.name}, which is not there. Pass that file (or the score run's folder)."
                )
            logger.info("--scores %s: reading %s, the scores that table was written from.", path, scores)
            out.append(str(scores))
        else:
            out.append(str(path))
    return out


def cmd_report(config: dict[str, Any]) -> int:
    """``datainf report``: ``<out>/index.html`` with the top harmful / helpful training examples.

    ``--scores`` may name scores files, score run folders and score tables (see :func:`scores_files`).
    """
    config = {**config, "scores": scores_files(config.get("scores"))}
    result = report_run(settings_from_mapping(ReportSettings, config), overwrite=config["overwrite"])
    print(f"report: {result.path}")
    return 0


#: ``datainf demo``'s flags that choose the mislabel demo's rows (flag, setting).
_DEMO_ROW_FLAGS = (("--methods", "methods"), ("--variants", "variants"), ("--no-variants", "no_variants"))


def cmd_demo(config: dict[str, Any], args: argparse.Namespace) -> int:
    """``datainf demo``: delegates to :func:`datainf.demos.main_demo` (the mislabel demo or an explain demo);
    with ``--json`` runs the demo and prints its summary as one JSON object instead. ``--methods``,
    ``--variants`` and ``--no-variants`` choose the mislabel demo's rows
    (:func:`datainf.demos.mislabel.demo_rows`) and are refused with another ``--task``."""
    from datainf import demos

    rows = [flag for flag, key in _DEMO_ROW_FLAGS if config.get(key)]
    task = config.get("task") or "mislabel"
    if rows and task != "mislabel":
        raise ConfigError(
            f"{' and '.join(rows)} choose the rows of the mislabel demo's table; --task {task} takes none of them "
            "(drop them, or use --task mislabel)."
        )
    if config.get("json"):
        _print_json(_demo_summary(config))
        return 0
    namespace = argparse.Namespace(**config, config=getattr(args, "config", None))
    return int(demos.main_demo(namespace))


def _demo_summary(config: dict[str, Any]) -> dict[str, Any]:
    """Run the demo of ``config["task"]`` and return what ``datainf demo`` prints, as JSON-able data."""
    from datainf import demos

    task = config.get("task") or "mislabel"
    seed = config.get("seed") or 0
    progress = not config.get("quiet", False)
    recompute = bool(config.get("recompute", False))
    if task == "mislabel":
        from datainf.demos.mislabel import demo_options

        chosen = demo_options(
            config.get("methods"),
            config.get("variants"),
            no_variants=bool(config.get("no_variants")),
            cleaning=bool(config.get("cleaning")),
        )
        result = demos.run_mislabel_demo(
            demos.MislabelDemoConfig(seed=seed),
            out_dir=config.get("out") or "datainf-out/demo",
            recompute=recompute,
            progress=progress,
            **chosen,
        )
        return {
            "command": "demo",
            "task": task,
            "table": result.table,
            "stage_seconds": result.stage_seconds,
            "report": str(Path(result.report).resolve()),
            "cache": str(result.cache),
        }
    generation, report = demos.run_generation_demo(
        task, config.get("dataset"), out_dir=config.get("out"), seed=seed, recompute=recompute, progress=progress
    )
    return {
        "command": "demo",
        "task": task,
        "dataset": generation.dataset,
        "metrics": generation.metrics,
        "quality": generation.quality,
        "stage_seconds": generation.stage_seconds,
        "report": str(Path(report).resolve()),
    }


def cmd_evaluate(config: dict[str, Any]) -> int:
    """``datainf evaluate lds``: retrain the recipe on random subsets, print each scores file's LDS."""
    from datainf.counterfactual import lds_run, lds_settings

    result = lds_run(lds_settings(config), overwrite=config["overwrite"], progress=not config["quiet"])
    print("# LDS: Spearman of (sum of pairwise influences over a subset) and the retrained test loss; random ~ 0")
    print(f"{'scores':<20} {'LDS':>7}  {'interval':>17}  undefined")
    for name, row in result.results.items():
        low, high = row.interval
        print(f"{name:<20} {row.mean:>7.3f}  [{low:>6.3f}, {high:>6.3f}]  {row.n_undefined}/{len(row.per_test)}")
    retrains = result.retrains
    print(f"retrains: {len(retrains.seconds)} ({retrains.reused} reused) in {retrains.out}; results: {result.path}")
    return 0


def cmd_clean(config: dict[str, Any]) -> int:
    """``datainf clean``: the dataset without its top ``--remove-top`` % (or relabelled), a review table."""
    from datainf.clean import CleanSettings, clean_dataset

    settings = settings_from_mapping(CleanSettings, config)
    result = clean_dataset(settings, overwrite=config["overwrite"], progress=not config["quiet"])
    action = f"{len(result.relabelled)} relabelled" if config["relabel"] else f"{len(result.removed)} removed"
    print(f"flagged {len(result.flagged)} examples (top {config['remove_top']:g} % by score): {action}")
    for name, metrics in (("original", result.before), ("cleaned", result.after)):
        if metrics is not None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"retrained on the {name} data: {shown}")
    print(f"cleaned data: {result.data}\nreview: {result.review}")
    return 0


#: The subcommands that take only their resolved settings (``demo`` also gets the parsed arguments).
def cmd_plan(config: dict[str, Any]) -> int:
    """``datainf plan``: the memory, disk and time figures of :func:`datainf.plan.make_plan`, printed."""
    from dataclasses import fields

    from datainf.errors import ConfigError
    from datainf.plan import PlanSettings, make_plan

    for flag, key in (("--model", "model"), ("--n", "n"), ("--seq-len", "seq_len")):
        if config.get(key) is None:
            raise ConfigError(f"datainf plan needs {flag}.")
    names = {f.name for f in fields(PlanSettings)}
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
    plan = make_plan(PlanSettings(**values))
    if config.get("json"):
        _print_json({"command": "plan", **plan.to_dict()})
    else:
        print(plan.format())
    return 0


HANDLERS: dict[str, Callable[[dict[str, Any]], int]] = {
    "finetune": cmd_finetune,
    "grads": cmd_grads,
    "score": cmd_score,
    "report": cmd_report,
    "evaluate": cmd_evaluate,
    "clean": cmd_clean,
    "explain": cmd_explain,
    "plan": cmd_plan,
}
