"""The einsum formulas and the hook lifecycle, against a plain per-example autograd loop (float64)."""

from __future__ import annotations

import pytest
import torch
from gradient_fixtures import attribute_state, bert_classifier, classification_data, hook_state, word_tokenizer
from torch import nn

from datainf.errors import ConfigError, TaskInputError
from datainf.gradients import (
    GradientBlock,
    GradientTask,
    PerExampleGradients,
    SequenceClassificationTask,
    TaskBatch,
    collect_gradients,
    find_lora_blocks,
)
from datainf.gradients.hooks import per_example_conv2d_grads, per_example_linear_grads
from datainf.gradients.modules import HOOKABLE_MODULES, describe_module, hookable_type, is_hookable, supported_modules
from datainf.testing import check_per_example_gradients


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 7), (3, 2, 4, 7)])
@pytest.mark.parametrize("rows_per_example", [1, 3])
def test_linear_formula_matches_autograd(shape, rows_per_example) -> None:
    torch.manual_seed(0)
    b = shape[0]
    lin = nn.Linear(7, 6, dtype=torch.float64)
    x = torch.randn(b * rows_per_example, *shape[1:], dtype=torch.float64)
    target = torch.randn(b * rows_per_example, *shape[1:-1], 6, dtype=torch.float64)

    def loss_rows(y: torch.Tensor, rows: slice) -> torch.Tensor:  # per-row losses add up per example
        return ((y - target[rows]) ** 3).sum()

    y = lin(x)
    go = torch.autograd.grad(loss_rows(y, slice(None)), y)[0]
    gw, gb = per_example_linear_grads(x.detach(), go, b, weight=True, bias=True)
    k = rows_per_example
    for j in range(b):
        lin.zero_grad()
        rows = slice(j * k, (j + 1) * k)
        loss_rows(lin(x.detach()[rows]), rows).backward()
        torch.testing.assert_close(gw[j], lin.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb[j], lin.bias.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "conv_kw",
    [
        dict(kernel_size=1),
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=2, dilation=2),
        dict(kernel_size=(2, 3), stride=(1, 2)),
    ],
    ids=["1x1", "3x3-pad", "3x3-stride-dilation", "2x3"],
)
@pytest.mark.parametrize("rows_per_example", [1, 2])
def test_conv2d_formula_matches_autograd(conv_kw, rows_per_example) -> None:
    torch.manual_seed(1)
    b, k = 3, rows_per_example
    conv = nn.Conv2d(4, 5, dtype=torch.float64, **conv_kw)
    x = torch.randn(b * k, 4, 7, 6, dtype=torch.float64)
    y = conv(x)
    weights = torch.randn_like(y)

    def loss(out: torch.Tensor, rows: slice) -> torch.Tensor:
        return (torch.tanh(out) * weights[rows]).sum()

    go = torch.autograd.grad(loss(y, slice(None)), y)[0]
    gw, gb = per_example_conv2d_grads(conv, x, go, b, weight=True, bias=True)
    for j in range(b):
        conv.zero_grad()
        rows = slice(j * k, (j + 1) * k)
        loss(conv(x[rows]), rows).backward()
        torch.testing.assert_close(gw[j], conv.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb[j], conv.bias.grad, rtol=1e-10, atol=1e-12)


