"""The command line's settings: one :class:`Option` table per subcommand (the parser: :mod:`datainf.cli.parser`).

Every setting has a flag, a converter and a default; :func:`resolve_config` merges the defaults, a
``--config`` file (``.yaml``/``.yml``/``.json``, e.g. a previous run's ``config.json``) and the flags
given, in that order of precedence (lowest first). The option names (``dest``) are the fields of the
settings dataclasses in :mod:`datainf.workflows`, with the same defaults.
"""

from __future__ import annotations

from collections.abc import Callable

from datainf.cli.option_types import (
    NOT_SAVED,
    Option,
    _optional,
    _to_bool,
    _to_float,
    _to_int,
    _to_json_mapping,
    _to_list,
    _to_out_path,
    _to_path,
    _to_paths,
    _to_str,
)
from datainf.runs import CONFIG_FILE

__all__ = ["Option", "COMMANDS", "CONFIG_FILE", "NOT_SAVED", "options"]

_OUT_HELP = {
    "plan": "where the store would go: its free space is compared with the planned bytes (nothing is written)",
    "demo": "output folder (default: datainf-out/demo for the mislabel demo, "
    "datainf-out/demo-<task>-<dataset> for the others)",
}


def _common(command: str = "") -> list[Option]:
    out_help = _OUT_HELP.get(command, "output folder (required)")
    return [
        Option("out", ("--out", "-o"), _to_out_path, None, out_help, metavar="DIR"),
        Option(
            "overwrite",
            ("--overwrite",),
            _to_bool,
            False,
            "replace results of a different configuration in --out",
            action="flag",
            saved=False,
        ),
        Option("quiet", ("--quiet", "-q"), _to_bool, False, "no progress bars", action="flag", saved=False),
        Option("verbose", ("--verbose", "-v"), _to_bool, False, "log at INFO level", action="flag", saved=False),
    ]


def _columns() -> list[Option]:
    return [
        Option(
            "text_column", ("--text-column",), _optional(_to_str), None, "data column holding the text (default: text)"
        ),
        Option(
            "label_column",
            ("--label-column",),
            _optional(_to_str),
            None,
            "data column holding the label (default: label)",
        ),
        Option(
            "prompt_column",
            ("--prompt-column",),
            _optional(_to_str),
            None,
            "data column holding the prompt (causal LM; default: prompt)",
        ),
        Option(
            "response_column",
            ("--response-column",),
            _optional(_to_str),
            None,
            "data column holding the response (causal LM; default: response)",
        ),
        Option(
            "id_column",
            ("--id-column",),
            _optional(_to_str),
            None,
            "data column holding unique example ids (default: id, else the row number)",
        ),
    ]


def _task_kinds(adapter_required: bool) -> tuple[str, ...]:
    """``--kind`` choices from the task-kind registry: kinds that can be trained (``finetune``) or loaded."""
    from datainf.tasks import available_task_kinds

    return tuple(available_task_kinds(trainable=not adapter_required, loadable=adapter_required))


