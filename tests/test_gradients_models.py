"""Hooks vs the per-example autograd loop on every supported model family (float32, rel. error <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
from gradient_fixtures import (
    bert_classifier,
    classification_data,
    diffusion_class_data,
    diffusion_text_data,
    gpt2_lm,
    llama_lm,
    lm_data,
    roberta_classifier,
    scheduler,
    unet_class,
    unet_cond,
    word_tokenizer,
)

from datainf.gradients import (
    CausalLMConfig,
    CausalLMTask,
    DiffusionTask,
    DiffusionTaskConfig,
    SequenceClassificationTask,
    find_lora_blocks,
)
from datainf.testing import GradientCheckError, check_per_example_gradients

RTOL = 1e-5
#: UNets sum over many spatial positions in float32; with several BLAS/OpenMP threads the summation
#: order differs between the batched pass and the one-example loop and the relative error reaches
#: ~1.1e-5 (float64 agreement of the same formulas is checked to 1e-10 in test_gradients_hooks.py).
RTOL_UNET = 3e-5


def _assert_meaningful(report, min_blocks: int, rtol: float = RTOL) -> None:
    assert report.ok, str(report)
    assert len(report.errors) >= min_blocks
    assert report.max_error <= rtol


@pytest.mark.parametrize("builder", [bert_classifier, roberta_classifier], ids=["bert", "roberta"])
def test_classification_hooks_match_loop(builder) -> None:
    model = builder()
    blocks = find_lora_blocks(model)
    heads = [b for b in blocks if b.role == "modules_to_save"]
    assert heads and {b.attr for b in heads} == {"weight", "bias"} and all(b.hooked for b in heads)
    data = classification_data(6, seed=1)  # varied lengths -> padding inside the batch
    report = check_per_example_gradients(model, SequenceClassificationTask(word_tokenizer("cls")), data, rtol=RTOL)
    _assert_meaningful(report, len(blocks))
    assert not report.fallback_blocks


def test_lora_bias_and_trained_base_biases_are_blocks() -> None:
    """lora_bias=True gives lora_B a bias block; bias="lora_only" trains the adapted base layers' biases."""
    model = bert_classifier(lora_bias=True, bias="lora_only")
    blocks = find_lora_blocks(model)
    roles = {b.name: b.role for b in blocks}
    assert roles["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.bias"] == "lora_B"
    assert roles["base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias"] == "other"
    assert all(b.hooked for b in blocks)
    report = check_per_example_gradients(
        model, SequenceClassificationTask(word_tokenizer("cls")), classification_data(4, seed=9)
    )
    _assert_meaningful(report, len(blocks))


@pytest.mark.parametrize("builder", [llama_lm, gpt2_lm], ids=["llama", "gpt2"])
@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_causal_lm_hooks_match_loop(builder, loss_on) -> None:
    model = builder()
    task = CausalLMTask(word_tokenizer("lm"), CausalLMConfig(loss_on=loss_on))
    report = check_per_example_gradients(model, task, lm_data(5, seed=2), rtol=RTOL)
    _assert_meaningful(report, 8)


def test_gpt2_conv1d_base_layers_use_fan_in_fan_out() -> None:
    from transformers.pytorch_utils import Conv1D

    model = gpt2_lm()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer.get_base_layer(), Conv1D) and layer.fan_in_fan_out
    names = find_lora_blocks(model).block_dims
    assert names["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"] == 4 * 32
    assert names["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"] == 96 * 4


@pytest.mark.parametrize("timestep_blocks", [True, False], ids=["block-per-timestep", "mean-over-timesteps"])
def test_unet2d_condition_hooks_match_loop(timestep_blocks: bool) -> None:
    model = unet_cond()
    blocks = find_lora_blocks(model)
    convs = [b for b in blocks if b.parameter.dim() == 4]
    assert convs, "the 1x1 proj_in/proj_out LoRA convs should be blocks"
    task = DiffusionTask(scheduler(), DiffusionTaskConfig(timesteps=(25, 525, 925), timestep_blocks=timestep_blocks))
    report = check_per_example_gradients(model, task, diffusion_text_data(2, seed=3), rtol=RTOL_UNET)
    if timestep_blocks:  # the loop differentiates each timestep's loss on its own: one block per (tensor, timestep)
        assert sorted(report.errors) == sorted(f"{b.name}@t{t}" for b in blocks for t in (25, 525, 925))
        _assert_meaningful(report, 3 * len(blocks), RTOL_UNET)
    else:
        assert sorted(report.errors) == sorted(b.name for b in blocks)
        _assert_meaningful(report, len(blocks), RTOL_UNET)


def test_unet2d_class_conditional_hooks_match_loop() -> None:
    model = unet_class()
    task = DiffusionTask(scheduler())  # default: the six notebook timesteps
    report = check_per_example_gradients(model, task, diffusion_class_data(2, seed=4), rtol=RTOL_UNET)
    _assert_meaningful(report, 16, RTOL_UNET)


