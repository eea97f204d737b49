"""``datainf plan``: memory, disk and time of a run, before any work.

From a base model's ``config.json`` (the model is built on the meta device: no weights are read or
allocated), an adapter folder or a LoRA configuration (rank, target modules), a dataset size, a
sequence length and a mode (``store``, ``on-the-fly`` or ``projected``), :func:`make_plan` works out
what the code will allocate:

* the blocks (:func:`datainf.gradients.find_lora_blocks` on the meta model): their count ``L``, the
  numbers per example ``D = sum_l d_l``, the largest block; with a projection the stored sizes
  ``k_l`` (:class:`~datainf.gradients.projection.GradientProjector`);
* store bytes: ``n (D_s s + 8 L)`` plus shard headers and the manifest (``s`` the storage dtype's
  size; the store's own :meth:`~datainf.store.DiskGradientStore.expected_bytes`), the test store's,
  and, on the fly, only the ``n x L`` float64 norms checkpoint;
* peak memory of gradient collection: the runtime already in this process (Python, torch,
  transformers, peft and the model's classes: its resident size once the meta model is built), the model's weights, the activations autograd
  saves for one batch (counted exactly by running one batch of ``seq_len`` tokens through the meta
  model under :func:`torch.autograd.graph.saved_tensors_hooks`, so attention's ``T^2`` terms are in),
  the logits' gradient, two copies of one batch of per-example gradients, the store's shard buffer
  (twice: it is concatenated when written) and the projection matrices;
* peak memory of each method: one streamed batch of ``score_batch_size`` rows (from a store: plus
  the shard it is read from; on the fly: plus the collection's own peak, since the model runs in the
  same process), the test gradients and the method's own state (a multiple of ``m D_s``,
  :data:`METHOD_COSTS`); Exact's per-group ``d_l x d_l`` Gram matrices (or ``n x d_l`` rows) and
  K-FAC / EK-FAC's factors, eigenbases and eigenvalues as their code allocates them
  (:func:`method_bytes`), with the verdicts the methods reach themselves: K-FAC / EK-FAC refuse
  factors above ``max_memory_gb`` or on a projected store, Exact solves a block above its budget in
  a pass of its own; with ``memory_gb`` every peak is marked as fitting or not;
* streaming passes over the training gradients, and how many forward/backward passes over the
  training data they cost (on the fly: one per pass plus the norms pass, which DataInf fuses into its
  sum pass at the cost of a small pilot, and, for K-FAC / EK-FAC, the pass that collects the factors;
  one table, :data:`METHOD_COSTS`);
* when the model's weights are in the folder and it is small enough to run here, seconds per
  example, measured on one batch of random tokens through the real hooks.

The figures are estimates of what the code allocates, not measurements of a run: ``benchmarks/bench_scale.py``
puts them next to measured peak RSS and disk bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from datainf.errors import ConfigError, LoRAValidationError
from datainf.gradients.source import DEFAULT_PILOT_ROWS
from datainf.methods import check_method_names
from datainf.methods.datainf_method import DataInf
from datainf.methods.exact import exact_block_numbers, exact_groups
from datainf.methods.scoring import LOSS_DIFFERENCE_CHECK_ROWS, STEP_FACTORS

__all__ = [
    "PLAN_MODES",
    "METHOD_COSTS",
    "MethodCost",
    "PlanSettings",
    "GradientPlan",
    "MethodPlan",
    "make_plan",
    "method_bytes",
    "format_bytes",
]

logger = logging.getLogger(__name__)

PLAN_MODES = ("store", "on-the-fly", "projected")


@dataclass(frozen=True)
class MethodCost:
    """How :func:`make_plan` models one method (a row of :data:`METHOD_COSTS`), from what its code allocates.

    Attributes:
        state: multiples of ``m D_s`` numbers (compute dtype) the method keeps: ``V``, ``R``, running sums.
        extra: multiples of ``D_s`` numbers (compute dtype), e.g. a per-parameter sum.
        passes: streaming passes over the training gradients before the scoring pass: a number, or
            ``"iterations"`` (LiSSA's ``lissa_iterations``), ``"groups"`` (Exact: one per group of blocks
            that fits ``max_memory_gb``, :func:`datainf.methods.exact.exact_groups`), ``"uncovered"`` (K-FAC:
            1 when some block has no Kronecker factors, else 0).
        norms_passes: on the fly, forward/backward passes over the training data for the recorded squared
            norms (the damping needs them before the method's first pass).
        factor_passes: on the fly, forward/backward passes that collect the Kronecker factors (kfac / ekfac).
        needs_factors: the method reads the Kronecker factors collected beside the store.
        fused_terms: on the fly, the method fuses the norms pass into its first pass (DataInf,
            docs/method.md section 6.1): no norms pass but a pilot of ``DEFAULT_PILOT_ROWS`` examples, and
            this many more ``m D_s`` accumulators (the Taylor terms) during that pass; ``0``: no fusion.
        self_passes: streaming passes of its self-influence (``mode="self"``, no scoring pass): a number, or
            ``"chunks+1"`` (one pass per chunk of ``score_batch_size`` training rows, plus the pass that reads
            the chunks), ``"iterations*chunks+1"`` (LiSSA), ``"2groups"`` (Exact, at most), ``"uncovered+1"``
            (K-FAC).
        self_chunk: its self-influence holds a chunk of ``score_batch_size`` training rows as test vectors.
    """

    state: int
    extra: int
    passes: int | str
    norms_passes: int = 1
    factor_passes: int = 0
    needs_factors: bool = False
    fused_terms: int = 0
    self_passes: int | str = 1
    self_chunk: bool = False


#: The one table of every modelled method's state and pass counts (``src/datainf/methods/``). Exact,
#: K-FAC and EK-FAC also get their own float64 matrices counted by :func:`method_bytes`.
METHOD_COSTS: dict[str, MethodCost] = {
    # V_l and the running sum C_l X_l; on the fly its K more Taylor terms replace the norms pass
    "datainf": MethodCost(2, 0, 1, fused_terms=DataInf.taylor_order, self_passes="chunks+1", self_chunk=True),
    "hessian_free": MethodCost(1, 0, 0, self_passes=0),  # R = V; self: the recorded norms
    "lissa": MethodCost(3, 0, "iterations", self_passes="iterations*chunks+1", self_chunk=True),
    "diagonal": MethodCost(2, 1, 1, self_passes=2),  # V and R, plus the per-parameter sum of squares
    "exact": MethodCost(1, 0, "groups", self_passes="2groups"),  # R, plus the Gram matrices: method_bytes
    "kfac": MethodCost(1, 0, "uncovered", factor_passes=1, needs_factors=True, self_passes="uncovered+1"),
    "ekfac": MethodCost(1, 0, 1, factor_passes=1, needs_factors=True, self_passes=2),  # + eigenbases, D_l
}

_DTYPE_SIZES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def method_bytes(
    name: str,
    block_dims: Mapping[str, int],
    n: int,
    *,
    test_rows: int,
    rows: int,
    compute: int = 4,
    factor_shapes: Mapping[str, tuple[int, int]] | None = None,
    max_memory_gb: float = 4.0,
) -> int:
    """Peak bytes of the preconditioning phase of ``exact`` / ``kfac`` / ``ekfac`` (0 for the other methods).

    What the phase holds at its worst moment, counted from the code, including the streamed batch
    (``rows`` training rows of the blocks that pass reads, in the compute dtype) while it streams:

    * ``exact``: per group of blocks (:func:`datainf.methods.exact.exact_groups`) the matrices it keeps,
      ``d_l^2`` (direct, ``d_l <= n``) or the rows ``n d_l`` (Woodbury). Streaming adds the batch, its
      Woodbury blocks in float64 (``rows d_l`` each, together) and the worst direct block's ``X^T X``
      and float64 batch (``d_l^2 + rows d_l``); solving adds the Cholesky factor and ``2 m d_l``
      (direct) or the kernel and its factor ``2 n^2`` plus ``2 n m + 3 m d_l`` (Woodbury);
    * ``kfac`` / ``ekfac``: the factor sums ``F = sum_l (p^2 + q^2)`` (read from their files), as much
      for the eigenvectors, the eigenvalues ``D_l`` (``P = sum_l p q``; EK-FAC's pass keeps a second ``P``
      for its sums) and the largest factor's copy while it is decomposed; when they stream (EK-FAC
      always, K-FAC for blocks without factors): the batch, EK-FAC's rotated rows ``Q_S^T g Q_A``
      (2 copies of ``rows x p q``) and, for blocks without factors, the damped diagonal (``d_l``) and its
      batch in float64 (2 copies of ``rows x d_l``).

    All figures are float64 numbers times 8 bytes.

    Args:
        name: the method.
        block_dims: ``d_l`` per block.
        n: training examples.
        test_rows: ``m``, the test rows preconditioned (1 in ``average`` mode).
        rows: training rows per streamed batch.
        compute: bytes per number of the compute dtype (4: float32).
        factor_shapes: ``(p, q)`` per block with Kronecker factors (K-FAC / EK-FAC; the others are
            preconditioned by their diagonal).
        max_memory_gb: the methods' ``max_memory_gb`` option (Exact's group budget).
    """
    m = test_rows
    if name == "exact":
        peak = 0
        for group in exact_groups(block_dims, sorted(block_dims), n, max_memory_gb):
            dims = [block_dims[b] for b in group]
            held = sum(8 * d * d if d <= n else 8 * n * d for d in dims)
            streamed = compute * rows * sum(dims)  # a group's pass reads only its blocks
            woodbury_rows = sum(8 * rows * d for d in dims if d > n)
            direct_pass = max((8 * d * d + 8 * rows * d for d in dims if d <= n), default=0)
            solve = max(8 * d * d + 16 * m * d if d <= n else 16 * n * n + 16 * n * m + 24 * m * d for d in dims)
            peak = max(peak, held + max(streamed + woodbury_rows + direct_pass, solve))
        return peak
    if name not in ("kfac", "ekfac"):
        return 0
    shapes = dict(factor_shapes or {})
    uncovered = [d for b, d in block_dims.items() if b not in shapes]
    factors = 8 * sum(p * p + q * q for p, q in shapes.values())
    values = 8 * sum(p * q for p, q in shapes.values())
    decompose = 8 * max((max(p * p, q * q) for p, q in shapes.values()), default=0)
    diagonal = 8 * sum(uncovered) + 16 * rows * max(uncovered, default=0) if uncovered else 0
    if name == "kfac":  # its pass (if any) reads only the blocks without factors
        return 2 * factors + values + max(decompose, compute * rows * sum(uncovered) + diagonal if uncovered else 0)
    rotated = 16 * rows * max((p * q for p, q in shapes.values()), default=0)
    streamed = compute * rows * sum(block_dims.values())
    return 2 * factors + 2 * values + max(decompose, streamed + max(rotated, diagonal))


def format_bytes(count: float) -> str:
    """``1536 -> '1.5 KiB'`` (binary units)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass(frozen=True)