class _Shared(nn.Module):
    """A linear layer used twice in one forward pass, then a LayerNorm (not hookable)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6, dtype=torch.float64)
        self.norm = nn.LayerNorm(6, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(torch.tanh(self.lin(x))))


def _blocks(model: _Shared) -> list[GradientBlock]:
    return [
        GradientBlock("lin.weight", model.lin.weight, "lin", model.lin, "weight", "other"),
        GradientBlock("lin.bias", model.lin.bias, "lin", model.lin, "bias", "other"),
        GradientBlock("norm.weight", model.norm.weight, "norm", None, "weight", "other"),
    ]


def test_module_called_twice_and_fallback_block() -> None:
    torch.manual_seed(2)
    model = _Shared()
    x = torch.randn(4, 3, 6, dtype=torch.float64)

    def losses_of(inp: torch.Tensor) -> torch.Tensor:
        return (model(inp) ** 2).sum(dim=(1, 2))

    with PerExampleGradients(_blocks(model)) as capture:
        assert capture.num_hooks == 1
        grads = capture.compute(losses_of(x))
    assert capture.num_hooks == 0
    for j in range(4):
        ref = torch.autograd.grad(losses_of(x[j : j + 1])[0], [model.lin.weight, model.lin.bias, model.norm.weight])
        for name, r in zip(["lin.weight", "lin.bias", "norm.weight"], ref):
            torch.testing.assert_close(grads[name][j], r.reshape(-1), rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into .grad


def test_rows_must_split_evenly() -> None:
    model = _Shared()
    with PerExampleGradients(_blocks(model)[:2]) as capture:
        out = model(torch.randn(5, 6, dtype=torch.float64))
        with pytest.raises(TaskInputError, match="5 rows for a batch of 2"):
            capture.compute(out.sum(dim=1)[:2])


def test_labelled_rows_keep_their_own_blocks() -> None:
    """k = 3 rows per example, example-major: block ``name@r<m>`` is the gradient through row m alone."""
    torch.manual_seed(4)
    model = _Shared()
    b, k = 2, 3
    x = torch.randn(b * k, 6, dtype=torch.float64)
    weights = torch.randn(b * k, dtype=torch.float64)

    def row_losses(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # (rows,)
        return (torch.tanh(model.lin(inp)) ** 2).sum(dim=1) * w

    labels = ("r0", "r1", "r2")
    with PerExampleGradients(_blocks(model)[:2], row_labels=labels) as capture:
        grads = capture.compute(row_losses(x, weights).reshape(b, k).sum(dim=1))
    assert sorted(grads) == sorted(f"{n}@{r}" for n in ("lin.weight", "lin.bias") for r in labels)
    for j in range(b):
        for m, label in enumerate(labels):
            row = j * k + m
            ref = torch.autograd.grad(
                row_losses(x[row : row + 1], weights[row : row + 1])[0], [model.lin.weight, model.lin.bias]
            )
            for name, r in zip(["lin.weight", "lin.bias"], ref):
                torch.testing.assert_close(grads[f"{name}@{label}"][j], r.reshape(-1), rtol=1e-10, atol=1e-12)


def test_labelled_rows_bad_setups() -> None:
    model = _Shared()
    with pytest.raises(ConfigError, match="repeat a label"):
        PerExampleGradients(_blocks(model)[:2], row_labels=("t1", "t1"))
    with pytest.raises(ConfigError, match="need every block covered by hooks.*norm.weight"):
        PerExampleGradients(_blocks(model), row_labels=("t1", "t2"))
    with PerExampleGradients(_blocks(model)[:2], row_labels=("t1", "t2", "t3")) as capture:
        out = model.lin(torch.randn(4, 6, dtype=torch.float64))  # 2 rows per example, 3 labels
        with pytest.raises(TaskInputError, match="labels 3 rows per example"):
            capture.compute(out.sum(dim=1).reshape(2, 2).sum(dim=1))


def test_hooks_removed_on_exception() -> None:
    model = _Shared()
    with pytest.raises(RuntimeError, match="inside"), PerExampleGradients(_blocks(model)):
        assert len(model.lin._forward_hooks) == 1
        raise RuntimeError("inside")
    assert not model.lin._forward_hooks


class _FailingTask(SequenceClassificationTask):
    def __init__(self, *args, fail_on: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.fail_on = fail_on

    def per_example_loss(self, model, batch):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("task failed")
        return super().per_example_loss(model, batch)


def test_collect_leaves_nothing_on_the_model() -> None:
    model = bert_classifier()
    model.train()
    hooks_before, attrs_before = hook_state(model), attribute_state(model)
    task = SequenceClassificationTask(word_tokenizer())
    collect_gradients(model, task, classification_data(5), batch_size=2, progress=False)
    check_per_example_gradients(model, task, classification_data(3))
    assert hook_state(model) == hooks_before
    assert attribute_state(model) == attrs_before
    assert all(p.grad is None for p in model.parameters())
    assert model.training

    with pytest.raises(RuntimeError, match="task failed"):
        collect_gradients(
            model, _FailingTask(word_tokenizer(), fail_on=2), classification_data(5), batch_size=2, progress=False
        )
    assert hook_state(model) == hooks_before
    assert attribute_state(model) == attrs_before
    assert model.training


# ---------------------------------------------------------------------------------------------------
# The table of hookable module types: every entry against datainf.testing's per-example loop (float64)


class _TensorTask(GradientTask):
    """Examples ``{"x": tensor}``; loss ``sum(tanh(model(x)) * w)`` per example (a fixed weight ``w``)."""

    def collate(self, examples, ids):
        return TaskBatch(ids=list(ids), inputs={"x": torch.stack([torch.as_tensor(ex["x"]) for ex in examples])})

    def per_example_loss(self, model, batch):
        out = model(batch.inputs["x"])
        w = torch.linspace(-1.0, 2.0, out[0].numel(), dtype=out.dtype, device=out.device).reshape(out.shape[1:])
        return (torch.tanh(out) * w).flatten(1).sum(dim=1)


class _LinearNet(nn.Module):
    """LoRA goes on ``lin`` (lora_A/lora_B are nn.Linear); ``head`` is trained as a whole ("other")."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, s, 5) -> (b, s, 3)
        return self.head(torch.tanh(self.lin(x)))


