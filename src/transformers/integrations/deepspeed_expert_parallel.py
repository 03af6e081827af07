# Copyright 2026 The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Expert parallelism under DeepSpeed ZeRO-3: transformers shards the experts at load, DeepSpeed runs data parallelism.

A model loaded with `DistributedConfig(ep_size > 1)` while a DeepSpeed ZeRO-3 config is registered (`accelerate
launch`, `TrainingArguments(deepspeed=...)`, `HfDeepSpeedConfig`) does not take ZeRO-3's load path (`zero.Init`, rank 0
reading the checkpoint): it is built on the meta device and each rank reads only its own experts through the standard
loader, weight conversions included. `from_pretrained` then hands it over to DeepSpeed, which takes it in
`deepspeed.initialize` (directly, through `Accelerator.prepare`, or through the `Trainer`).

- The decision, taken once: `is_expert_parallel_under_zero3` answers from the `DistributedConfig` while the model does
  not exist yet; `maybe_distribute_model` records the answer on the model (`model._expert_parallel_under_zero3`), and
  every later gate (load, hand-over, Trainer, save) asks the model, not the DeepSpeed config registered at that time. A
  model loaded before the DeepSpeed config existed (FSDP2 applied, never handed over) is never taken for one.
  `loads_with_zero3` is the gate of ZeRO-3's own load path.
- Data parallelism is DeepSpeed's, over all ranks (`zero3_data_parallel_size`): of the expert-parallel plan only the
  rules that place the experts apply (`_expert_rules_for_zero3`), and FSDP2 is not applied.
- The hand-over: `prepare_expert_parallel_model_for_deepspeed` tags the experts as DeepSpeed AutoEP tags its own.
- Refusals, alike on every rank and before any collective that could hang: DeepSpeed settings
  (`check_expert_parallel_deepspeed_support`), quantized models (`check_expert_parallel_quantization_support`),
  adapters on expert weights (`_refuse_adapters_on_experts`), and an expert-parallel model that DeepSpeed does not own
  given to a `Trainer` with DeepSpeed or to `deepspeed.initialize` (`check_model_handed_over_to_deepspeed`, and
  `deepspeed_refuses_models_not_handed_over` for `Accelerator.prepare` and direct calls).