class PlanSettings:
    """What to plan (``datainf plan``'s options).

    Attributes:
        model: a base model folder holding ``config.json`` (weights optional), or the ``config.json`` itself.
        n: training examples.
        seq_len: tokens per example (the padded length of a batch).
        mode: ``store`` (training gradients written once, then streamed), ``on-the-fly`` (recomputed on
            every pass, nothing written) or ``projected`` (a store of projected gradients, ``project_dim``).
        kind: task kind: ``causal-lm`` or ``classification``.
        adapter: a LoRA adapter folder (its ``adapter_config.json``); else ``r`` / ``target_modules``.
        r: LoRA rank (without ``adapter``).
        target_modules: LoRA target module names (without ``adapter``); ``None``: peft's defaults for
            the model type.
        modules_to_save: modules trained whole (e.g. a classifier head).
        num_labels: classes of a classification head.
        test_examples: test examples ``m`` (``pairwise`` mode keeps all of them; ``average`` uses 1).
        pairwise: plan the pairwise mode (state ``m x D`` instead of ``1 x D``).
        project_dim, project_seed: the projection of ``projected`` mode.
        batch_size: examples per forward/backward pass.
        score_batch_size: training rows per streamed batch.
        shard_size: examples per store shard.
        dtype: storage dtype of the gradients.
        model_dtype: dtype of the model's weights and activations.
        methods: influence methods to plan: any registered method (:func:`datainf.methods.available_methods`);
            those :data:`METHOD_COSTS` does not model are named in the notes, without figures.
        lissa_iterations: LiSSA's passes.
        max_memory_gb: the methods' ``max_memory_gb`` option: Exact's float64 budget per group of blocks
            (one pass per group), K-FAC / EK-FAC's limit on the float64 factors (above it they refuse; so
            does the collection's ``factor_memory_gb``, default the same 4).
        memory_gb: memory the run may use: every peak is compared with it (``None``: no verdict).
        measure: time one batch here (``None``: when the folder has weights and the model has under
            500 million parameters).
        out: where the store would go: its free space is compared with the store bytes.
        self_influence: plan ``mode="self"`` (each training example's self-influence: no test set and no
            scoring pass; the methods' own self-influence passes, e.g. DataInf one per chunk of
            ``score_batch_size`` rows).
        scoring: the scoring pass (:attr:`datainf.influence.InfluenceConfig.scoring`): ``gradients``, or
            ``loss-difference`` (on the fly, average mode: forward-only passes instead of the last
            gradient pass, plus the check's rows; docs/method.md section 6.2).
    """

    model: str
    n: int
    seq_len: int
    mode: str = "store"
    kind: str = "causal-lm"
    adapter: str | None = None
    r: int = 8
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] = ()
    num_labels: int = 2
    test_examples: int = 100
    pairwise: bool = False
    project_dim: int | None = None
    project_seed: int = 0
    batch_size: int = 16
    score_batch_size: int = 1024
    shard_size: int = 1024
    dtype: str = "float32"
    model_dtype: str = "float32"
    methods: tuple[str, ...] = ("datainf",)
    lissa_iterations: int = 10
    max_memory_gb: float = 4.0
    memory_gb: float | None = None
    measure: bool | None = None
    out: str | None = None
    scoring: str = "gradients"
    self_influence: bool = False

    def __post_init__(self) -> None:
        if self.mode not in PLAN_MODES:
            raise ConfigError(f"mode must be one of {PLAN_MODES}, got {self.mode!r}.")
        if self.scoring not in ("gradients", "loss-difference"):
            raise ConfigError(f"scoring must be 'gradients' or 'loss-difference', got {self.scoring!r}.")
        if self.self_influence and self.pairwise:
            raise ConfigError("Plan either pairwise scores or self-influence (no test set), not both.")
        if self.scoring == "loss-difference" and (self.mode != "on-the-fly" or self.pairwise or self.self_influence):
            raise ConfigError(
                "scoring 'loss-difference' is the scoring pass of on-the-fly training gradients in average mode: plan "
                "it with --mode on-the-fly and without --pairwise, or use --scoring gradients."
            )
        if self.mode == "projected" and self.project_dim is None:
            raise ConfigError("mode 'projected' needs project_dim (--project-dim K).")
        for name in ("n", "seq_len", "r", "batch_size", "score_batch_size", "shard_size", "test_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("dtype", "model_dtype"):
            if getattr(self, name) not in _DTYPE_SIZES:
                raise ConfigError(f"{name} must be one of {sorted(_DTYPE_SIZES)}, got {getattr(self, name)!r}.")
        check_method_names(self.methods, what="the planned methods")
        if not self.max_memory_gb > 0:
            raise ConfigError(f"max_memory_gb must be positive, got {self.max_memory_gb}.")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ConfigError(f"memory_gb must be positive, got {self.memory_gb}.")
        if self.kind not in ("causal-lm", "classification"):
            raise ConfigError(f"plan covers the kinds causal-lm and classification, not {self.kind!r}.")


@dataclass
class MethodPlan:
    """One method's figures: ``passes`` over the training gradients (scoring included), the forward /
    backward passes over the training data they cost (``pilot_rows``: examples computed once more, on
    the fly, by DataInf's fused norms pass and by the loss-difference check), ``forward_rows``: examples
    run forward only (the scoring pass by loss differences), and peak memory in bytes.

    ``own_bytes``: the method's own float64 matrices at their peak (:func:`method_bytes`; Exact,
    K-FAC, EK-FAC). ``refused``: the message the method (or the collection of its factors) would stop
    with, ``None`` when it runs. ``note``: a remark on the figures (e.g. an Exact block larger than the
    budget). ``fits``: the peak against :attr:`PlanSettings.memory_gb` (``None``: not compared).
    """

    name: str
    passes: int
    gradient_passes: int
    peak_bytes: int
    pilot_rows: int = 0
    forward_rows: int = 0
    seconds: float | None = None
    own_bytes: int = 0
    refused: str | None = None
    note: str | None = None
    fits: bool | None = None


@dataclass
class GradientPlan:
    """What :func:`make_plan` works out (bytes unless named otherwise); :meth:`format` prints it."""

    settings: dict[str, Any]
    model_type: str
    parameters: int
    blocks: int
    numbers_per_example: int
    largest_block: tuple[str, int]
    stored_per_example: int
    weights_bytes: int
    runtime_bytes: int
    activation_bytes_per_example: int
    store_bytes: int
    test_store_bytes: int
    norms_bytes: int
    projection_bytes: int
    collection_peak_bytes: int
    methods: list[MethodPlan] = field(default_factory=list)
    factor_bytes: int = 0
    seconds_per_example: float | None = None
    free_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """The plan as lines of text (one stage per line)."""
        s = self.settings
        lines = [
            f"Plan: {self.model_type}, {s['kind']}, n={s['n']:,} training examples, m={s['test_examples']:,} test, "
            f"{s['seq_len']} tokens, mode {s['mode']}"
            + (", self-influence" if s.get("self_influence") else "")
            + (f" (k={s['project_dim']})" if s["mode"] == "projected" else ""),
            f"  model: {self.parameters:,} parameters, weights {format_bytes(self.weights_bytes)} ({s['model_dtype']})",
            f"  blocks: {self.blocks}, D = sum_l d_l = {self.numbers_per_example:,} numbers per example, largest "
            f"{self.largest_block[1]:,} ({self.largest_block[0]})",
        ]
        if s["mode"] == "projected":
            lines.append(
                f"  projected: {self.stored_per_example:,} numbers per example "
                f"({self.numbers_per_example / max(self.stored_per_example, 1):.1f}x fewer), projection matrices "
                f"{format_bytes(self.projection_bytes)}"
            )
        if s["mode"] == "on-the-fly":
            lines.append(
                f"  training-gradient store: none (0 B on disk; norms checkpoint {format_bytes(self.norms_bytes)})"
            )
        else:
            lines.append(
                f"  training-gradient store: {format_bytes(self.store_bytes)} ({self.store_bytes:,} bytes, {s['dtype']})"
            )
        lines.append(f"  test-gradient store: {format_bytes(self.test_store_bytes)}")
        if self.free_bytes is not None:
            needed = (self.store_bytes if s["mode"] != "on-the-fly" else 0) + self.test_store_bytes
            verdict = "fits" if self.free_bytes >= needed else "DOES NOT FIT"
            lines.append(f"  disk at {s['out']}: {format_bytes(self.free_bytes)} free, {verdict}")
        lines.append(
            f"  gradient collection peak memory: {format_bytes(self.collection_peak_bytes)} "
            f"(runtime {format_bytes(self.runtime_bytes)} + weights + activations "
            f"{format_bytes(self.activation_bytes_per_example)} per example x {s['batch_size']} + buffers)"
        )
        if self.factor_bytes:
            lines.append(
                f"  Kronecker factors (kfac / ekfac): {format_bytes(self.factor_bytes)} float64 "
                f"(collected with the gradients: 3 sets while collecting)"
            )
        limit = s.get("memory_gb")
        if limit is not None:
            verdict = "fits" if self.collection_peak_bytes <= limit * 2**30 else "DOES NOT FIT"
            lines.append(f"  gradient collection in {limit:g} GiB of memory: {verdict}")
        scoring = "self-influence: no scoring pass" if s.get("self_influence") else "scoring included"
        for method in self.methods:
            plural = "" if method.gradient_passes == 1 else "es"
            cost = f"{method.gradient_passes} forward/backward pass{plural} over the training data" + (
                f" (+ {method.pilot_rows} examples computed twice: pilot / check)" if method.pilot_rows else ""
            )
            if method.forward_rows:
                cost += f", {method.forward_rows:,} forward-only examples (the scoring pass by loss differences)"
            when = "" if method.seconds is None else f", about {_duration(method.seconds)}"
            own = f" (its float64 matrices {format_bytes(method.own_bytes)})" if method.own_bytes else ""
            fits = "" if method.fits is None else f"; in {limit:g} GiB: " + ("fits" if method.fits else "DOES NOT FIT")
            lines.append(
                f"  {method.name}: {method.passes} streaming passes ({scoring}), {cost}{when}; peak memory "
                f"{format_bytes(method.peak_bytes)}{own}{fits}"
            )
            if method.note:
                lines.append(f"    {method.note}")
            if method.refused:
                lines.append(f"    REFUSED: {method.refused}")
        if self.seconds_per_example is not None:
            lines.append(
                f"  measured here: {self.seconds_per_example * 1000:.1f} ms per example per gradient pass "
                f"(one batch of {s['batch_size']})"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _resident_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; 0 where unknown)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _config_dir(model: str) -> Path:
    path = Path(model)
    if path.is_file() and path.name.endswith(".json"):
        return path.parent if path.name == "config.json" else path
    if not (path / "config.json").is_file():
        raise ConfigError(f"{model} holds no config.json; pass a model folder (save_pretrained) or its config.json.")
    return path


def _meta_model(settings: PlanSettings) -> Any:
    """The base model with its LoRA adapter, on the meta device (no memory for weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    source = _config_dir(settings.model)
    if source.is_file():  # a config file under another name
        values = json.loads(source.read_text())
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    else:
        config = AutoConfig.from_pretrained(str(source))
    if settings.kind == "classification":
        config.num_labels = settings.num_labels
    auto = AutoModelForCausalLM if settings.kind == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        base = auto.from_config(config).to(getattr(torch, settings.model_dtype))
    if settings.adapter is not None:
        from datainf.models import resolve_adapter_dir

        lora = LoraConfig.from_pretrained(str(resolve_adapter_dir(settings.adapter)))
    else:
        targets: Sequence[str] | None = settings.target_modules
        if targets is None:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

            targets = defaults.get(config.model_type)
            if targets is None:
                raise LoRAValidationError(
                    f"peft knows no default LoRA target modules for model type {config.model_type!r}; name them "
                    f"(--target-modules, e.g. {_linear_names(base)[:4]})."
                )
        lora = LoraConfig(
            r=settings.r,
            target_modules=list(targets),
            modules_to_save=list(settings.modules_to_save) or None,
            task_type="CAUSAL_LM" if settings.kind == "causal-lm" else "SEQ_CLS",
        )
    try:
        return get_peft_model(base, lora), config
    except ValueError as err:
        raise LoRAValidationError(
            f"No LoRA targets found in {config.model_type!r} ({err}). Its linear layers are named e.g. "
            f"{_linear_names(base)[:6]}; pass those (--target-modules) or an adapter trained on this model."
        ) from err


def _linear_names(model: torch.nn.Module) -> list[str]:
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return names


def _saved_activation_bytes(model: torch.nn.Module, settings: PlanSettings, vocab: int) -> int:
    """Bytes autograd saves for one example of ``seq_len`` tokens, gradients on the adapter only (meta run)."""
    parameters = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = tensor._base if tensor._base is not None else tensor
        if id(base) in parameters or id(tensor) in parameters or id(base) in seen:
            return tensor
        seen.add(id(base))
        total += base.numel() * base.element_size()
        return tensor

    from datainf.gradients import find_lora_blocks, gradient_mode

    blocks = find_lora_blocks(model)
    ids = torch.zeros(1, settings.seq_len, dtype=torch.long, device="meta")
    with gradient_mode(model, blocks), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return total


def _measure_seconds(settings: PlanSettings, folder: Path, projection: Any) -> tuple[float, float]:
    """Seconds per example of one gradient batch (random tokens) through the real hooks, and of one
    forward pass without autograd (what a loss difference costs), on the CPU."""
    from datainf.gradients import find_lora_blocks
    from datainf.gradients.projection import projector_for
    from datainf.gradients.session import GradientSession
    from datainf.models import load_model
    from datainf.tasks import GradientTask, TaskBatch

    loaded = load_model(str(folder), kind=settings.kind, adapter=settings.adapter, num_labels=settings.num_labels)
    model = loaded[0]
    if settings.adapter is None:
        from peft import LoraConfig, get_peft_model

        targets = settings.target_modules or _meta_model(settings)[0].peft_config["default"].target_modules
        model = get_peft_model(model, LoraConfig(r=settings.r, target_modules=list(targets), init_lora_weights=False))
    model_config: Any = model.config
    vocab = int(model_config.vocab_size)
    kind = settings.kind

    class RandomTokens(GradientTask):
        def collate(self, examples: Any, ids: Any) -> TaskBatch:
            gen = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, vocab, (len(ids), settings.seq_len), generator=gen)
            return TaskBatch(ids=list(ids), inputs={"input_ids": tokens})

        def per_example_loss(self, model: torch.nn.Module, batch: TaskBatch) -> torch.Tensor:
            tokens = batch.inputs["input_ids"]
            logits = model(input_ids=tokens).logits
            if kind == "classification":
                return torch.nn.functional.cross_entropy(
                    logits, torch.zeros(len(tokens), dtype=torch.long), reduction="none"
                )
            flat = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
            )
            return flat.reshape(len(tokens), -1).mean(dim=1)

    blocks = find_lora_blocks(model)
    records = [{"id": str(i)} for i in range(settings.batch_size)]
    ids = [r["id"] for r in records]
    with GradientSession(model, RandomTokens(), blocks, projector=projector_for(projection, blocks.blocks)) as session:
        session.compute(records, ids)  # warm-up
        start = time.perf_counter()
        session.compute(records, ids)
        gradient = (time.perf_counter() - start) / settings.batch_size
        start = time.perf_counter()
        session.forward_losses(session.task.collate(records, ids))
        return gradient, (time.perf_counter() - start) / settings.batch_size


def make_plan(settings: PlanSettings) -> GradientPlan:
    """Work out the blocks, bytes, peak memory, passes and (when possible) time of a run; nothing is written.

    Raises:
        ConfigError: no ``config.json``, bad settings.
        LoRAValidationError: no LoRA targets found in the model type (the message lists its linear layers).
    """
    from datainf.factors import check_factor_memory, factor_bytes
    from datainf.gradients import find_lora_blocks
    from datainf.gradients.factors import factor_shapes
    from datainf.gradients.projection import GradientProjector, ProjectionConfig
    from datainf.store import DiskGradientStore

    model, config = _meta_model(settings)
    runtime = _resident_bytes()  # with torch, transformers, peft and the model's classes imported
    blocks = find_lora_blocks(model)
    dims = blocks.block_dims
    numbers = sum(dims.values())
    largest = max(dims.items(), key=lambda item: item[1])
    projection = None
    projection_bytes = 0
    stored_dims = dict(dims)
    if settings.mode == "projected":
        assert settings.project_dim is not None
        projection = ProjectionConfig(dim=settings.project_dim, seed=settings.project_seed)
        projector = GradientProjector(projection, blocks.blocks)
        stored_dims = projector.block_dims()
        projection_bytes = projector.matrix_numbers() * _DTYPE_SIZES[settings.model_dtype]
    stored = sum(stored_dims.values())
    n, m_test, b = settings.n, settings.test_examples, settings.batch_size
    item = _DTYPE_SIZES[settings.dtype]
    compute = 4 if settings.dtype != "float64" else 8

    def store_bytes(count: int) -> int:
        disk = DiskGradientStore(
            Path("."), block_dims=stored_dims, dtype=settings.dtype, fingerprint=None, shard_size=settings.shard_size
        )
        manifest = 1024 + 64 * len(stored_dims) + count * 12 + (-(-count // settings.shard_size)) * 200
        return disk.expected_bytes(count) + manifest

    parameters = sum(p.numel() for p in model.parameters())
    weights = parameters * _DTYPE_SIZES[settings.model_dtype]
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    activations = _saved_activation_bytes(model, settings, vocab)
    logits_grad = b * settings.seq_len * vocab * 4 if settings.kind == "causal-lm" else 0
    batch_grads = 2 * b * stored * compute
    shard_buffer = 2 * min(settings.shard_size, n) * stored * item if settings.mode != "on-the-fly" else 0
    collection = runtime + weights + b * activations + logits_grad + batch_grads + shard_buffer + projection_bytes

    # Kronecker factors (kfac / ekfac): collected with the store (3 sets of float64 sums while collecting)
    shapes, _ = factor_shapes(blocks.blocks)
    factor_sums = factor_bytes(shapes)
    wants_factors = any(METHOD_COSTS[x].needs_factors for x in settings.methods if x in METHOD_COSTS)
    factor_refusal = None
    if wants_factors and settings.mode == "projected":
        factor_refusal = (
            "collect_factors and a projection do not combine: K-FAC factors need the full blocks (plan mode store "
            "or on-the-fly, or use the 'diagonal' method)"
        )
    elif wants_factors:
        try:
            check_factor_memory(shapes, settings.max_memory_gb, what="kfac/ekfac")
        except ConfigError as err:
            factor_refusal = str(err)
    factor_collection = 3 * factor_sums if wants_factors and factor_refusal is None else 0
    if settings.mode == "store":
        collection += factor_collection

    m = m_test if settings.pairwise else 1
    rows = min(settings.score_batch_size, n)
    test_grads = m_test * stored * item if settings.pairwise else stored * compute
    budget = settings.max_memory_gb * 2**30
    groups = exact_groups(stored_dims, sorted(stored_dims), n, settings.max_memory_gb)
    uncovered = [b for b in stored_dims if b not in shapes]
    notes: list[str] = []
    methods: list[MethodPlan] = []
    for name in settings.methods:
        cost = METHOD_COSTS.get(name)
        if cost is None:
            notes.append(f"{name}: not modelled (no row in datainf.plan.METHOD_COSTS), no figures")
            continue
        before = {"iterations": settings.lissa_iterations, "groups": len(groups), "uncovered": int(bool(uncovered))}
        passes = (before[cost.passes] if isinstance(cost.passes, str) else cost.passes) + 1
        streamed = rows * stored * compute
        state = cost.state
        pilot = 0
        forward_rows = 0
        if settings.self_influence:  # no test rows, no scoring pass; some methods hold a chunk of training rows
            chunks = -(-n // rows)
            self_table = {
                "chunks+1": chunks + 1,
                "iterations*chunks+1": settings.lissa_iterations * chunks + 1,
                "2groups": 2 * len(groups),
                "uncovered+1": int(bool(uncovered)) + 1,
            }
            passes = self_table[cost.self_passes] if isinstance(cost.self_passes, str) else cost.self_passes
            state = rows if cost.self_chunk else 0  # the chunk (rows x D_s), counted as m = 1 below
        if settings.mode == "on-the-fly":
            # the model runs in this process; one pass's batches are assembled into streamed batches (concatenated)
            reading = collection + 2 * streamed
            norms_passes = cost.norms_passes
            if cost.fused_terms and not settings.self_influence:  # the norms pass fused into the first pass
                norms_passes, pilot, state = 0, min(DEFAULT_PILOT_ROWS, n), state + cost.fused_terms
            gradient_passes = passes + norms_passes + cost.factor_passes
            if settings.scoring == "loss-difference":  # the scoring pass forward only, after a checked sample
                check = min(LOSS_DIFFERENCE_CHECK_ROWS, n)
                gradient_passes -= 1
                pilot += check
                forward_rows = n + (len(STEP_FACTORS) - 1) * check
        else:
            reading = runtime + streamed + min(settings.shard_size, n) * stored * item
            gradient_passes = 1  # the collection
        own = method_bytes(
            name, stored_dims, n, test_rows=m, rows=rows, compute=compute, factor_shapes=shapes,
            max_memory_gb=settings.max_memory_gb,
        )  # fmt: skip
        tests = 0 if settings.self_influence else test_grads
        peak = reading + tests + state * m * stored * compute + cost.extra * stored * compute + n * 8 * (m + 2)
        peak += max(0, own - streamed)  # the method's own phase, while no scoring batch is held
        if settings.mode == "on-the-fly" and cost.needs_factors:
            peak = max(peak, collection + factor_collection)  # the pass that collects the factors
        note = None
        if name == "exact":
            alone = [b for b in stored_dims if 8.0 * exact_block_numbers(stored_dims[b], n) > budget]
            if alone:
                big = max(alone, key=lambda b: stored_dims[b])
                d = stored_dims[big]
                what = f"{d:,} x {d:,}" if d <= n else f"{n:,} x {d:,} rows"
                note = (
                    f"{len(alone)} block(s) alone need more than max_memory_gb {settings.max_memory_gb:g} (largest "
                    f"{big}: {what} float64, {format_bytes(8 * exact_block_numbers(d, n))}); Exact solves each in a pass of its "
                    "own, above the budget"
                )
        plan_row = MethodPlan(
            name=name,
            passes=passes,
            gradient_passes=gradient_passes,
            pilot_rows=pilot,
            forward_rows=forward_rows,
            peak_bytes=int(peak),
            own_bytes=int(own),
            refused=factor_refusal if cost.needs_factors else None,
            note=note,
        )
        if settings.memory_gb is not None:
            plan_row.fits = peak <= settings.memory_gb * 2**30
        methods.append(plan_row)

    seconds = None
    folder = _config_dir(settings.model) if Path(settings.model).is_dir() else None
    has_weights = (
        folder is not None and any(folder.glob("*.safetensors")) or (folder is not None and any(folder.glob("*.bin")))
    )
    measure = settings.measure
    if measure is None:
        measure = bool(has_weights) and parameters < 500_000_000
    if measure:
        if not has_weights or folder is None:
            notes.append("not measured: the model folder holds no weights")
        else:
            seconds, forward_seconds = _measure_seconds(settings, folder, projection)
            for method in methods:
                method.seconds = seconds * (n * method.gradient_passes + method.pilot_rows)
                method.seconds += forward_seconds * method.forward_rows
    free = None
    if settings.out is not None:
        target = Path(settings.out).absolute()
        while not target.exists() and target.parent != target:
            target = target.parent
        free = shutil.disk_usage(target).free
    plan = GradientPlan(
        settings=asdict(settings),
        model_type=str(config.model_type),
        parameters=int(parameters),
        blocks=len(dims),
        numbers_per_example=int(numbers),
        largest_block=(largest[0], int(largest[1])),
        stored_per_example=int(stored),
        weights_bytes=int(weights),
        runtime_bytes=int(runtime),
        activation_bytes_per_example=int(activations),
        store_bytes=int(store_bytes(n)) if settings.mode != "on-the-fly" else 0,
        test_store_bytes=int(store_bytes(m_test)),
        norms_bytes=n * len(dims) * 8,
        projection_bytes=int(projection_bytes),
        collection_peak_bytes=int(collection),
        methods=methods,
        factor_bytes=int(factor_sums) if wants_factors else 0,
        seconds_per_example=seconds,
        free_bytes=free,
        notes=notes,
    )
    if settings.mode == "on-the-fly":
        plan.notes.append(
            "on the fly, every method's passes recompute the training gradients (collection peak each time)"
        )
    if settings.self_influence and settings.mode == "on-the-fly":
        costly = [method.name for method in plan.methods if method.gradient_passes > 3]
        if costly:
            plan.notes.append(
                f"self-influence on the fly recomputes the training gradients once per streaming pass ({', '.join(costly)}"
                "); for these, --mode store (one collection, then reads) is far cheaper"
            )
    if settings.scoring == "loss-difference" and settings.model_dtype in ("bfloat16", "float16"):
        plan.notes.append(
            f"loss differences of a {settings.model_dtype} model round at that precision: the "
            f"{LOSS_DIFFERENCE_CHECK_ROWS}-row check is likely to fail and fall back to the gradient pass (one more "
            "forward/backward pass than planned here)"
        )
    return plan
