"""Tiny random configs of MoE families that have a `base_model_ep_plan`: hidden 64, 4 experts, vocab 128, fp32."""

from __future__ import annotations

import torch
import transformers

from tests.fork_utils import tiny_models


SWEEP_SETTINGS = dict(output_router_logits=False, attention_dropout=0.0)
COMMON = dict(tiny_models.TINY_DIMENSIONS, **SWEEP_SETTINGS)

# Families the tests build too: the sweep takes their tiny configs from the test fixtures
FROM_TEST_FIXTURES = ("qwen3_moe", "mixtral", "gemma4_text")

# family -> (config class name, overrides[, save_pretrained options]). Experts: 4, top-2.
SWEEP_CONFIGS = {
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                             n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                             num_key_value_heads=4, head_dim=8)),
    "deepseek_v2": ("DeepseekV2Config", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0,
                                             kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
                                             head_dim=None)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2, eos_token_id=1)),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(intermediate_size=32, num_local_experts=4,
                                                        num_experts_per_tok=2, shared_intermediate_size=32)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                    router_jitter_noise=0.0, input_jitter_noise=0.0)),
    "dots1": ("Dots1Config", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)),
    "glm4_moe": ("Glm4MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                       n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, moe_num_experts=4,
                                                moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=32, num_experts=4, moe_topk=2)),
    "minimax": ("MiniMaxConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                      layer_types=["linear_attention", "full_attention"], block_size=4)),
    "jamba": ("JambaConfig", dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2, expert_layer_period=1,
                                  expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
                                  use_mamba_kernels=False, mamba_d_state=4, mamba_expand=2)),
    "flex_olmo": ("FlexOlmoConfig", dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                          eos_token_id=1)),
    "lfm2_moe": ("Lfm2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                       num_experts_per_tok=2, num_dense_layers=1, num_hidden_layers=2,
                                       layer_types=["conv", "full_attention"])),
    "qwen3_next": ("Qwen3NextConfig", dict(intermediate_size=64, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                           linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                           linear_value_head_dim=16,
                                           layer_types=["linear_attention", "full_attention"])),
    # Attention first: on transformers 5.25.0 a Nemotron-H whose first layer is not an attention layer fails its forward
    # in one process too ("'DummyLayer' object has no attribute 'get_seq_length'": the cache asks layer 0 for its length)
    "nemotron_h": ("NemotronHConfig", dict(layers_block_type=["attention", "moe"], intermediate_size=32,
                                           moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                                           n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                           use_mamba_kernels=False, mamba_num_heads=4, mamba_head_dim=16,
                                           ssm_state_size=8, n_groups=1, chunk_size=8)),
    # --- variants and more families
    "lfm2_moe_tied": ("Lfm2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                            num_experts_per_tok=2, num_dense_layers=1, num_hidden_layers=2,
                                            layer_types=["conv", "full_attention"], tie_word_embeddings=True)),
    "ernie4_5_moe_tied": ("Ernie4_5_MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32,
                                                     moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                                                     moe_layer_start_index=0, tie_word_embeddings=True)),
    "deepseek_v3_grouped": ("DeepseekV3Config", dict(intermediate_size=64, moe_intermediate_size=32,
                                                     n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                                     n_group=2, topk_group=1, first_k_dense_replace=0,
                                                     kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                                     qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
                                                     head_dim=8)),
    "gpt_oss_shards": ("GptOssConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                            sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                       dict(max_shard_size="20KB")),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(intermediate_size=64, moe_intermediate_size=32,
                                                      shared_expert_intermediate_size=32, num_experts=4,
                                                      num_experts_per_tok=2, linear_num_key_heads=2,
                                                      linear_num_value_heads=4, linear_key_head_dim=16,
                                                      linear_value_head_dim=16,
                                                      layer_types=["linear_attention", "full_attention"])),
    "afmoe": ("AfmoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                  num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1,
                                  global_attn_every_n_layers=2, sliding_window=8)),
    "cohere2_moe": ("Cohere2MoeConfig", dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                             num_shared_experts=1, sliding_window=8, pad_token_id=0, bos_token_id=1,
                                             eos_token_id=2)),
    "exaone_moe": ("ExaoneMoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                           num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
                                           sliding_window=8, eos_token_id=2)),
    "minimax_m2": ("MiniMaxM2Config", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(intermediate_size=32, num_local_experts=4,
                                                        num_experts_per_tok=2, shared_intermediate_size=32,
                                                        layer_types=["mamba", "attention"], mamba_n_heads=4,
                                                        mamba_d_state=8, mamba_d_head=32, mamba_chunk_size=8)),
    "laguna": ("LagunaConfig", dict(intermediate_size=64, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                    sliding_window=8)),
    "solar_open": ("SolarOpenConfig", dict(moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                                           num_experts_per_tok=2)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                                n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=16,
                                                q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                v_head_dim=16, num_key_value_heads=4)),
    # --- transformers 5.25.0: new families with an EP plan, and LongCat-Flash (its experts moved to an EP plan)
    "ergo": ("ErgoConfig", dict(first_dense_intermediate_size=64, num_dense_blocks=1, moe_intermediate_size=32,
                                shared_intermediate_size=32, num_experts=4, num_experts_per_tok=2, sliding_window=8,
                                global_attention_every_n_layers=2)),
    "kolibri1_1": ("Kolibri1_1Config", dict(moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                            num_experts=4, num_experts_per_tok=2, sliding_window=8,
                                            layer_types=["sliding_attention", "sliding_attention"],
                                            mlp_only_layers=[0], mlp_only_intermediate_size=64,
                                            index_num_heads=2)),
    "minicpm5_moe": ("MiniCPM5MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                               n_shared_experts=1, num_experts_per_tok=2,
                                               mlp_layer_types=["dense", "sparse"])),
    "param2moe": ("Param2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                          n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)),
    "longcat_flash": ("LongcatFlashConfig", dict(ffn_hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=4,
                                                 moe_topk=2, zero_expert_num=2, kv_lora_rank=16, q_lora_rank=32,
                                                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                                 num_key_value_heads=4, head_dim=8)),
    # --- families of earlier releases with an EP plan, not swept before
    "sarvam_mla": ("SarvamMLAConfig", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                           n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                           kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                           v_head_dim=16, num_key_value_heads=4)),
    "sarvam_moe": ("SarvamMoEConfig", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                           n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                                   shared_intermediate_size=32, sliding_window=8)),
    "mellum": ("MellumConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                    num_experts_per_tok=2, sliding_window=8)),
    "kolibri1": ("Kolibri1Config", dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                                        num_experts_per_tok=2, sliding_window=8)),
    "hy_v3": ("HYV3Config", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 num_shared_experts=1)),
    "flint": ("FlintConfig", dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                  num_experts=4, num_experts_per_tok=2, sliding_window=8, mlp_only_layers=[0])),
    "beam": ("BeamConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                sliding_window=8, n_group=1, topk_group=1,
                                mlp_layer_types=["dense", "sparse"])),
    "mimo_v2_flash": ("MiMoV2FlashConfig", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                                num_experts_per_tok=2, v_head_dim=16, sliding_window=8)),
    "lara_mini": ("LaraMiniConfig", dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4,
                                         linear_key_head_dim=16, linear_value_head_dim=16, sliding_window=8)),
    # ZAYA routes each token to one expert only (its config refuses num_experts_per_tok > 1)
    "zaya": ("ZayaConfig", dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=1)),
    "axk1": ("AXK1Config", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16,
                                q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                num_key_value_heads=4, head_dim=8)),
}


FAMILIES = (*FROM_TEST_FIXTURES, *SWEEP_CONFIGS)

# family -> suffixes of parameters that get seeded random values before the save: per-expert weights the family
# initializes to a constant (Ergo's per-expert RMSNorm scales: ones), which would make any expert's slice equal
# the expected one in the load check
RANDOMIZE = {"ergo": ("mlp.experts.post_expert_norm.weight",)}


def options(family: str) -> dict:
    entry = SWEEP_CONFIGS.get(family, ())
    return entry[2] if len(entry) > 2 else {}


def tiny_config(family: str):
    if family in FROM_TEST_FIXTURES:
        return tiny_models.tiny_config(family, **SWEEP_SETTINGS)
    class_name, overrides = SWEEP_CONFIGS[family][:2]
    return getattr(transformers, class_name)(**dict(COMMON, **overrides))


def randomize(family: str, model) -> list[str]:
    """Give the parameters `RANDOMIZE` names for `family` seeded values around 1; returns their names."""
    suffixes = RANDOMIZE.get(family, ())
    names = [n for n, _ in model.named_parameters() if n.endswith(suffixes)] if suffixes else []
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in names:
            param = model.get_parameter(name)
            param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return names


num_experts = tiny_models.num_experts