def _model_options(adapter_required: bool) -> list[Option]:
    kind_help = "task kind" + ("" if not adapter_required else " (default: the adapter's, else classification)")
    opts = [
        Option(
            "model",
            ("--model",),
            _optional(_to_path),
            None,
            "local folder of the base model (save_pretrained)",
            metavar="DIR",
        ),
        Option("kind", ("--kind",), _optional(_to_str), None, kind_help, choices=_task_kinds(adapter_required)),
        Option(
            "max_length",
            ("--max-length",),
            _optional(_to_int),
            None,
            "longest token sequence (default: the adapter's training value, else the model's limit)",
        ),
        Option("device", ("--device",), _to_str, "cpu", "cpu, cuda, cuda:1, ..."),
    ]
    if adapter_required:
        opts.insert(
            1,
            Option(
                "adapter",
                ("--adapter",),
                _optional(_to_path),
                None,
                "folder of the trained LoRA adapter (or a `datainf finetune` output folder)",
                metavar="DIR",
            ),
        )
        opts.append(
            Option(
                "num_labels",
                ("--num-labels",),
                _optional(_to_int),
                None,
                "classes of the classifier (default: the adapter's)",
            )
        )
        opts.append(
            Option(
                "label_names",
                ("--label-names",),
                _optional(_to_list),
                None,
                "the classifier's class names in class-id order, e.g. neg,pos (for adapters trained without "
                "datainf; default: the adapter's, else the model config's id2label)",
                metavar="A,B,...",
            )
        )
        opts.append(
            Option(
                "grad_batch_size",
                ("--grad-batch-size",),
                _to_int,
                16,
                "examples per forward/backward pass when computing gradients",
            )
        )
        opts.append(
            Option(
                "dtype",
                ("--dtype",),
                _to_str,
                "float32",
                "storage dtype of gradients",
                choices=("float32", "float64", "bfloat16", "float16"),
            )
        )
        opts.append(Option("shard_size", ("--shard-size",), _to_int, 1024, "examples per gradient shard file"))
        opts.append(
            Option(
                "project_dim",
                ("--project-dim",),
                _optional(_to_int),
                None,
                "store a seeded random sketch of at most K numbers per gradient block (LoRA blocks: the activation "
                "or output side projected to K/r); store bytes fall to about 4 K per block and example; test and "
                "training gradients need the same K and seed. Default: full gradients",
                metavar="K",
            )
        )
        opts.append(Option("project_seed", ("--project-seed",), _to_int, 0, "seed of --project-dim's projection"))
    return opts


def _finetune_options() -> list[Option]:
    return [
        *_model_options(adapter_required=False),
        Option(
            "data",
            ("--data",),
            _optional(_to_path),
            None,
            "training data: .jsonl/.json/.csv/.tsv/.parquet or a saved HF dataset folder",
            metavar="PATH",
        ),
        *_columns(),
        Option("r", ("--r", "--rank"), _to_int, 8, "LoRA rank"),
        Option("alpha", ("--alpha",), _to_float, 16.0, "LoRA alpha"),
        Option(
            "target_modules",
            ("--target-modules",),
            _to_list,
            ["query", "value"],
            "comma-separated layer names to adapt",
        ),
        Option("dropout", ("--dropout",), _to_float, 0.1, "LoRA dropout"),
        Option("epochs", ("--epochs",), _to_int, 10, "training epochs (paper: 10)"),
        Option("lr", ("--lr",), _to_float, 3e-4, "AdamW learning rate (paper: 3e-4)"),
        Option("batch_size", ("--batch-size",), _to_int, 32, "training batch size (paper: 32)"),
        Option("warmup_ratio", ("--warmup-ratio",), _to_float, 0.06, "share of linear warm-up steps (paper: 0.06)"),
        Option("weight_decay", ("--weight-decay",), _to_float, 0.0, "AdamW weight decay"),
        Option("max_grad_norm", ("--max-grad-norm",), _optional(_to_float), 1.0, "gradient clipping norm (none: off)"),
        Option("seed", ("--seed",), _to_int, 0, "random seed"),
        Option(
            "eval_data",
            ("--eval-data",),
            _optional(_to_path),
            None,
            "validation data (same columns as --data): loss and accuracy per epoch, and the best epoch",
            metavar="PATH",
        ),
        Option(
            "keep_best",
            ("--keep-best",),
            _to_bool,
            False,
            "keep the adapter of the epoch with the lowest validation loss (needs --eval-data); "
            "default: the last epoch's, the model the recipe trains",
            action="flag",
        ),
        Option(
            "checkpoint_every",
            ("--checkpoint-every",),
            _to_int,
            50,
            "optimiser steps between checkpoints (also at every epoch end; 0: epoch ends only); a rerun resumes",
            saved=False,
            metavar="N",
        ),
    ]


def _grads_options() -> list[Option]:
    return [
        *_model_options(adapter_required=True),
        Option("data", ("--data",), _optional(_to_path), None, "examples to differentiate", metavar="PATH"),
        *_columns(),
        Option(
            "factors",
            ("--factors",),
            _to_bool,
            False,
            "also collect the Kronecker factors the kfac / ekfac methods need, into <out>/kronecker-factors "
            "(rerun on a finished store to add them: only the factors are computed)",
            action="flag",
        ),
    ]


