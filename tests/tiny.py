"""Tiny random MoE models built offline (no hub): the fixtures every model test shares."""

import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


# Scenario overrides whose model dimensions are the tiny Mixtral's (2 layers, D 32, F 48, top-2).
TINY = [
    "model=smollm2-moe8",
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.ffn_size=48",
    "model.top_k=2",
    "model.vocab_size=128",
    "model.num_heads=4",
    "model.num_kv_heads=2",
]


def tiny_config(family: str) -> PretrainedConfig:
    if family == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **COMMON,
            head_dim=8,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
        )
    if family == "olmoe":
        return OlmoeConfig(
            **COMMON,
            intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            eos_token_id=1,
            pad_token_id=0,
            bos_token_id=2,
        )
    raise KeyError(family)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # Routers of some families start at zero; random logits make top-k choices meaningful.
    for name, p in model.named_parameters():
        if name.endswith("gate.weight"):
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


WORDS = (
    "the a an is of to and in on for with what why how who router expert device channel base "
    "station token model answer question hello world once upon time there was small large fast "
    "slow wireless cell bandwidth latency attention layer mixture experts run send receive wait "
    "data signal power"
).split()


def tiny_tokenizer():
    """A word-level tokenizer over a fixed vocabulary (< 128 ids), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}answer"
    return tok


def save_tiny_checkpoint(family: str, folder, **config_overrides):
    """A loadable local checkpoint folder: tiny random weights + the tiny tokenizer."""
    model = tiny_model(family)
    for key, value in config_overrides.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
