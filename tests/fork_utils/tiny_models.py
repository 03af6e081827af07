"""Tiny checkpoints for the fork's tests: seeded random weights, built from configs, saved with `save_pretrained`.

No hub access: every test makes what it loads. `make_checkpoint("qwen3_moe", path)` writes a checkpoint exactly as
`save_pretrained` does; `legacy_layout=True` rewrites its experts into the per-expert key layout of older releases
(and Mixtral's `block_sparse_moe` prefix), which only the conversion mapping turns back into the model's fused
tensors. `reference_state_dict(path)` gives the model-layout tensors a checkpoint stands for, to compare loads with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


REFERENCE_FILE = "reference_state_dict.safetensors"  # written beside the checkpoint, in a sub-folder of its own


def _common(**overrides):
    values = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return values


def _qwen3_moe(**overrides):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_common(
            intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, **overrides
        )
    )


def _mixtral(**overrides):
    from transformers import MixtralConfig

    return MixtralConfig(**_common(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **overrides))


def _llama(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(intermediate_size=128, **overrides))


FAMILIES = {"qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "llama": _llama}
MOE_FAMILIES = ("qwen3_moe", "mixtral")


def tiny_config(family: str, **overrides):
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family](**overrides)


def num_experts(config) -> int:
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise ValueError(f"{type(config).__name__} has no expert count")


@dataclass
class TinyCheckpoint:
    path: Path
    family: str
    legacy_layout: bool

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
    legacy_layout: bool = False,
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
    model.save_pretrained(path, **save_kwargs)
    reference = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    (path / "reference").mkdir(exist_ok=True)
    save_file(reference, path / "reference" / REFERENCE_FILE)
    if legacy_layout:
        _rewrite_legacy_layout(path, family)
    return TinyCheckpoint(path=path, family=family, legacy_layout=legacy_layout)


def reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(path) / "reference" / REFERENCE_FILE)


def _legacy_expert_tensors(family: str, prefix: str, gate_up: torch.Tensor, down: torch.Tensor) -> dict:
    """Split fused expert tensors [E, 2I, H] / [E, H, I] into the per-expert keys older checkpoints use."""
    half = gate_up.shape[1] // 2
    names = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}[family]
    if family == "mixtral":
        prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
    out = {}
    for expert in range(gate_up.shape[0]):
        out[f"{prefix}{expert}.{names[0]}.weight"] = gate_up[expert, :half].clone()
        out[f"{prefix}{expert}.{names[1]}.weight"] = gate_up[expert, half:].clone()
        out[f"{prefix}{expert}.{names[2]}.weight"] = down[expert].clone()
    return out


def _rewrite_legacy_layout(path: Path, family: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    if family not in MOE_FAMILIES:
        raise ValueError(f"no legacy layout for {family!r}")
    files = sorted(path.glob("*.safetensors"))
    weight_map = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        rewritten = {}
        for key, tensor in tensors.items():
            if key.endswith(".mlp.experts.down_proj"):
                continue
            if key.endswith(".mlp.experts.gate_up_proj"):
                prefix = key[: -len("gate_up_proj")]
                down = tensors[prefix + "down_proj"]
                rewritten.update(_legacy_expert_tensors(family, prefix, tensor, down))
            elif family == "mixtral" and ".mlp.gate." in key:
                rewritten[key.replace(".mlp.", ".block_sparse_moe.")] = tensor
            else:
                rewritten[key] = tensor
        save_file(rewritten, file, metadata=metadata)
        weight_map.update(dict.fromkeys(rewritten, file.name))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2))