def _method_names() -> list[str]:
    """The registered influence methods (``--method`` choices), from :func:`datainf.methods.available_methods`."""
    from datainf.methods import available_methods

    return available_methods()


def _score_options() -> list[Option]:
    return [
        Option(
            "train_grads",
            ("--train-grads",),
            _optional(_to_path),
            None,
            "gradient store of the training examples",
            metavar="DIR",
        ),
        Option(
            "test_grads",
            ("--test-grads",),
            _optional(_to_path),
            None,
            "gradient store of the test examples (with --train-grads, or with --train-data instead of --test-data)",
            metavar="DIR",
        ),
        *_model_options(adapter_required=True),
        Option(
            "train_data",
            ("--train-data",),
            _optional(_to_path),
            None,
            "training data: its gradients are recomputed on every streaming pass and never written (no disk; "
            "DataInf average/pairwise: 2 passes of forward/backward over the data + a pilot of 128 rows (the norms are "
            "recorded in its first pass; 3 passes if its accuracy bound fails); each other method: 1 norms pass + "
            "its passes; norms and finished passes checkpointed in <out>/onthefly for resuming)",
            metavar="PATH",
        ),
        Option(
            "test_data",
            ("--test-data",),
            _optional(_to_path),
            None,
            "test data (gradients computed into <out>/grads-test: m examples, small)",
            metavar="PATH",
        ),
        *_columns(),
        Option(
            "method",
            ("--method",),
            _to_list,
            ["datainf"],
            f"influence method(s): {', '.join(_method_names())} (repeat or comma list)",
            action="append",
        ),
        Option(
            "mode",
            ("--mode",),
            _to_str,
            "average",
            "average: one score per training example, on the mean test loss; pairwise: one per (test, train) pair; "
            "self: each training example's self-influence on its own loss (large = suspect; no test set: give "
            "--train-grads or --train-data only)",
            choices=("average", "pairwise", "self"),
        ),
        Option(
            "normalize",
            ("--normalize",),
            _to_bool,
            False,
            "unit-normalise every gradient first: scores rank by gradient direction (with hessian_free: minus the "
            "cosine similarity), no longer an influence on the loss",
            action="flag",
        ),
        Option(
            "loss_baseline",
            ("--loss-baseline",),
            _optional(_to_bool),
            None,
            "also write the training-loss baseline, scores-loss (each training example's own loss under the "
            "fine-tuned model; high loss = suspicious, ranked first like harmful). Default: on with --train-data, "
            "off with stores (--train-grads holds no losses, so it cannot be computed from stores)",
            action="switch",
        ),
        Option(
            "keep_train_store",
            ("--keep-train-store",),
            _to_bool,
            False,
            "with --train-data: compute the training gradients once into <out>/grads-train and read them from "
            "there (1 forward/backward pass over the data, but 4 bytes per example per LoRA parameter on disk in "
            "float32; faster for methods with many passes: lissa, exact in groups, self mode)",
            action="flag",
        ),
        Option(
            "scoring",
            ("--scoring",),
            _to_str,
            "gradients",
            "the last pass, which turns the preconditioned test gradients into scores. gradients: one pass over the "
            "training gradients (exact). loss-difference: with --train-data and --mode average only, each "
            "example's score is a forward difference of its loss, one forward pass per example instead of a "
            "forward/backward pass (about 1.4x instead of 1.7-1.8x a store's collection + DataInf on the benchmark "
            "model from 2,000 examples on). It is approximate (about 1e-3 of the largest score there) and is checked against exact scores "
            "on 64 rows: above 1 %% it falls back to the gradient pass",
            choices=("gradients", "loss-difference"),
        ),
        Option("damping", ("--damping",), _to_float, 0.1, "lambda_l = damping * mean ||g_il||^2 / d_l (paper: 0.1)"),
        Option(
            "fixed_lambda",
            ("--fixed-lambda",),
            _optional(_to_float),
            None,
            "one lambda for every block instead of --damping",
        ),
        Option(
            "method_options",
            ("--method-options",),
            _to_json_mapping,
            {},
            'JSON object method -> options, e.g. \'{"lissa": {"scale": "trace"}}\'',
            metavar="JSON",
        ),
        Option(
            "score_batch_size",
            ("--score-batch-size",),
            _to_int,
            1024,
            "training gradients read per batch while scoring",
        ),
        Option(
            "table_format",
            ("--table-format",),
            _to_str,
            "csv",
            "format of the per-method score table",
            choices=("csv", "parquet"),
        ),
        Option(
            "json", ("--json",), _to_bool, False, "print the summary as one JSON object", action="flag", saved=False
        ),
    ]


