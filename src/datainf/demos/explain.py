"""``datainf demo --task text-generation|text-to-image``: the paper's explain-a-generation demos.

* ``--task text-generation --dataset sentence|math|math-reason``: the packaged MiniLM-L6 used as a
  causal decoder is LoRA-fine-tuned on one of the paper's template-generated text tasks
  (:func:`datainf.explain.text_generation.run_text_generation`);
* ``--task text-to-image --dataset style|subject``: a small text-conditioned UNet (shipped base
  weights, MiniLM text embeddings) gets a LoRA fine-tune on its attention projections
  (:func:`datainf.explain.text_to_image.run_text_to_image`).

Both print the class-detection table (AUC of ``-I`` against "same class", recall among the most
helpful examples; mean ± std over test examples) and write an HTML report showing, for sampled test
prompts, the generation beside its most helpful and most harmful training examples. Artefacts
(adapter, gradients, generations) are cached under the output folder, in the pipeline's
``cache-<key>`` :class:`~datainf.runs.RunDir`, and reused unless ``--recompute`` is given.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datainf.errors import ConfigError
from datainf.explain.common import ExplanationResult, format_generation_table
from datainf.runs import RunDir

if TYPE_CHECKING:
    from datainf.explain.text_generation import TextGenerationConfig
    from datainf.explain.text_to_image import TextToImageConfig

__all__ = ["DATASETS", "run_generation_demo", "main_generation_demo"]

logger = logging.getLogger(__name__)

#: The datasets of each task; the first is the default.
DATASETS: dict[str, tuple[str, ...]] = {
    "text-generation": ("sentence", "math", "math-reason"),
    "text-to-image": ("style", "subject"),
}


def _resolve(task: str, dataset: str | None) -> str:
    if task not in DATASETS:
        raise ConfigError(f"Unknown demo task {task!r}; choose mislabel, {', '.join(DATASETS)}.")
    if dataset is None:
        return DATASETS[task][0]
    if dataset not in DATASETS[task]:
        raise ConfigError(
            f"--dataset {dataset!r} does not belong to --task {task}; choose one of {list(DATASETS[task])}."
        )
    return dataset


def run_generation_demo(
    task: str,
    dataset: str | None = None,
    *,
    out_dir: str | Path | None = None,
    seed: int = 0,
    recompute: bool = False,
    progress: bool = True,
    methods: Sequence[str] | None = None,
    normalize: bool = False,
    self_influence: bool = False,
) -> tuple[ExplanationResult, Path]:
    """Run one experiment with its default configuration and write its report.

    ``methods`` (any registered method; ``None``: the configuration's default), ``normalize`` and
    ``self_influence`` (``mode="self"`` scores, :attr:`ExplanationResult.self_scores`) are passed to
    the pipeline's configuration; they change the scoring only (the cached adapter and gradients are reused).

    Returns:
        ``(result, path of the report's index.html)``. ``out_dir`` defaults to
        ``datainf-out/demo-<task>-<dataset>``; ``summary.json`` there holds the metrics and timings.
    """
    from datainf.report import write_generation_report

    dataset = _resolve(task, dataset)
    scoring: dict[str, Any] = {}  # only what differs from the configuration's defaults
    if methods is not None:
        scoring["methods"] = tuple(methods)
    if normalize:
        scoring["normalize"] = True
    if self_influence:
        scoring["self_influence"] = True
    out_path = Path(out_dir) if out_dir is not None else Path("datainf-out") / f"demo-{task}-{dataset}"
    config: TextGenerationConfig | TextToImageConfig
    if task == "text-generation":
        from datainf.explain.text_generation import TextGenerationConfig, run_text_generation

        config = TextGenerationConfig(dataset=dataset, seed=seed, **scoring)
        result = run_text_generation(config, out_dir=out_path, recompute=recompute, progress=progress)
    else:
        from datainf.explain.text_to_image import TextToImageConfig, run_text_to_image

        config = TextToImageConfig(dataset=dataset, seed=seed, **scoring)
        result = run_text_to_image(config, out_dir=out_path, recompute=recompute, progress=progress)
    # the demo's own folder (report and summary; the pipeline's cache folder is inside it), not claimed:
    # runs of other seeds share it
    out = RunDir(out_path, kind=f"demo-{task}")
    with out.timed("report"):
        report = write_generation_report(out.stage("report"), result)
    result.stage_seconds.update(out.stage_seconds)
    summary = {
        "task": task,
        "dataset": dataset,
        "config": asdict(config) if is_dataclass(config) else str(config),
        "quality": result.quality,
        "metrics": result.metrics,
        "stage_seconds": result.stage_seconds,
    }
    out.write_json("summary.json", summary)
    return result, report


def main_generation_demo(args: argparse.Namespace) -> int:
    """CLI entry (``datainf demo --task ...``): run, print the table, name the report."""
    task = str(args.task)
    started = time.perf_counter()
    result, report = run_generation_demo(
        task,
        getattr(args, "dataset", None),
        out_dir=getattr(args, "out", None),
        seed=getattr(args, "seed", 0) or 0,
        recompute=bool(getattr(args, "recompute", False)),
        progress=not getattr(args, "quiet", False),
    )
    kind = "image" if task == "text-to-image" else "answer"
    print(
        f"\nWhich training examples drove each test {kind}? {task}, dataset {result.dataset}: "
        f"{len(result.train)} training and {len(result.test)} test examples, {len(result.class_names)} classes."
    )
    print("Influence > 0 = harmful (raises the test example's loss); same-class examples should be the most helpful.\n")
    print(format_generation_table(result.metrics))
    if result.quality:
        print("\nFine-tuned model: " + ", ".join(f"{k} {v:.3f}" for k, v in result.quality.items()))
    print("Stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items()))
    print(f"Total {time.perf_counter() - started:.1f} s. Report: {report.resolve()}")
    return 0
