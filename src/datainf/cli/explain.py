"""``datainf explain``: its options and its command (registered in :mod:`datainf.cli.options` and
:mod:`datainf.cli.commands`). Everything it computes is :func:`datainf.explain.prompts.explain_run`."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from datainf.cli.option_types import Option, _optional, _to_bool, _to_float, _to_int, _to_path, _to_str

__all__ = ["explain_options", "cmd_explain"]


def explain_options() -> list[Option]:
    """The options of ``datainf explain`` (after the common ``--out`` / ``--overwrite`` / ``-q`` / ``-v``)."""
    from datainf.explain.prompts import available_explainers

    return [
        Option(
            "kind",
            ("--kind",),
            _optional(_to_str),
            None,
            f"what is explained: {', '.join(available_explainers())} (default: the adapter's kind, else causal-lm)",
        ),
        Option("model", ("--model",), _optional(_to_path), None, "local folder of the base model", metavar="DIR"),
        Option(
            "adapter",
            ("--adapter",),
            _optional(_to_path),
            None,
            "the LoRA adapter: a peft folder, a `datainf finetune` output, or a Trainer / TRL output_dir / checkpoint-N",
            metavar="DIR",
        ),
        Option(
            "prompts",
            ("--prompts",),
            _optional(_to_path),
            None,
            "file of prompts (prompt column; optional response and id columns)",
            metavar="PATH",
        ),
        Option("prompt", ("--prompt",), _optional(_to_str), None, "one prompt to explain", metavar="TEXT"),
        Option(
            "train_store",
            ("--train-store",),
            _optional(_to_path),
            None,
            "gradient store of the training examples (`datainf grads`)",
            metavar="DIR",
        ),
        Option(
            "train_data",
            ("--train-data",),
            _optional(_to_path),
            None,
            "training data: texts shown; without --train-store its gradients are computed on the fly",
            metavar="PATH",
        ),
        Option("k", ("--k",), _to_int, 5, "most helpful and most harmful training examples shown per prompt"),
        Option("max_new_tokens", ("--max-new-tokens",), _to_int, 64, "longest generated response (tokens)"),
        Option("method", ("--method",), _to_str, "datainf", "influence method"),
        Option("damping", ("--damping",), _to_float, 0.1, "damping (lambda = damping * mean ||g||^2 / d)"),
        Option(
            "chat",
            ("--chat",),
            _to_str,
            "auto",
            "render prompts with the tokenizer's chat template: auto (when the training data is conversational), yes, no",
            choices=("auto", "yes", "no"),
        ),
        Option("max_length", ("--max-length",), _optional(_to_int), None, "longest token sequence"),
        Option("device", ("--device",), _to_str, "cpu", "cpu, cuda, cuda:1, ..."),
        Option("grad_batch_size", ("--grad-batch-size",), _to_int, 16, "examples per gradient pass"),
        Option("dtype", ("--dtype",), _to_str, "float32", "gradient dtype", choices=("float32", "float64", "bfloat16")),
        Option("prompt_column", ("--prompt-column",), _optional(_to_str), None, "column holding the prompt"),
        Option("response_column", ("--response-column",), _optional(_to_str), None, "column holding the response"),
        Option("id_column", ("--id-column",), _optional(_to_str), None, "column holding example ids"),
        Option(
            "json",
            ("--json",),
            _to_bool,
            False,
            "print the explanations as one JSON object",
            action="flag",
            saved=False,
        ),
    ]


def _short(text: str, width: int = 100) -> str:
    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder=" ...")


def cmd_explain(config: dict[str, Any]) -> int:
    """``datainf explain``: per prompt, the (generated) response and its most helpful / harmful training
    examples; writes ``<out>/explanations.json`` and ``<out>/explanations.html``."""
    from datainf.explain.prompts import ExplainSettings, explain_run
    from datainf.workflows import settings_from_mapping

    settings = settings_from_mapping(ExplainSettings, config)
    result = explain_run(settings, overwrite=config["overwrite"], progress=not config["quiet"])
    if config.get("json"):
        print(json.dumps(json.loads(result.json_path.read_text())))  # one line on stdout, for scripts
        return 0
    for e in result.explanations:
        print(f"== {e.id}: {_short(e.prompt)}")
        print(f"   {'generated' if e.generated else 'given'}: {_short(e.response)}")
        print("   most helpful (influence < 0):")
        for ex in e.helpful:
            print(f"     {ex.influence:+.4g}  {ex.id}  {_short(ex.text, 80)}")
        print("   most harmful (influence > 0):")
        for ex in e.harmful:
            print(f"     {ex.influence:+.4g}  {ex.id}  {_short(ex.text, 80)}")
    print(f"explanations: {result.json_path}")
    print(f"report: {result.html_path}")
    return 0