def _report_options() -> list[Option]:
    return [
        Option(
            "scores",
            ("--scores",),
            _to_paths,
            None,
            "scores file(s) written by `datainf score` (repeat or comma list)",
            action="append",
            metavar="FILE",
        ),
        Option(
            "data", ("--data",), _optional(_to_path), None, "the training data the scores are about", metavar="PATH"
        ),
        Option(
            "test_data",
            ("--test-data",),
            _optional(_to_path),
            None,
            "the test data (shows test texts for pairwise scores)",
            metavar="PATH",
        ),
        *_columns(),
        Option("k", ("--k", "--top"), _to_int, 10, "examples per list"),
        Option("max_test", ("--max-test",), _to_int, 5, "pairwise: test examples that get their own lists"),
        Option(
            "model",
            ("--model",),
            _optional(_to_path),
            None,
            "base model folder: with --adapter, each listed example shows the classifier's predicted label and "
            "confidence",
            metavar="DIR",
        ),
        Option(
            "adapter", ("--adapter",), _optional(_to_path), None, "the fine-tuned adapter (see --model)", metavar="DIR"
        ),
        Option("device", ("--device",), str, "cpu", "where the predictions are computed"),
    ]


def _demo_options() -> list[Option]:
    return [
        Option(
            "task",
            ("--task",),
            _to_str,
            "mislabel",
            "which demo to run: mislabel (BBC News, flipped labels), text-generation or text-to-image",
            choices=("mislabel", "text-generation", "text-to-image"),
        ),
        Option(
            "dataset",
            ("--dataset",),
            _optional(_to_str),
            None,
            "text-generation: sentence|math|math-reason (default sentence); text-to-image: style|subject (default style)",
            metavar="NAME",
        ),
        Option("seed", ("--seed",), _to_int, 0, "random seed"),
        Option("recompute", ("--recompute",), _to_bool, False, "ignore cached intermediate results", action="flag"),
        Option(
            "cleaning",
            ("--cleaning",),
            _to_bool,
            False,
            "mislabel demo: add the report's 'what cleaning would do' section (6 more fine-tunes, minutes)",
            action="flag",
        ),
        Option(
            "methods",
            ("--methods", "--method"),
            _optional(_to_list),
            None,
            f"mislabel demo: the methods of the table's first rows, any of {', '.join(_method_names())} (comma "
            "list or repeated; default datainf,exact,lissa,hessian_free); kfac / ekfac make the demo collect the "
            "Kronecker factors with the training gradients",
            action="append",
            metavar="A,B,...",
        ),
        Option(
            "variants",
            ("--variants",),
            _optional(_to_list),
            None,
            "mislabel demo: the rows after the training loss, METHOD[:self|normalized|self+normalized] as a comma "
            "list, e.g. datainf:self,hessian_free:normalized (self: as `score --mode self`, each example's influence "
            "on its own loss; normalized: as `score --normalize`); default: diagonal, then datainf, exact, "
            "hessian_free and diagonal each with :self and with :normalized",
            action="append",
            metavar="LIST",
        ),
        Option(
            "no_variants",
            ("--no-variants",),
            _to_bool,
            False,
            "mislabel demo: no rows after the training loss (without a datainf:self row there are no relabel "
            "suggestions)",
            action="flag",
        ),
        Option(
            "json", ("--json",), _to_bool, False, "print the summary as one JSON object", action="flag", saved=False
        ),
    ]