class _ConvNet(nn.Module):
    """LoRA on a strided 3x3 ``conv`` (lora_A 3x3, lora_B 1x1) and on a 1x1 ``proj``; ``out`` trained whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(4, 3, (2, 3), dilation=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, 2, 9, 10)
        return self.out(torch.tanh(self.proj(torch.tanh(self.conv(x)))))


def _lora_model(net: nn.Module, targets: list[str], trained_whole: str) -> nn.Module:
    """``net`` in float64 with (non-zero) LoRA on ``targets`` and the module ``trained_whole`` trainable."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(net, LoraConfig(r=2, target_modules=targets, init_lora_weights=False)).double()
    getattr(model.base_model.model, trained_whole).requires_grad_(True)
    return model


def _linear_case() -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(11)
    model = _lora_model(_LinearNet(), ["lin"], "head")
    gen = torch.Generator().manual_seed(12)
    return model, [{"x": torch.randn(4, 5, generator=gen, dtype=torch.float64)} for _ in range(5)]


def _conv2d_case() -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(11)
    model = _lora_model(_ConvNet(), ["conv", "proj"], "out")
    gen = torch.Generator().manual_seed(13)
    return model, [{"x": torch.randn(2, 9, 10, generator=gen, dtype=torch.float64)} for _ in range(4)]


#: one model per HOOKABLE_MODULES entry: LoRA on that type plus a trainable base module of that type
_TABLE_CASES = {nn.Linear: _linear_case, nn.Conv2d: _conv2d_case}


@pytest.mark.parametrize("entry", HOOKABLE_MODULES, ids=lambda e: e.module_type.__name__)
def test_every_hookable_type_matches_the_per_example_loop(entry) -> None:
    case = _TABLE_CASES.get(entry.module_type)
    assert case is not None, f"add a model using {entry.name} to _TABLE_CASES"
    model, data = case()
    blocks = find_lora_blocks(model)
    assert all(b.hooked for b in blocks)
    roles = {b.role for b in blocks if isinstance(b.module, entry.module_type)}
    assert roles == {"lora_A", "lora_B", "other"}  # adapter tensors and a whole trained module of this type
    assert {b.attr for b in blocks if b.role == "other"} == {"weight", "bias"}
    report = check_per_example_gradients(model, _TensorTask(), data, rtol=1e-10)
    assert report.ok and not report.fallback_blocks and len(report.errors) == len(blocks)
    assert all(err <= 1e-10 for err in report.errors.values())


def test_table_decides_discovery_and_installation() -> None:
    """find_lora_blocks and PerExampleGradients read the same table: what it refuses, neither hooks."""
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert hookable_type(grouped) is None and not is_hookable(grouped)
    assert hookable_type(nn.Conv2d(4, 4, 3)).module_type is nn.Conv2d
    assert hookable_type(nn.Linear(2, 2)).module_type is nn.Linear
    assert hookable_type(nn.LayerNorm(3)) is None and hookable_type(None) is None
    assert describe_module(grouped) == "Conv2d(groups=2, padding=(0, 0), padding_mode='zeros')"
    assert supported_modules() == "nn.Linear and nn.Conv2d (groups=1, numeric zero padding)"
    norm = nn.LayerNorm(3)
    with pytest.raises(ConfigError, match="hooks support nn.Linear and nn.Conv2d"):
        PerExampleGradients([GradientBlock("norm.weight", norm.weight, "norm", norm, "weight", "other")])
    with pytest.raises(ConfigError, match=r"grouped \(Conv2d\)"):
        PerExampleGradients([GradientBlock("g.weight", grouped.weight, "grouped", grouped, "weight", "other")])
