"""Tiny random models, tokenizers and datasets for the gradient tests (no downloads, seconds each)."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from torch import nn

VOCAB = 100
N_WORDS = VOCAB - 6  # ids 0..5 are special tokens
SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "<s>": 4, "</s>": 5}


def word_tokenizer(kind: str = "cls") -> Any:
    """A word-level fast tokenizer over the words ``w0 .. w93``.

    ``kind="cls"``: ``[CLS] a [SEP]`` (BERT style); ``kind="lm"``: ``<s> a`` with EOS ``</s>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIALS)
    vocab.update({f"w{i}": i + len(SPECIALS) for i in range(N_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "cls":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 4)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


def random_text(gen: torch.Generator, low: int, high: int) -> str:
    n = int(torch.randint(low, high + 1, (1,), generator=gen))
    return " ".join(f"w{int(i)}" for i in torch.randint(0, N_WORDS, (n,), generator=gen))


def classification_data(
    n: int, *, seed: int = 0, low: int = 2, high: int = 20, num_labels: int = 3
) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"id": f"c{seed}-{i}", "text": random_text(gen, low, high), "label": i % num_labels} for i in range(n)]


def lm_data(n: int, *, seed: int = 0, low: int = 1, high: int = 12) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"id": f"l{seed}-{i}", "prompt": random_text(gen, low, high), "response": random_text(gen, 1, high)}
        for i in range(n)
    ]


def _lora(**kw: Any) -> LoraConfig:
    # init_lora_weights=False: lora_B is random too, so lora_A gets non-zero gradients
    kw.setdefault("init_lora_weights", False)
    kw.setdefault("lora_dropout", 0.1)
    return LoraConfig(**kw)


def bert_classifier(seed: int = 0, **lora_kw: Any) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )
    lora_kw.setdefault("target_modules", ["query", "value"])
    lora_kw.setdefault("modules_to_save", ["classifier"])
    lora_kw.setdefault("task_type", "SEQ_CLS")
    return get_peft_model(BertForSequenceClassification(cfg), _lora(r=4, lora_alpha=8, **lora_kw))


def roberta_classifier(seed: int = 0) -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return get_peft_model(
        RobertaForSequenceClassification(cfg),
        _lora(
            r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"
        ),
    )


def tiny_llama_config(**overrides: Any) -> Any:
    """A tiny random-init ``LlamaConfig`` over :data:`VOCAB` (hidden 32, 2 layers, 4 heads / 2 KV heads);
    ``overrides`` replace any field (e.g. ``hidden_size=64, intermediate_size=128``)."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 4,
        "eos_token_id": 5,
    }
    return LlamaConfig(**{**fields, **overrides})


def llama_lm(seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config()
    return get_peft_model(
        LlamaForCausalLM(cfg), _lora(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )


def gpt2_lm(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=4, eos_token_id=5)
    return get_peft_model(
        GPT2LMHeadModel(cfg),
        _lora(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def unet_cond(seed: int = 0, *, with_conv: bool = True) -> nn.Module:
    """UNet2DConditionModel with cross-attention (context dim 16); LoRA on attention (+ 1x1 proj convs)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.requires_grad_(False)
    targets = UNET_TARGETS + (["proj_in", "proj_out"] if with_conv else [])
    inject_adapter_in_model(_lora(r=2, lora_alpha=2, target_modules=targets), unet)
    return unet


def unet_class(seed: int = 0) -> nn.Module:
    """Class-conditional UNet2DModel (10 classes, 1 channel, 8x8); LoRA on its attention."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=10,
        attention_head_dim=8,
    )
    unet.requires_grad_(False)
    inject_adapter_in_model(_lora(r=2, lora_alpha=2, target_modules=UNET_TARGETS), unet)
    return unet


def diffusion_text_data(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "id": f"d{seed}-{i}",
            "latents": torch.randn(4, 8, 8, generator=gen),
            "encoder_hidden_states": torch.randn(5, 16, generator=gen),
        }
        for i in range(n)
    ]


def diffusion_class_data(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"id": f"k{seed}-{i}", "pixel_values": torch.rand(1, 8, 8, generator=gen) * 2 - 1, "class_label": i % 10}
        for i in range(n)
    ]


def scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def hook_state(model: nn.Module) -> dict[str, tuple[int, int, int, int]]:
    """Per-module hook counts (forward, forward-pre, backward, backward-pre) that are non-zero."""
    out = {}
    for name, m in model.named_modules():
        counts = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
        if any(counts):
            out[name] = counts
    return out


def attribute_state(model: nn.Module) -> dict[str, frozenset[str]]:
    """Names of the instance attributes of every module and parameter (to detect anything attached)."""
    state = {f"module:{name}": frozenset(vars(m)) for name, m in model.named_modules()}
    state.update({f"param:{name}": frozenset(vars(p)) for name, p in model.named_parameters()})
    return state


def text_encoder() -> nn.Module:
    """A one-layer CLIP text encoder with hidden size 16 (the UNet's cross-attention dim)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(11)
    cfg = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=4,
        eos_token_id=5,
    )
    return CLIPTextModel(cfg).eval()


def vae() -> nn.Module:
    """A tiny AutoencoderKL: 3x8x8 images -> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(12)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        sample_size=8,
    ).eval()


def diffusion_image_prompt_data(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Records as a user would have them: uint8 HxWx3 images and prompts."""
    import numpy as np

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    return [
        {
            "id": f"p{seed}-{i}",
            "image": rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8),
            "prompt": random_text(gen, 1, 6),
        }
        for i in range(n)
    ]