def _evaluate_options() -> list[Option]:
    """``datainf evaluate lds``: the LDS options, then the fine-tuning recipe's (as ``datainf finetune``'s)."""
    recipe = [o for o in _finetune_options() if o.dest not in ("eval_data", "keep_best", "checkpoint_every")]
    return [
        Option("metric", ("metric",), _to_str, None, "what to evaluate: lds", choices=("lds",), action="positional"),
        Option("scores", ("--scores",), _to_paths, None, "pairwise scores file(s)", action="append", metavar="FILE"),
        Option(
            "recipe",
            ("--recipe",),
            _optional(_to_path),
            None,
            "a `datainf finetune` run (or its config.json)",
            metavar="RUN",
        ),
        Option("test_data", ("--test-data",), _optional(_to_path), None, "the scores' test data", metavar="PATH"),
        Option("subsets", ("--subsets",), _to_int, 50, "M, retrained random subsets (at least 10)"),
        Option("fraction", ("--fraction",), _to_float, 0.5, "share of the training set in each subset, in (0, 1)"),
        Option("subset_seed", ("--subset-seed",), _to_int, 0, "seeds the subsets and the bootstrap"),
        Option("jobs", ("--jobs", "-j"), _to_int, 1, "worker processes for the retrains"),
        *recipe,
    ]


def _clean_options() -> list[Option]:
    columns = [o for o in _columns() if o.dest in ("text_column", "label_column", "id_column")]
    return [
        Option("scores", ("--scores",), _optional(_to_path), None, "a scores file of `datainf score`", metavar="FILE"),
        Option("data", ("--data",), _optional(_to_path), None, "the dataset the scores are about", metavar="PATH"),
        *columns,
        Option("remove_top", ("--remove-top",), _to_float, 10.0, "percent of the examples to flag (most harmful)"),
        Option("relabel", ("--relabel",), _to_bool, False, "relabel the flagged (lowest-loss class)", action="flag"),
        Option("model", ("--model",), _optional(_to_path), None, "base model (--relabel)", metavar="DIR"),
        Option("adapter", ("--adapter",), _optional(_to_path), None, "fine-tuned adapter (--relabel)", metavar="DIR"),
        Option("retrain", ("--retrain",), _optional(_to_path), None, "a `datainf finetune` run: retrain, compare"),
        Option("eval_data", ("--eval-data",), _optional(_to_path), None, "validation data of --retrain"),
        Option(
            "review_format", ("--review-format",), _to_str, "csv", "review table format", choices=("csv", "parquet")
        ),
    ]


def _explain_options() -> list[Option]:
    from datainf.cli.explain import explain_options  # its own module (it imports Option from here)

    return explain_options()


