"""Tiny checkpoints for the fork's tests: seeded random weights, built from configs, saved with `save_pretrained`.

No hub access: every test makes what it loads. `make_checkpoint("qwen3_moe", path)` writes a checkpoint exactly as
`save_pretrained` does. For MoE families that is the original per-expert key layout (`experts.0.gate_proj.weight`,
Mixtral's `block_sparse_moe.experts.0.w1.weight`): save_pretrained reverses the conversion mapping, so loading it needs
the mapping (per-expert tensors merged into the model's fused `gate_up_proj` / `down_proj`). `fused_layout=True`
writes the model's own state-dict keys instead, which load without any conversion. `reference_state_dict(path)` gives
the model-layout tensors a checkpoint stands for, to compare loads with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


REFERENCE_FILE = "reference_state_dict.safetensors"  # written beside the checkpoint, in a sub-folder of its own


# The size of every tiny model (tests, and benchmarks/family_sweep/)
TINY_DIMENSIONS = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def _config_values(defaults: dict, overrides: dict) -> dict:
    values = dict(TINY_DIMENSIONS)
    values.update(defaults)
    values.update(overrides)
    return values


def _qwen3_moe(**overrides):
    from transformers import Qwen3MoeConfig

    defaults = dict(intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    return Qwen3MoeConfig(**_config_values(defaults, overrides))


def _mixtral(**overrides):
    from transformers import MixtralConfig

    defaults = dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    return MixtralConfig(**_config_values(defaults, overrides))


def _llama(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**_config_values(dict(intermediate_size=128), overrides))


def _gemma4_text(**overrides):
    """Gemma 4 with MoE blocks: its EP plan also shards the dense MLP over the EP group (`colwise` / `rowwise`)."""
    from transformers import Gemma4TextConfig

    defaults = dict(
        intermediate_size=64, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=16, global_head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma4TextConfig(**_config_values(defaults, overrides))


def _gpt_oss(**overrides):
    """gpt-oss: its experts saved fused, one tensor per layer holding every expert (a key spanning the EP ranks)."""
    from transformers import GptOssConfig

    defaults = dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"])
    return GptOssConfig(**_config_values(defaults, overrides))


FAMILIES = {
    "qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "llama": _llama, "gemma4_text": _gemma4_text, "gpt_oss": _gpt_oss,
}
MOE_FAMILIES = ("qwen3_moe", "mixtral")


def tiny_config(family: str, **overrides):
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family](**overrides)


def num_experts(config) -> int:
    # Families name the count differently; an unused name may be set to None or 0
    for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    raise ValueError(f"{type(config).__name__} has no expert count")


@dataclass
class TinyCheckpoint:
    path: Path
    family: str
    fused_layout: bool

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        return reference_state_dict(self.path)

    @property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)


def make_checkpoint(
    family: str,
    path: str | Path,
    seed: int = 0,
    fused_layout: bool = False,
    max_shard_size: str | None = None,
    **config_overrides,
) -> TinyCheckpoint:
    """Build a seeded random model of `family`, `save_pretrained` it to `path`, keep its state dict as reference."""
    from safetensors.torch import save_file

    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = tiny_config(family, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    reference = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fused_layout:
        model.config.save_pretrained(path)
        save_file(reference, path / "model.safetensors", metadata={"format": "pt"})
    else:
        model.save_pretrained(path, **save_kwargs)
    (path / "reference").mkdir(exist_ok=True)
    save_file(reference, path / "reference" / REFERENCE_FILE)
    return TinyCheckpoint(path=path, family=family, fused_layout=fused_layout)


def reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(path) / "reference" / REFERENCE_FILE)


def checkpoint_keys_and_shapes(path: str | Path) -> dict[str, tuple]:
    """Every tensor of the safetensors checkpoint at `path` with its shape, read from the headers."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes
