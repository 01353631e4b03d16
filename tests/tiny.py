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
    if family in NEW_CONFIGS:
        return NEW_CONFIGS[family]()
    raise KeyError(family)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _new_configs() -> dict:
    """Tiny configs of the families added for issue 13: 3 layers (a dense first layer where the
    family has one), 8 routed experts, every routing option the family's router has switched on."""
    import transformers as tf

    common = {**COMMON, "num_hidden_layers": 3}
    mla = {**common, "num_key_value_heads": 4}  # MLA: as many key-value heads as query heads
    mla |= dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    experts = dict(moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1)
    return {
        "deepseek_v2": lambda: tf.DeepseekV2Config(
            **mla,
            **experts,
            intermediate_size=64,
            num_experts_per_tok=3,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        ),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **mla,
            **experts,
            intermediate_size=64,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
        "glm4_moe": lambda: tf.Glm4MoeConfig(
            **common,
            **experts,
            head_dim=8,
            intermediate_size=64,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.8,
            norm_topk_prob=True,
        ),
        "gpt_oss": lambda: tf.GptOssConfig(
            **common,
            head_dim=8,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            swiglu_limit=0.05,  # small enough that the tiny model's activations are clamped
        ),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **common,
            head_dim=8,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            mlp_only_layers=[0],
        ),
        "ernie4_5_moe": lambda: tf.Ernie4_5_MoeConfig(
            **common,
            intermediate_size=64,
            moe_intermediate_size=24,
            moe_num_experts=8,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
        ),
        "granitemoe": lambda: tf.GraniteMoeConfig(
            **common,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=2,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            logits_scaling=2.0,
            attention_multiplier=0.3,
        ),
        "granitemoeshared": lambda: tf.GraniteMoeSharedConfig(
            **common,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_intermediate_size=40,
            residual_multiplier=0.5,
        ),
        "phimoe": lambda: tf.PhimoeConfig(
            **common,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "llama4_text": lambda: tf.Llama4TextConfig(
            **common,
            head_dim=8,
            intermediate_size=24,
            intermediate_size_mlp=48,
            num_local_experts=8,
            num_experts_per_tok=1,
            moe_layers=[1, 2],
            attention_chunk_size=16,
        ),
        "flex_olmo": lambda: tf.FlexOlmoConfig(
            **common,
            intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            pad_token_id=0,
            eos_token_id=1,
        ),
    }


NEW_CONFIGS = _new_configs()
NEW_FAMILIES = list(NEW_CONFIGS)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # Routers of some families start at zero; random logits make top-k choices meaningful.
    for name, p in model.named_parameters():
        if name.endswith("gate.weight"):
            torch.nn.init.normal_(p, std=0.5)
    if family in NEW_CONFIGS:
        _randomize_routing(model)
    return model.eval()


def _randomize_routing(model: torch.nn.Module) -> None:
    """Routers named `router`, router biases and bias-corrected choices random too (new families)."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("router.weight", "router.bias", "e_score_correction_bias")):
                torch.nn.init.normal_(t, std=0.5)
            elif name.endswith("_proj_bias"):  # GPT-OSS experts' biases start at zero
                torch.nn.init.normal_(t, std=0.02)


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