def _plan_options() -> list[Option]:
    return [
        Option(
            "model", ("--model",), _optional(_to_path), None, "base model folder or its config.json (weights optional)"
        ),
        Option(
            "adapter", ("--adapter",), _optional(_to_path), None, "LoRA adapter folder (else --r / --target-modules)"
        ),
        Option("kind", ("--kind",), _to_str, "causal-lm", "task kind", choices=("causal-lm", "classification")),
        Option("r", ("--r", "--rank"), _to_int, 8, "LoRA rank (without --adapter)"),
        Option(
            "target_modules",
            ("--target-modules",),
            _optional(_to_list),
            None,
            "LoRA target modules (without --adapter; default: peft's for the model type)",
        ),
        Option("modules_to_save", ("--modules-to-save",), _to_list, [], "modules trained whole (e.g. classifier)"),
        Option("num_labels", ("--num-labels",), _to_int, 2, "classes of a classification head"),
        Option("n", ("--n", "--num-examples"), _optional(_to_int), None, "training examples (required)"),
        Option("test_examples", ("--test-examples",), _to_int, 100, "test examples"),
        Option("seq_len", ("--seq-len",), _optional(_to_int), None, "tokens per example (required)"),
        Option(
            "mode",
            ("--mode",),
            _to_str,
            "store",
            "store: training gradients written once; on-the-fly: recomputed every pass, nothing written; "
            "projected: a store of --project-dim sketches",
            choices=("store", "on-the-fly", "projected"),
        ),
        Option("pairwise", ("--pairwise",), _to_bool, False, "plan pairwise scores (m x D state)", action="flag"),
        Option(
            "self_influence",
            ("--self-influence",),
            _to_bool,
            False,
            "plan self-influence (score --mode self: no test set; e.g. DataInf makes one pass per chunk of "
            "--score-batch-size training rows)",
            action="flag",
        ),
        Option(
            "scoring",
            ("--scoring",),
            _to_str,
            "gradients",
            "the scoring pass, as in `datainf score --scoring`: loss-difference (with --mode on-the-fly) plans it as "
            "forward-only passes plus its 64-row check",
            choices=("gradients", "loss-difference"),
        ),
        Option("project_dim", ("--project-dim",), _optional(_to_int), None, "numbers kept per block (projected)"),
        Option("project_seed", ("--project-seed",), _to_int, 0, "the projection's seed"),
        Option("batch_size", ("--grad-batch-size",), _to_int, 16, "examples per forward/backward pass"),
        Option("score_batch_size", ("--score-batch-size",), _to_int, 1024, "training rows per streamed batch"),
        Option("shard_size", ("--shard-size",), _to_int, 1024, "examples per gradient shard file"),
        Option(
            "dtype",
            ("--dtype",),
            _to_str,
            "float32",
            "storage dtype",
            choices=("float32", "float64", "bfloat16", "float16"),
        ),
        Option(
            "model_dtype",
            ("--model-dtype",),
            _to_str,
            "float32",
            "dtype of the model's weights and activations",
            choices=("float32", "float64", "bfloat16", "float16"),
        ),
        Option(
            "methods",
            ("--method",),
            _to_list,
            ["datainf"],
            f"methods to plan: {', '.join(_method_names())} (repeat or comma list; a registered method plan does "
            "not model is named in the notes)",
            action="append",
        ),
        Option(
            "max_memory_gb",
            ("--max-memory-gb",),
            _to_float,
            4.0,
            "the methods' max_memory_gb option: exact's float64 budget per group of blocks (one pass per group), "
            "kfac / ekfac's limit on the float64 Kronecker factors (above it they refuse)",
            metavar="GB",
        ),
        Option(
            "memory_gb",
            ("--memory-gb",),
            _optional(_to_float),
            None,
            "memory the run may use: each peak is marked fits / DOES NOT FIT (default: no verdict)",
            metavar="GB",
        ),
        Option(
            "measure",
            ("--measure",),
            _optional(_to_bool),
            None,
            "time one batch here (default: when the folder has weights and under 500M parameters)",
            action="switch",
        ),
        Option("json", ("--json",), _to_bool, False, "print the plan as one JSON object", action="flag", saved=False),
    ]


COMMANDS: dict[str, tuple[str, Callable[[], list[Option]]]] = {
    "finetune": ("LoRA-fine-tune a local model on a dataset (writes <out>/adapter)", _finetune_options),
    "grads": ("per-example LoRA gradients of a dataset into a gradient store (<out>)", _grads_options),
    "score": ("influence scores of training examples on test examples (positive = harmful)", _score_options),
    "report": ("HTML report of the most harmful / helpful training examples", _report_options),
    "evaluate": ("check scores against retrained models: the linear datamodeling score (lds)", _evaluate_options),
    "clean": (
        "write the dataset without its most harmful examples (or relabelled), and a review table",
        _clean_options,
    ),
    "plan": ("memory, disk and time of a run before any work (from a config.json)", _plan_options),
    "demo": ("the end-to-end demo (default: BBC News with flipped labels, four methods)", _demo_options),
    "explain": (
        "explain answers: generate for each prompt, show its most helpful / harmful training examples",
        _explain_options,
    ),
}


def options(command: str) -> list[Option]:
    """Every option of ``command``: the common ones (``--out``, ``--overwrite``, ...) first."""
    return [*_common(command), *COMMANDS[command][1]()]


# ---------------------------------------------------------------------------------------------- parser