def test_uncovered_tensors_use_the_fallback_loop() -> None:
    model = bert_classifier()
    inner = model.base_model.model.bert
    inner.pooler.dense.weight.requires_grad_(True)  # nn.Linear: hooked ("other")
    inner.encoder.layer[1].output.LayerNorm.weight.requires_grad_(True)  # no hook: per-example fallback
    blocks = find_lora_blocks(model)
    fallback = [b.name for b in blocks.fallback]
    assert fallback == ["base_model.model.bert.encoder.layer.1.output.LayerNorm.weight"]
    report = check_per_example_gradients(
        model, SequenceClassificationTask(word_tokenizer("cls")), classification_data(4, seed=5), rtol=RTOL
    )
    _assert_meaningful(report, len(blocks))
    assert report.fallback_blocks == fallback


class _BatchMeanTask(SequenceClassificationTask):
    """A wrong task: divides by the batch size (a batch-mean reduction)."""

    def per_example_loss(self, model, batch):
        losses = super().per_example_loss(model, batch)
        return losses / len(batch)


class _CrossTalkTask(SequenceClassificationTask):
    """A wrong task: each example's loss is weighted by its neighbour's (the weight depends on the batch)."""

    def per_example_loss(self, model, batch):
        losses = super().per_example_loss(model, batch)
        return losses * (1.0 + losses.detach().roll(1))


@pytest.mark.parametrize("task_cls", [_BatchMeanTask, _CrossTalkTask])
def test_check_reports_every_block_of_a_batch_dependent_task(task_cls) -> None:
    model = bert_classifier()
    data = classification_data(4, seed=6)
    with pytest.raises(GradientCheckError, match="MISMATCH"):
        check_per_example_gradients(model, task_cls(word_tokenizer("cls")), data)
    report = check_per_example_gradients(model, task_cls(word_tokenizer("cls")), data, raise_on_mismatch=False)
    assert not report.ok
    assert set(report.mismatched) == set(report.errors)  # every block disagrees, and each one is listed
    assert all(err > 1e-3 for err in report.errors.values())


def test_check_flags_left_padding_without_positions() -> None:
    """GPT-2 with left padding and no position ids shifts positions: the check must notice."""

    class LeftPadTask(CausalLMTask):
        def collate(self, examples, ids):
            batch = super().collate(examples, ids)
            lengths = batch.inputs["attention_mask"].sum(1)
            for key, pad in (("input_ids", 0), ("attention_mask", 0), ("loss_mask", 0)):
                t = batch.inputs[key]
                out = torch.full_like(t, pad)
                for i, n in enumerate(lengths.tolist()):
                    out[i, t.shape[1] - n :] = t[i, :n]
                batch.inputs[key] = out
            return batch

    report = check_per_example_gradients(
        gpt2_lm(), LeftPadTask(word_tokenizer("lm")), lm_data(4, seed=7, low=1, high=12), raise_on_mismatch=False
    )
    assert not report.ok and report.mismatched


def test_latent_diffusion_with_vae_and_text_encoder() -> None:
    """Stable-diffusion layout: uint8 images -> VAE latents, prompts -> CLIP text encoder -> cross-attention."""
    from gradient_fixtures import diffusion_image_prompt_data, text_encoder, vae

    task = DiffusionTask(
        scheduler(),
        DiffusionTaskConfig(timesteps=(225, 725), prompt_max_length=8),
        vae=vae(),
        text_encoder=text_encoder(),
        tokenizer=word_tokenizer("lm"),
    )
    data = diffusion_image_prompt_data(3, seed=8)
    data[0]["prompt"] = " ".join(["w3"] * 12)  # longer than 8 tokens: truncated
    batch = task.collate(data, [ex["id"] for ex in data])
    assert batch.inputs["prompt_ids"].shape == (3, 8) and batch.truncated_ids == [data[0]["id"]]
    assert batch.inputs["pixel_values"].shape == (3, 3, 8, 8) and batch.inputs["pixel_values"].abs().max() <= 1
    report = check_per_example_gradients(unet_cond(with_conv=False), task, data, rtol=RTOL_UNET)
    _assert_meaningful(report, 16, RTOL_UNET)


def test_gradient_checkpointing_is_switched_off_and_restored() -> None:
    """diffusers recomputes checkpointed blocks even in eval mode; with reentrant checkpointing the first
    forward runs without autograd, so the collector must turn checkpointing off while it works."""
    from datainf.gradients import collect_gradients

    def reentrant(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=True)

    model = unet_cond(with_conv=False)
    task = DiffusionTask(scheduler(), DiffusionTaskConfig(timesteps=(300,)))
    data = diffusion_text_data(3, seed=10)
    plain = collect_gradients(model, task, data, batch_size=3, progress=False).to_dict()
    model.enable_gradient_checkpointing(gradient_checkpointing_func=reentrant)
    flags = {n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")}
    assert any(flags.values())
    checkpointed = collect_gradients(model, task, data, batch_size=3, progress=False).to_dict()
    for name, g in plain.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7)
    assert flags == {
        n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")
    }
