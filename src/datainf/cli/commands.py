"""The ``datainf`` subcommands: each turns the resolved settings into one :mod:`datainf.workflows` call
and prints what it did. Everything that computes or writes lives in the library."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from datainf.distributed import is_main_process
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

__all__ = ["cmd_finetune", "cmd_grads", "cmd_score", "cmd_report", "cmd_demo", "HANDLERS"]


def cmd_finetune(config: dict[str, Any]) -> int:
    """``datainf finetune``: LoRA fine-tuning; writes ``<out>/adapter`` and ``<out>/config.json``."""
    settings = settings_from_mapping(FinetuneSettings, config)
    result = finetune_run(settings, overwrite=config["overwrite"], progress=not config["quiet"])
    if result.reused:
        print(f"adapter (already trained with these settings): {result.adapter}")
        return 0
    print(f"training loss per epoch: {', '.join(f'{loss:.4f}' for loss in result.epoch_losses)}")
    print(f"adapter: {result.adapter}")
    return 0


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
    return 0


def cmd_score(config: dict[str, Any]) -> int:
    """``datainf score``: ``<out>/scores-<method>.safetensors`` + a table per method; rank 0 prints."""
    settings = settings_from_mapping(ScoreSettings, config)
    result = score_run(settings, overwrite=config["overwrite"], progress=not config["quiet"])
    if not is_main_process():
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
        print(f"{row.method:<14} {shown:>8}  {top}")
    for row in result.methods:
        print(f"scores ({row.method}): {row.path}  table: {row.table}")
    return 0


def cmd_report(config: dict[str, Any]) -> int:
    """``datainf report``: ``<out>/index.html`` with the top harmful / helpful training examples."""
    result = report_run(settings_from_mapping(ReportSettings, config), overwrite=config["overwrite"])
    print(f"report: {result.path}")
    return 0


def cmd_demo(config: dict[str, Any], args: argparse.Namespace) -> int:
    """``datainf demo``: delegates to :func:`datainf.demos.main_demo` (the mislabel demo or an explain demo)."""
    from datainf import demos

    namespace = argparse.Namespace(**config, config=getattr(args, "config", None))
    return int(demos.main_demo(namespace))


#: The subcommands that take only their resolved settings (``demo`` also gets the parsed arguments).
HANDLERS: dict[str, Callable[[dict[str, Any]], int]] = {
    "finetune": cmd_finetune,
    "grads": cmd_grads,
    "score": cmd_score,
    "report": cmd_report,
}