- ZeRO stages 1 and 2: the same load and hand-over, then the part of the hand-over a stage-1/2 module registers
  (`register_zero12_hand_over`: the fork's makes the experts modules DeepSpeed MoE layers); without one, refused at
  the hand-over.
- Hub kernels: `kernelize` leaves the layers that run the sharded experts alone
  (`expert_parallel_layers_left_alone_by_kernelize`), other layers are kernelized as usual.
- Errors on every rank: around a step that may fail on some ranks only (each rank reads its own experts), the ranks
  exchange their errors (`errors_raised_on_every_rank`), so that none is left waiting in the next collective.
"""

import contextlib
import functools
import importlib.metadata
import inspect
import os
import re
from typing import NamedTuple

from ..utils import is_torch_available, logging
from .deepspeed import deepspeed_config, is_deepspeed_available, is_deepspeed_zero3_enabled


if is_torch_available():
    import torch
    from torch import nn


logger = logging.get_logger(__name__)


# The DeepSpeed releases the hand-over is tested with. It relies on DeepSpeed internals that may change in any release:
# the private group API (`groups._create_expert_and_data_parallel`), the ZeRO-3 parameter tags of AutoEP, and the
# engine's 16-bit consolidation that the save wraps. A DeepSpeed that ignored the tags would train silently wrong.
# requirements/constraints.txt pins the release CI runs; this is the range the hand-over accepts.
TESTED_DEEPSPEED_VERSIONS = ">=0.19.8,<0.20"
# Set to 1 to hand models over to a DeepSpeed outside that range anyway (the placement self-check still runs).
ALLOW_UNTESTED_DEEPSPEED_ENV = "TRANSFORMERS_EP_ALLOW_UNTESTED_DEEPSPEED"


def check_deepspeed_version_is_tested():
    """Refuse a DeepSpeed outside `TESTED_DEEPSPEED_VERSIONS` at hand-over (every rank alike, before any collective)."""
    from packaging.specifiers import SpecifierSet

    version = importlib.metadata.version("deepspeed")
    if version in SpecifierSet(TESTED_DEEPSPEED_VERSIONS, prereleases=True):
        return
    if os.environ.get(ALLOW_UNTESTED_DEEPSPEED_ENV) == "1":
        logger.warning(
            f"Expert parallelism under DeepSpeed ZeRO-3 is tested with deepspeed{TESTED_DEEPSPEED_VERSIONS}, not "
            f"{version}; going on because {ALLOW_UNTESTED_DEEPSPEED_ENV}=1."
        )
        return
    raise ImportError(
        f"Expert parallelism under DeepSpeed ZeRO-3 relies on DeepSpeed internals tested with "
        f"deepspeed{TESTED_DEEPSPEED_VERSIONS}, and deepspeed {version} is installed. Install a tested release "
        f"(`pip install 'deepspeed{TESTED_DEEPSPEED_VERSIONS}'`), or set {ALLOW_UNTESTED_DEEPSPEED_ENV}=1 to try this "
        "one (the check after `deepspeed.initialize` still refuses a placement of the experts it does not expect)."
    )


def registered_zero_stage() -> int | None:
    """The ZeRO stage of the registered DeepSpeed config (`HfDeepSpeedConfig`), None when none is registered."""
    ds_config = deepspeed_config()
    if ds_config is None:
        return None
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# The hand-over's part for ZeRO stages 1 and 2 (`register_zero12_hand_over`), None while none is registered
_zero12_hand_over = None


def register_zero12_hand_over(hand_over):
    """
    Register `hand_over(model, experts_modules, group_name)`, the part of `prepare_expert_parallel_model_for_deepspeed`
    that makes DeepSpeed's ZeRO-1/2 engine and optimizer treat the experts as its own MoE layers' (the fork registers
    its stage-1/2 module's when it is imported, with its modeling code). Without one, the hand-over refuses expert
    parallelism under stages 1 and 2, on every rank.
    """
    global _zero12_hand_over
    _zero12_hand_over = hand_over


def is_deepspeed_zero12_enabled() -> bool:
    """Whether the registered DeepSpeed config is ZeRO stage 1 or 2 (the hand-over then needs
    `register_zero12_hand_over`'s part)."""
    return registered_zero_stage() in (1, 2)


def is_expert_parallel_under_zero3(model_or_distributed_config) -> bool:
    """
    Whether DeepSpeed ZeRO-3 runs data parallelism while transformers shards the experts itself (expert parallelism).

    Expert parallelism places each rank's experts at load time, so such a model does not take the ZeRO-3 loading path:
    it is created on the meta device instead of under `deepspeed.zero.Init` (which would partition every parameter,
    experts included, over all ranks), and each rank reads only its own shard through the standard loader, weight
    conversions included. DeepSpeed takes over the loaded model afterwards. Models without expert parallelism keep the
    ZeRO-3 path. Under ZeRO stages 1 and 2 expert-parallel models take the same load path and hand-over (the stage
    recorded on the model, `_expert_parallel_zero_stage`, selects what differs: `register_zero12_hand_over`):
    the name predates them.

    Args:
        model_or_distributed_config (`PreTrainedModel`, `DistributedConfig` or `None`):
            The `DistributedConfig` a model is loaded with, for the decisions taken before the model exists: whether
            ZeRO-3 is enabled now and `ep_size > 1`. Or a model (or a wrapper that forwards attribute look-ups to it,
            such as PEFT's): what was decided for it when it was distributed at load (`maybe_distribute_model` records
            it), whatever DeepSpeed config has been registered since.
    """
    from ..distributed.configuration_utils import DistributedConfig

    if model_or_distributed_config is None:
        return False
    if isinstance(model_or_distributed_config, DistributedConfig):
        under_deepspeed = is_deepspeed_zero3_enabled() or is_deepspeed_zero12_enabled()
        return under_deepspeed and model_or_distributed_config.ep_size > 1
    return bool(getattr(model_or_distributed_config, "_expert_parallel_under_zero3", False))


def loads_with_zero3(model_or_distributed_config, is_quantized: bool = False) -> bool:
    """
    The gate of DeepSpeed ZeRO-3's own load path in `from_pretrained` (`zero.Init`, the checkpoint loaded into the
    partitions, a device map refused): ZeRO-3 is enabled, the model is not quantized, and transformers does not shard
    its experts (`is_expert_parallel_under_zero3`, which takes the model or its `DistributedConfig`).
    """
    return (
        is_deepspeed_zero3_enabled()
        and not is_quantized
        and not is_expert_parallel_under_zero3(model_or_distributed_config)
    )


def zero3_data_parallel_size(distributed_config) -> int:
    """
    The data-parallel (`fsdp`) size of a `DistributedConfig` that does not set it. Under DeepSpeed ZeRO-3, DeepSpeed
    runs data parallelism over all ranks, each with its own batch, and transformers only shards the experts. The ranks
    left over by tp and pp are then the data-parallel (`fsdp`) axis of the dense mesh, on which FSDP2 is not applied
    (see `maybe_distribute_model`), and the experts are laid out `efsdp x ep` with EP groups of consecutive ranks, as
    DeepSpeed lays out its expert and expert-data-parallel groups. Otherwise the size is left as it is.
    """
    if not is_expert_parallel_under_zero3(distributed_config):
        return distributed_config.fsdp_size
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    c = distributed_config
    return max(1, world_size // (c.dp_replicate_size * c.tp_size * c.pp_size))


# The expert-parallel styles proper: whole experts per rank and the token dispatch that brings them their tokens.
_EXPERT_PARALLEL_STYLES = frozenset({"grouped_gemm", "ep_dispatch_experts"})


def _expert_rules_for_zero3(ep_plan: dict[str, str]) -> dict[str, str]:
    """
    The rules of an expert-parallel plan that apply under DeepSpeed ZeRO-3: those that place the experts.

    Some plans also shard dense layers over the EP group with tensor-parallel styles, e.g. Gemma 4's dense MLP
    (`colwise` / `rowwise`) or Muse Spark's `post_expert_norm` (`replicated_with_grad_allreduce`): tensor parallelism
    over the EP group, which assumes that its ranks hold the same batch. Under DeepSpeed ZeRO-3 every rank holds its own
    batch, and DeepSpeed partitions the dense weights itself (only experts sharded on their first dimension can be
    handed over to it, see `prepare_expert_parallel_model_for_deepspeed`). Those rules are dropped: the layers stay
    whole on every rank, as without expert parallelism, and DeepSpeed partitions them with the other dense weights.
    """
    dropped = {name: style for name, style in ep_plan.items() if style not in _EXPERT_PARALLEL_STYLES}
    if dropped:
        styles = sorted(set(dropped.values()))
        logger.info(
            f"DeepSpeed ZeRO-3 partitions the dense weights: the expert-parallel plan's {len(dropped)} rules with "
            f"the styles {styles} are not applied (e.g. {next(iter(dropped))})."
        )
    return {name: style for name, style in ep_plan.items() if style in _EXPERT_PARALLEL_STYLES}


OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def offload_device(offload) -> str:
    """
    Where a ZeRO offload setting puts its tensors: "none", "cpu" or "nvme". `offload` is a section of a DeepSpeed config
    (`zero_optimization.offload_param` or `offload_optimizer`, a dict as in a JSON file or `TrainingArguments
    (deepspeed=dict)`), what the engine's `zero_offload_param()` / `zero_offload_optimizer()` return (DeepSpeed's config
    object), or None when the config has no such section. Every check of the fork reads the device through here, never
    the section's truth: `accelerate config` writes `offload_param: {device: none}` for "no offload", which is a
    non-empty dict, and for which the engine returns a config object, truthy, whose device is `none`.
    """
    if offload is None:
        return "none"
    device = offload.get("device", "none") if isinstance(offload, dict) else getattr(offload, "device", "none")
    device = str(getattr(device, "value", device) or "none").lower()  # DeepSpeed's `OffloadDeviceEnum`, or a string
    if device not in OFFLOAD_DEVICES:
        raise ValueError(f"Unknown ZeRO offload device {device!r}: DeepSpeed takes one of {OFFLOAD_DEVICES}.")
    return device


def check_expert_parallel_deepspeed_support(distributed_config):
    """
    Refuse the DeepSpeed settings that would train an expert-parallel model silently wrong, when a DeepSpeed config is
    registered (`Accelerator`, `TrainingArguments(deepspeed=...)` or `HfDeepSpeedConfig` created). DeepSpeed validates
    them only for its own MoE layers (`_validate_zero3_moe_compatibility` returns early without them), not for experts
    that transformers sharded. The configs are the same on every rank, so every rank raises, before anything is built.

    - Without ZeRO (stage 0) the experts are not handed over as DeepSpeed's MoE layers: their gradients would be
      averaged over all ranks. At stage 1 with bf16 and fp32 gradient accumulation DeepSpeed takes its `BF16_Optimizer`,
      which is not run with expert parallelism here.
    - With tensor parallelism, DeepSpeed's expert groups are laid out differently from transformers' expert mesh, and
      pipeline or replicated data parallelism are not run by DeepSpeed here.
    - Sequence parallelism, quantized gradients (whose all-to-all reduction ignores the experts' own partition group),
      hpZ and MiCS (secondary or custom partition groups), and DeepSpeed's own AutoEP or AutoTP on top.
    """
    ds_config = deepspeed_config()
    if ds_config is None or distributed_config.ep_size <= 1:
        return
    prefix = "Expert parallelism (`DistributedConfig(ep_size > 1)`) under DeepSpeed"
    stage = registered_zero_stage()
    if not is_deepspeed_zero3_enabled() and not is_deepspeed_zero12_enabled():
        raise NotImplementedError(
            f"{prefix} needs ZeRO stage 1, 2 or 3, got stage {stage}."
        )
    unsupported = []
    if distributed_config.tp_size > 1:
        unsupported.append(f"tensor parallelism (`tp_size={distributed_config.tp_size}`)")
    if distributed_config.pp_size > 1:
        unsupported.append(f"pipeline parallelism (`pp_size={distributed_config.pp_size}`)")
    if distributed_config.dp_replicate_size > 1:
        unsupported.append(f"replicated data parallelism (`dp_replicate_size={distributed_config.dp_replicate_size}`)")
    if (sp_size := ds_config.get("sequence_parallel_size", 1)) not in (1, "auto"):
        unsupported.append(f"sequence parallelism (`sequence_parallel_size={sp_size}`)")
    if ds_config.get("expert_parallel", {}).get("enabled", False):
        unsupported.append("DeepSpeed AutoEP (`expert_parallel.enabled`), the experts being already sharded")
    if (autotp_size := ds_config.get("tensor_parallel", {}).get("autotp_size", 1)) not in (0, 1, "auto"):
        unsupported.append(f"DeepSpeed AutoTP (`tensor_parallel.autotp_size={autotp_size}`)")
    zero_config = ds_config.get("zero_optimization", {})
    if zero_config.get("zero_quantized_gradients", False):
        unsupported.append("quantized gradients (`zero_optimization.zero_quantized_gradients`)")
    if (hpz_size := zero_config.get("zero_hpz_partition_size", 1)) not in (1, "auto"):
        unsupported.append(f"hpZ (`zero_optimization.zero_hpz_partition_size={hpz_size}`)")
    if (mics_size := zero_config.get("mics_shard_size", -1)) not in (-1, 0, "auto"):
        unsupported.append(f"MiCS (`zero_optimization.mics_shard_size={mics_size}`)")
    if stage == 1 and _takes_bf16_optimizer(ds_config):
        unsupported.append(
            "bf16 with fp32 gradient accumulation (`data_types.grad_accum_dtype`), for which DeepSpeed takes its "
            "`BF16_Optimizer` instead of the ZeRO-1 optimizer: use ZeRO stage 2, or accumulate in bf16"
        )
    if unsupported:
        zero = "ZeRO-3" if stage == 3 else f"ZeRO stage {stage}"
        raise NotImplementedError(f"{prefix} {zero} does not support " + "; ".join(unsupported) + ".")


def _takes_bf16_optimizer(ds_config) -> bool:
    # DeepSpeed's choice at stage 1 (`_do_optimizer_sanity_check`): bf16, fp32 gradient accumulation, no optimizer
    # offload. Not run with expert parallelism here (its checkpoints are not the ZeRO-1 optimizer's either).
    bf16 = (ds_config.get("bf16") or {}).get("enabled", False) in (True, "true")
    accumulation = (ds_config.get("data_types") or {}).get("grad_accum_dtype")
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer")
    return bf16 and accumulation in ("fp32", "float32") and offload_device(offload) == "none"


def check_expert_parallel_quantization_support(hf_quantizer, distributed_config):
    """
    Refuse quantized models for expert parallelism under DeepSpeed ZeRO-3, before anything is loaded: DeepSpeed would
    partition and train their packed or frozen weights as if they were the model's. A pre-quantized checkpoint
    dequantized while loading is fine.
    """
    stays_quantized = hf_quantizer is not None and not (
        hf_quantizer.pre_quantized and getattr(hf_quantizer.quantization_config, "dequantize", False)
    )
    if stays_quantized and is_expert_parallel_under_zero3(distributed_config):
        quant_method = hf_quantizer.quantization_config.quant_method
        raise NotImplementedError(
            "Expert parallelism under DeepSpeed ZeRO-3 does not support quantized models "
            f"(`quantization_config` with quant_method={getattr(quant_method, 'value', quant_method)}). Load the "
            "model without `quantization_config`, or dequantize a pre-quantized checkpoint while loading (e.g. "
            "`Mxfp4Config(dequantize=True)`)."
        )


class ExpertShardLayout(NamedTuple):
    """
    Where the local tensor of an expert parameter sits in the full one, recorded by
    `prepare_expert_parallel_model_for_deepspeed` when it replaces the expert DTensors with local parameters: the full
    tensor is the concatenation along `shard_dim` of the local tensors of the `ep_size` ranks of the expert-parallel
    group, in the order of their `ep_rank`.
    """

    global_shape: tuple[int, ...]
    shard_dim: int
    ep_rank: int
    ep_size: int


def expert_parallel_layout(model) -> dict[str, ExpertShardLayout]:
    """
    The layout of each expert parameter of a model handed over to DeepSpeed
    (`prepare_expert_parallel_model_for_deepspeed`), by its name in `model` now: derived from the parameters' own
    `expert_shard_layout`, the one record of it, so the names follow wrappers that rename parameters. Empty for other
    models.
    """
    return {
        name: param.expert_shard_layout
        for name, param in model.named_parameters()
        if getattr(param, "expert_shard_layout", None) is not None
    }


def _default_group_timeout():
    """The collective timeout of the default process group (set by `init_process_group(timeout=...)`, e.g. through
    `InitProcessGroupKwargs`, `TrainingArguments(ddp_timeout=...)` or `deepspeed.init_distributed(timeout=...)`)."""
    world = torch.distributed.group.WORLD
    for device in world._device_types:
        options = getattr(world._get_backend(device), "options", None)
        if options is not None and getattr(options, "_timeout", None) is not None:
            return options._timeout
    return None


def _apply_default_group_timeout(process_groups):
    """
    Give the groups of the expert-parallel layout the default group's collective timeout. torch creates subgroups
    (the device mesh's, DeepSpeed's expert groups) with its own default, 30 minutes for gloo, 10 for NCCL, whatever
    the user set: a lost peer would leave the expert all-to-all or an expert-data-parallel reduction waiting that long
    while the dense collectives time out as asked. Private torch API (`_set_pg_timeout`), the one setter it has.
    """
    from torch.distributed.distributed_c10d import _set_pg_timeout

    timeout = _default_group_timeout()
    if timeout is None:
        return
    for group in process_groups:
        _set_pg_timeout(timeout, group)


def prepare_expert_parallel_model_for_deepspeed(model):
    """
    Hand a model whose experts transformers sharded at load time (expert parallelism) over to DeepSpeed ZeRO-3, which
    then runs data parallelism over all ranks: dense parameters are partitioned and their gradients averaged over all
    ranks, expert parameters only over the ranks that hold the same experts (the expert-data-parallel group). Called
    once at the end of `from_pretrained` when `is_expert_parallel_under_zero3(model)`, so the model can go to
    `deepspeed.initialize` directly, through `Accelerator.prepare`, or through the `Trainer`.

    It tags the experts the way DeepSpeed AutoEP tags its own, which is what makes ZeRO-3 keep and reduce them per
    expert group (DeepSpeed does not do it itself: only its own MoE modules set `engine.has_moe_layers`):

    1. The expert `DTensor` parameters (`Shard(0)` on the expert-parallel mesh) become plain local parameters, which
       `deepspeed.initialize` can partition; the EP forward only swaps `DTensor`s for their local tensors, so it runs on
       them unchanged. Each keeps its layout as `param.expert_shard_layout` (see `ExpertShardLayout`, and
       `expert_parallel_layout` for the map by name) for saving and resharding.
    2. DeepSpeed's expert and expert-data-parallel groups (`ep_size_{ep_size}`) are created, and checked to hold the
       same ranks as transformers' `ep` and `efsdp` mesh groups. These groups and the mesh's take the default
       group's collective timeout (`_apply_default_group_timeout`).
    3. Each expert parameter gets `allreduce=False` and `group_name` (so `deepspeed.initialize` broadcasts it only within
       its expert-data-parallel group, not rank 0's experts to every rank), `ds_zero_partition_process_group` (ZeRO-3
       partitions, gathers and reduce-scatters it within that group), and `ds_zero_placement_family="autoep_expert"`
       with `ds_zero_partition_group_name` (its gradient is averaged over all ranks, and its norm summed over the
       expert-parallel group). Dense parameters are left as they are.
    """
    import deepspeed
    from deepspeed.utils import groups
    from torch.distributed import get_process_group_ranks
    from torch.distributed.tensor import DTensor, Shard

    distributed_config = model.config.distributed_config
    # Already checked when the `DistributedConfig` was built, unless that was before the DeepSpeed config was registered.
    check_expert_parallel_deepspeed_support(distributed_config)
    check_deepspeed_version_is_tested()

    ep_size = distributed_config.ep_size
    ep_mesh, edp_mesh = model._mesh_manager.get_mesh("ep"), model._mesh_manager.get_mesh("efsdp")
    expert_params = {name: param for name, param in model.named_parameters() if isinstance(param, DTensor)}
    for name, param in expert_params.items():
        if param.device_mesh.mesh_dim_names != ("ep",) or tuple(param.placements) != (Shard(0),):
            raise NotImplementedError(
                f"`{name}` is sharded as {param.placements} on the mesh {param.device_mesh.mesh_dim_names}: only experts "
                "sharded on their first dimension over the expert-parallel mesh can be handed over to DeepSpeed."
            )

    # The torch process group is already initialized (the mesh was built at load): DeepSpeed's comm layer wraps it.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    # Private DeepSpeed API, the one its engine calls for AutoEP; the alternative is re-implementing its group
    # bookkeeping. It does nothing when the groups exist. Its layout for tp = pp = 1 (consecutive expert-parallel
    # groups, strided expert-data-parallel groups) is transformers' row-major `efsdp x ep` expert mesh.
    groups._create_expert_and_data_parallel(ep_size)
    group_name = f"ep_size_{ep_size}"
    expected = (get_process_group_ranks(ep_mesh.get_group()), get_process_group_ranks(edp_mesh.get_group()))
    actual = (
        list(groups._get_expert_parallel_group_ranks(group_name)),
        list(groups._get_expert_data_parallel_group_ranks(group_name)),
    )
    if expected != actual:
        raise RuntimeError(
            f"DeepSpeed's expert / expert-data-parallel groups {actual} differ from the model's `ep` / `efsdp` mesh "
            f"groups {expected}."
        )
    expert_data_parallel_group = groups._get_expert_data_parallel_group(group_name)
    _apply_default_group_timeout(
        [ep_mesh.get_group(), edp_mesh.get_group(), groups._get_expert_parallel_group(group_name),
         expert_data_parallel_group]
    )

    zero_stage = 3 if is_deepspeed_zero3_enabled() else registered_zero_stage()
    model._expert_parallel_zero_stage = zero_stage
    modules = dict(model.named_modules())
    for name, param in expert_params.items():
        module_name, _, param_name = name.rpartition(".")
        local = nn.Parameter(param.to_local(), requires_grad=param.requires_grad)
        local.allreduce = False
        local.group_name = group_name
        if zero_stage == 3:
            local.ds_zero_placement_family = "autoep_expert"
            local.ds_zero_partition_group_name = group_name
            # Not set by the engine, which only resolves placements for its own MoE modules.
            local.ds_zero_partition_process_group = expert_data_parallel_group
        modules[module_name]._parameters[param_name] = local
        # On the parameter itself, the one record of it: it stays when wrappers rename the parameter (PEFT's
        # `base_layer`), and `expert_parallel_layout` derives the map by name from it.
        local.expert_shard_layout = ExpertShardLayout(tuple(param.shape), 0, ep_mesh.get_local_rank(), ep_size)
    model._expert_parallel_handed_over = True
    experts_modules = [modules[name] for name in sorted({name.rpartition(".")[0] for name in expert_params})]
    for experts in experts_modules:
        experts.register_forward_pre_hook(_refuse_adapters_on_experts)
    if zero_stage == 3:
        model._deepspeed_placement_check = model.register_forward_pre_hook(_check_deepspeed_placement_once)
    elif _zero12_hand_over is None:
        raise NotImplementedError(
            f"Expert parallelism under DeepSpeed ZeRO stage {zero_stage} needs the stage-1/2 part of the hand-over, "
            "which no module registered (`register_zero12_hand_over`): use ZeRO stage 3."
        )
    else:
        _zero12_hand_over(model, experts_modules, group_name)


def check_deepspeed_placement(model):
    """
    After `deepspeed.initialize`: every expert parameter of `model` must be partitioned by ZeRO-3 over its
    expert-data-parallel group, in AutoEP's placement family (whose gradients DeepSpeed averages as experts), and every
    dense one over all ranks as a replicated parameter. That is what the hand-over's tags ask for; a DeepSpeed that
    ignored or renamed them would train silently wrong (expert gradients averaged with other experts'). Raised alike on
    every rank (each checks its own parameters, tagged alike), naming the parameters and what DeepSpeed did instead.
    """
    from torch.distributed import get_process_group_ranks, get_world_size

    expert_data_parallel_ranks = get_process_group_ranks(model._mesh_manager.get_mesh("efsdp").get_group())
    world = list(range(get_world_size()))
    misplaced = []
    for name, param in model.named_parameters():
        is_expert = getattr(param, "expert_shard_layout", None) is not None
        expected = (expert_data_parallel_ranks, "autoep_expert") if is_expert else (world, "replicated")
        group = getattr(param, "ds_process_group", None)
        actual = (
            None if group is None else get_process_group_ranks(group),
            getattr(param, "ds_zero_placement_family", "replicated"),
        )
        if actual != expected:
            misplaced.append(f"{name}: partitioned over ranks {actual[0]} as {actual[1]!r}, expected {expected}")
    if misplaced:
        raise RuntimeError(
            f"DeepSpeed {importlib.metadata.version('deepspeed')} did not place {len(misplaced)} parameter(s) of this "
            "expert-parallel model as they were tagged at load, so expert gradients would be reduced with the wrong "
            "ranks:\n  " + "\n  ".join(misplaced[:5]) + ("\n  ..." if len(misplaced) > 5 else "") + "\nUse a "
            f"DeepSpeed release the fork is tested with (deepspeed{TESTED_DEEPSPEED_VERSIONS}), and do not change the "
            "parameters' `ds_zero_*` / `allreduce` / `group_name` attributes before `deepspeed.initialize`."
        )


def _check_deepspeed_placement_once(model, args):
    """
    Forward pre-hook of a model handed over to DeepSpeed: at the first forward after `deepspeed.initialize` (whichever
    way it was called: directly, `Accelerator.prepare`, the `Trainer`), `check_deepspeed_placement`, then it removes
    itself. Forwards before the engine exists (no ZeRO-3 attributes yet) leave it in place.
    """
    if not all(hasattr(param, "ds_id") for param in model.parameters()):
        return
    model._deepspeed_placement_check.remove()
    check_deepspeed_placement(model)


def _refuse_adapters_on_experts(experts, args):
    """
    Forward pre-hook of the expert modules handed over to DeepSpeed. An adapter on their weights (PEFT LoRA with
    `target_parameters`, applied as a parametrization during the forward) would be built for this rank's experts only,
    and DeepSpeed would treat it as a dense parameter: averaged over every rank, mixing different experts' updates, and
    saved as one rank's. Raised on every rank alike, at the first forward, before any step.
    """
    if torch.nn.utils.parametrize.is_parametrized(experts):
        raise NotImplementedError(
            "Adapters on expert weights (e.g. PEFT LoRA with `target_parameters` on the experts) are not supported "
            "with expert parallelism under DeepSpeed ZeRO-3: each rank holds only its experts. Put the adapters on "
            "the attention or dense layers (`target_modules`, e.g. q_proj, v_proj), or load the model without "
            "expert parallelism (no `distributed_config`) to train adapters on the experts under ZeRO-3."
        )


def check_model_handed_over_to_deepspeed(model):
    """
    Refuse a model whose experts transformers sharded at load time but that was not handed over to DeepSpeed ZeRO-3:
    loaded with `DistributedConfig(ep_size > 1)` before the DeepSpeed config was registered (e.g. before the
    `Accelerator` or `TrainingArguments(deepspeed=...)` was created), so laid out for FSDP2 instead, which DeepSpeed
    cannot wrap. Called when a `Trainer` with DeepSpeed is built (it would build no DeepSpeed engine and fail at the
    first backward) and when a DeepSpeed engine is built on it (`deepspeed_refuses_models_not_handed_over`: it would
    fail in torch, "Couldn't swap FSDPEmbedding.weight"). Decided by what was recorded on the model at load
    (`is_expert_parallel_under_zero3(model)`), the same on every rank, so every rank raises, before any collective.
    """
    if getattr(model, "has_ep", False) and not is_expert_parallel_under_zero3(model):
        raise ValueError(
            "This model was loaded with expert parallelism (`DistributedConfig(ep_size > 1)`) while no DeepSpeed "
            "ZeRO-3 config was registered, so it was laid out for FSDP2 rather than handed over to DeepSpeed, which "
            "cannot take it now. Register the DeepSpeed config before `from_pretrained`: create the `Accelerator` "
            "(under `accelerate launch` with a ZeRO-3 config, or with a `DeepSpeedPlugin`), the "
            "`TrainingArguments(deepspeed=...)` or an `HfDeepSpeedConfig` first; or train without DeepSpeed."
        )


def _refuse_models_not_handed_over(engine_class):
    """
    Make `engine_class.__init__` (DeepSpeed's engine, built by `deepspeed.initialize`, which `Accelerator.prepare`
    calls) run `check_model_handed_over_to_deepspeed` on its model first, before it casts, moves or partitions it.
    Installed once; models that are not expert parallel, or were handed over, pass unchanged.
    """
    init = engine_class.__init__
    if getattr(init, "refuses_models_not_handed_over", False):
        return
    signature = inspect.signature(init)

    @functools.wraps(init)
    def init_refusing_models_not_handed_over(engine, *args, **kwargs):
        check_model_handed_over_to_deepspeed(signature.bind_partial(engine, *args, **kwargs).arguments.get("model"))
        init(engine, *args, **kwargs)

    init_refusing_models_not_handed_over.refuses_models_not_handed_over = True
    engine_class.__init__ = init_refusing_models_not_handed_over


def deepspeed_refuses_models_not_handed_over():
    """
    Called when a model is loaded with expert parallelism while no DeepSpeed ZeRO-3 config is registered (laid out for
    FSDP2, not handed over): should it later go to `deepspeed.initialize` (directly, or through `Accelerator.prepare`
    with the model alone or with its optimizer), the engine refuses it on every rank with
    `check_model_handed_over_to_deepspeed`'s message (`_refuse_models_not_handed_over`) instead of failing deep in
    torch. The `Trainer` refuses it earlier, when it is built. A no-op without DeepSpeed installed.
    """
    if not is_deepspeed_available():
        return
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except Exception as e:  # noqa: BLE001
        # Loaded without DeepSpeed: a DeepSpeed that cannot be imported must not fail the load, and builds no engine
        logger.debug(f"DeepSpeed could not be imported ({e}): its engine is left as it is.")
        return
    _refuse_models_not_handed_over(DeepSpeedEngine)


def _raise_on_every_rank_if_any_failed(error, action):
    """
    Share each rank's error (a collective, so every rank must call it): an error on one rank, e.g. rank 0 failing to
    write a file, is then raised on every rank, instead of leaving the others waiting in the next collective.
    """
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = {rank: message for rank, message in enumerate(errors) if message is not None}
    if failed:
        details = "\n".join(f"rank {rank}: {message}" for rank, message in failed.items())
        raise RuntimeError(f"{action} failed on rank(s) {sorted(failed)} (details in their output):\n{details}")


@contextlib.contextmanager
def errors_raised_on_every_rank(action, enabled=True):
    """
    Around a step that may fail on some ranks only (e.g. each rank reading its own experts of a broken checkpoint): an
    error on any rank is raised on every rank when the step ends (`_raise_on_every_rank_if_any_failed`). A no-op
    unless `enabled`.
    """
    error = None
    try:
        yield
    except Exception as e:
        if not enabled:
            raise
        error = e
    if enabled:
        _raise_on_every_rank_if_any_failed(error, action)


def _expert_parallel_layers(model) -> dict[str, "nn.Module"]:
    """
    The modules of an expert-parallel model whose forward runs its sharded experts: the experts modules (those holding
    the parameters laid out by `prepare_expert_parallel_model_for_deepspeed`) and every module above them (the sparse
    MoE block that routes the tokens to them, the decoder layer, ...), whose forward would take their work over.
    """
    if getattr(model, "_expert_parallel_handed_over", False):
        layout = expert_parallel_layout(model)
    else:
        layout = [name for name, _ in model.named_parameters() if _is_expert_parameter(name)]
    layers = set()
    for name in layout:
        module_name = name.rpartition(".")[0]
        while module_name:
            layers.add(module_name)
            module_name = module_name.rpartition(".")[0]
    modules = dict(model.named_modules())
    return {name: modules[name] for name in sorted(layers) if name in modules}


def _unless_expert_parallel(layers, condition, module):
    # The `kernel_condition` of a kernel layer class while `kernelize` runs on an expert-parallel model
    return id(module) not in layers and (condition is None or condition(module))


@contextlib.contextmanager
def expert_parallel_layers_left_alone_by_kernelize(model):
    """
    Around `kernels.kernelize` (hub kernels, on by default since transformers 5.25, at load and at every `train()` /
    `eval()`): the layers of a model with expert parallelism under DeepSpeed ZeRO-3 that run its experts
    (`_expert_parallel_layers`) keep their forward. An expert kernel is written for all the experts of a layer on one
    device and does its own routing, while here each rank holds only its experts, the tokens are dispatched to them
    across the expert-parallel group by the forward that expert parallelism installed on the experts module, and
    ZeRO-3 partitions their parameters within the expert-data-parallel group. A kernel's forward (or the original one,
    which `kernelize` restores when no kernel fits) would replace that forward and compute silently with the wrong
    experts. Other layers (norms, attention, ...) are kernelized as usual. A no-op for other models.
    """
    if not is_expert_parallel_under_zero3(model):
        yield
        return
    layers = {
        name: module
        for name, module in _expert_parallel_layers(model).items()
        if hasattr(type(module), "kernel_layer_name") or "_kernel_funcs" in module.__dict__
    }
    if not layers:
        yield
        return
    kernel_layers = sorted(
        {f"{type(m).__name__} ({getattr(type(m), 'kernel_layer_name', 'kernel functions')})" for m in layers.values()}
    )
    logger.warning_once(
        f"Expert parallelism under DeepSpeed ZeRO-3: kernelize leaves {len(layers)} layers that run the sharded "
        f"experts with their own forward: {', '.join(kernel_layers)}. A hub kernel for them would compute all the "
        "experts on one device with its own routing, while each rank holds only its experts and the tokens are "
        "dispatched to them across the expert-parallel group. Other layers are kernelized as usual."
    )
    ids = {id(module) for module in layers.values()}
    classes = {type(module) for module in layers.values() if hasattr(type(module), "kernel_layer_name")}
    conditions = {cls: cls.__dict__.get("kernel_condition") for cls in classes}
    kernel_funcs = {name: module.__dict__.pop("_kernel_funcs") for name, module in layers.items()
                    if "_kernel_funcs" in module.__dict__}
    try:
        for cls in classes:
            condition = getattr(cls, "kernel_condition", None)
            cls.kernel_condition = staticmethod(functools.partial(_unless_expert_parallel, ids, condition))
        yield
    finally:
        for cls, condition in conditions.items():
            if condition is None:
                del cls.kernel_condition
            else:
                cls.kernel_condition = condition
        for name, funcs in kernel_funcs.items():
            layers[name].__dict__["_kernel_funcs"] = funcs


def _is_expert_parameter(name: str) -> bool:
    # The fused expert parameters of the MoE families (`mlp.experts.gate_up_proj`, `...experts.down_proj`, ...)
    return ".experts." in f".{name}"


def converts_by_rows(converter) -> bool:
    """
    Whether row i of the converter's output (its dim 0: the expert) is made of the i-th checkpoint tensor of each
    source pattern alone: the experts stacked along dim 0 (`MergeModulelist(dim=0)`), then at most concatenated along
    another dim (gate and up into `gate_up_proj`). A ZeRO-3 partition spans a range of rows, so the shard-on-read load
    converts only the experts of that range.
    """
    from ..core_model_loading import Concatenate, MergeModulelist

    first, *rest = converter.operations or [None]
    return (
        isinstance(first, MergeModulelist) and first.dim == 0
        and all(isinstance(op, Concatenate) and op.dim != 0 for op in rest)
    )


class ExpertLoadConversion(NamedTuple):
    """How the loader makes one expert parameter from per-expert checkpoint tensors (`expert_load_conversions`)."""

    # Tensors of the converted size held at once: the stacks of the experts (`MergeModulelist`) live until their
    # concatenation (`Concatenate`) is made, so 2 for a fused `gate_up_proj` and 1 for a stacked `down_proj`; one
    # more when an operation does more than move elements (every source is then read in full)
    copies: int
    # Converted only for the experts a rank's ZeRO-3 partition spans (`converts_by_rows`), else in full
    by_rows: bool


def expert_load_conversions(model) -> dict[str, ExpertLoadConversion]:
    """
    The conversion of each expert parameter that the model's weight converters make from per-expert checkpoint
    tensors. A parameter loaded as it is stored (checkpoints in the model's layout, e.g. gpt-oss) is absent. `model`
    may be on the meta device.
    """
    from ..conversion_mapping import get_model_conversion_mapping
    from ..core_model_loading import Chunk, Concatenate, MergeModulelist, Split, Transpose, WeightConverter

    converters = [c for c in get_model_conversion_mapping(model) or [] if isinstance(c, WeightConverter)]
    makes_a_tensor = (MergeModulelist, Concatenate)
    moves_elements = (*makes_a_tensor, Chunk, Split, Transpose)
    conversions = {}
    for name, _ in model.named_parameters():
        if not _is_expert_parameter(name):
            continue
        for converter in converters:
            if any(re.search(pattern, name) for pattern in converter.target_patterns):
                operations = converter.operations
                copies = sum(isinstance(op, makes_a_tensor) for op in operations)
                copies += 0 if all(isinstance(op, moves_elements) for op in operations) else 1
                conversions[name] = ExpertLoadConversion(copies, converts_by_rows(converter))
                break
    return conversions


def rows_of_largest_partition(rows: int, numel: int, world_size: int) -> int:
    """The most rows (dim 0) of a `rows` x (numel / rows) tensor that one of `world_size` ZeRO-3 partitions spans
    (a partition is `ceil(numel / world_size)` consecutive elements, so it may start or end inside a row)."""
    row, size = numel // rows, -(-numel // world_size)
    spans = [
        (min(start + size, numel) - 1) // row - start // row + 1
        for start in range(0, numel, size)
    ]
    return max(spans, default=0)


def conversion_working_numel(conversion: ExpertLoadConversion, rows: int, numel: int, world_size: int) -> int:
    """
    Elements one rank's shard-on-read conversion of a `rows` x (numel / rows) expert parameter holds at its peak: its
    copies x the rows it converts (those the rank's partition spans when it `converts_by_rows`, else all) x a row.
    """
    converted_rows = rows_of_largest_partition(rows, numel, world_size) if conversion.by_rows else rows
    return conversion.copies * converted_rows * (numel // rows)


def zero3_load_peak_bytes(model, world_size: int, ep_size: int = 1) -> dict[str, int]:
    """
    The host memory one rank's `from_pretrained` under DeepSpeed ZeRO-3 adds at its peak, as the load path keeps it
    (docs/ep_deepspeed.md, "Memory at load"): the rank's share of the weights plus the working set of one conversion
    group. `model` may be on the meta device (nothing is read); sizes are in the parameters' dtype, the checkpoint's
    dtype being the same (a cast is not bounded this way).

    - With expert parallelism (`ep_size > 1`): share = every dense weight + the rank's 1/ep_size of each expert
      parameter; working set = the largest local expert parameter (the fused `gate_up_proj` of one layer: its gate and
      up stacks exist until they are concatenated into it). The dense weights stay mapped from the checkpoint (page
      cache, reclaimable) until `deepspeed.initialize` partitions them, so only the experts are anonymous memory: the
      peak of anonymous memory is at most `share + working_set`.
    - Without it (shard-on-read): share = the ZeRO-3 partitions, ceil(numel / world_size) elements of each parameter;
      working set = the largest conversion (`expert_load_conversions`): its copies x the experts it converts (those
      the rank's partition spans, `rows_of_largest_partition`, when it `converts_by_rows`, else all) x an expert's
      size. For a fused `gate_up_proj`: the gate and up stacks and their concatenation, 2 x the rank's experts of it,
      out of which the partition is copied. 0 when no parameter is converted.

    Returns `{"share": ..., "working_set": ..., "peak": share + working_set}` in bytes.
    """
    conversions = expert_load_conversions(model) if ep_size == 1 else {}
    share, working_set = 0, 0
    for name, param in model.named_parameters():
        numel, itemsize = param.numel(), param.element_size()
        if ep_size > 1 and _is_expert_parameter(name):
            share += numel // ep_size * itemsize
            working_set = max(working_set, numel // ep_size * itemsize)
        elif ep_size > 1:
            share += numel * itemsize
        else:
            share += -(-numel // world_size) * itemsize
            if name in conversions:
                converted = conversion_working_numel(conversions[name], param.shape[0], numel, world_size)
                working_set = max(working_set, converted * itemsize)
    return {"share": share, "working_set": working_set, "peak": share + working_set}
