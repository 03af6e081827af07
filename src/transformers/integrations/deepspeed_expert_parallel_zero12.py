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
Expert parallelism under DeepSpeed ZeRO stages 1 and 2.

At stages 1 and 2 DeepSpeed keeps every parameter whole on every rank and partitions the optimizer state (and, at stage
2, the gradients) over the data-parallel ranks. It treats a parameter as an expert's (partitioned and reduced over the
ranks that hold the same experts, broadcast only among them) only inside its own MoE layers: `deepspeed.initialize`
sets `engine.has_moe_layers` for instances of `deepspeed.moe.layer.MoE` alone, and only then hands the expert groups to
its ZeRO-1/2 optimizer, whose MoE parameter groups (`moe: True`) it partitions over the expert-data-parallel group. The
hand-over (`prepare_expert_parallel_model_for_deepspeed`) makes transformers' experts modules such layers:

- `mark_experts_as_deepspeed_moe`: the experts module also derives from `MoE` and has the attributes DeepSpeed's engine
  and checkpoints read (`expert_group_name`, `num_local_experts`); its forward and everything else stay its own.
- `_split_client_optimizers_for_experts`: `deepspeed.initialize` (directly, through `Accelerator.prepare` or the
  `Trainer`) splits the parameter groups of a client optimizer into dense and MoE groups, as DeepSpeed does itself only
  for the optimizers it builds from its config; and it links the optimizer state of every group to the parameters
  (`link_optimizer_state_of_every_group`), which DeepSpeed does only for the first group to step.
- DeepSpeed checkpoints (`engine.save_checkpoint`, `accelerator.save_state`, the Trainer's): DeepSpeed's MoE format,
  one file per expert (`layer_<L>_expert_<E>_mp_rank_00_model_states.pt`, the expert's global index), written by the
  first rank of each expert-data-parallel group. DeepSpeed expects one module per expert; transformers' experts
  modules hold them stacked (`gate_up_proj[E/P, ...]`): while DeepSpeed saves, their state dict shows expert `j` as
  `deepspeed_moe.experts.deepspeed_experts.<j>.gate_up_proj` (`experts_presented_one_by_one`), and at load the
  experts DeepSpeed reads back are stacked again (`_stack_experts_back`). A checkpoint of another topology or stage
  (`topology_problem`) is loaded as whole tensors (`load_whole_tensors`): ZeRO-3 checkpoints, and stage-1/2 ones of
  expert-parallel models (`SavedZero12Checkpoint`); the ZeRO-3 resharder reads the latter too.
- `engine.save_16bit_model` writes every expert (`_gather_experts_in_16bit_saves`), and so do accelerate's
  `get_state_dict` and `save_model` (`_gather_experts_in_accelerates_state_dict`), as under ZeRO-3.
"""

import contextlib
import functools
import inspect
import os
import weakref
from functools import wraps

from ..utils import is_torch_available, logging
from .deepspeed_expert_parallel import register_zero12_hand_over


if is_torch_available():
    import torch


logger = logging.get_logger(__name__)

# The module-relative prefix of expert `j`'s parameters in DeepSpeed's MoE checkpoints (its `MoE` layer's layout)
DEEPSPEED_EXPERTS_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
# The expert-parallel models handed over for stage 1 or 2 (`hand_over_for_zero_stage_1_or_2`)
_HANDED_OVER_MODELS = weakref.WeakSet()


def expert_parallel_zero_stage(module) -> int | None:
    """The ZeRO stage the expert-parallel models in `module` were handed over to DeepSpeed for, None when it holds
    none (a `Trainer`'s or accelerate's wrapper, a PEFT model: the model itself is one of its modules)."""
    stages = {vars(m).get("_expert_parallel_zero_stage") for m in module.modules()} - {None}
    return max(stages) if stages else None


def _expert_parameter_names(experts) -> list[str]:
    # The parameters the hand-over laid out (`expert_shard_layout`), E/P experts stacked on dim 0: the experts' own, and
    # those of modules inside the experts module (Ergo's per-expert norm)
    return [name for name, param in experts.named_parameters() if hasattr(param, "expert_shard_layout")]


@functools.cache
def _deepspeed_moe_class(cls):
    """
    `cls` also deriving from DeepSpeed's `MoE`, after `cls` in the MRO: `cls`'s forward and every method of it win,
    `MoE.__init__` never runs. Its `set_deepspeed_parallelism` (which `deepspeed.initialize` calls on every module that
    has it) does nothing: the hand-over created DeepSpeed's expert groups and checked them against the model's mesh.
    """
    from deepspeed.moe.layer import MoE

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False, **kwargs):
        pass

    attributes = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_marked_as_deepspeed_moe": True}
    return type(cls.__name__, (cls, MoE), {**attributes, "set_deepspeed_parallelism": set_deepspeed_parallelism})


def mark_experts_as_deepspeed_moe(experts, group_name: str):
    """
    Make DeepSpeed's engine take `experts` (an experts module whose parameters the hand-over laid out) for one of its
    MoE layers, with `group_name`'s expert groups (`ep_size_<P>`). Refused for a module that holds anything else
    (parameters, buffers, submodules): DeepSpeed's checkpoints would leave it out of every file.
    """
    names = _expert_parameter_names(experts)
    others = [name for name, _ in experts.named_parameters() if name not in names]
    others += [name for name, _ in experts.named_buffers()]
    if others or not names:
        raise NotImplementedError(
            f"Expert parallelism under DeepSpeed ZeRO stage 1 or 2 needs experts modules that hold only the stacked "
            f"experts; {type(experts).__name__} also holds {others or 'no expert parameters'}."
        )
    num_local_experts = experts.get_parameter(names[0]).shape[0]
    experts.__class__ = _deepspeed_moe_class(type(experts))
    experts.expert_group_name = group_name
    experts.num_local_experts = num_local_experts
    if not hasattr(experts, "num_experts"):  # read by `deepspeed.initialize` (it only lands in checkpoints)
        experts.num_experts = num_local_experts
    experts.register_state_dict_post_hook(_present_experts_one_by_one)
    experts.register_load_state_dict_pre_hook(_stack_experts_back)


def _is_marked(module) -> bool:
    return type(module).__dict__.get("_marked_as_deepspeed_moe", False)


def _present_experts_one_by_one(module, state_dict, prefix, local_metadata):
    # While DeepSpeed saves (`experts_presented_one_by_one`): expert j of the stacked tensor under DeepSpeed's key
    if not vars(module).get("_presenting_experts_one_by_one", False):
        return
    for name in _expert_parameter_names(module):
        stacked = state_dict.pop(prefix + name, None)
        if stacked is None:
            continue
        for j, expert in enumerate(stacked.unbind(0)):
            state_dict[f"{prefix}{DEEPSPEED_EXPERTS_PREFIX}{j}.{name}"] = expert


def _stack_experts_back(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # What DeepSpeed's MoE checkpoint loader puts in the state dict, one key per local expert, stacked as the module
    # holds them (before the modules inside it load theirs); a state dict missing some expert is left as it is (a
    # strict load names the missing keys).
    for name in _expert_parameter_names(module):
        keys = [f"{prefix}{DEEPSPEED_EXPERTS_PREFIX}{j}.{name}" for j in range(module.num_local_experts)]
        if all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


@contextlib.contextmanager
def experts_presented_one_by_one(module):
    """While in this context, the state dict of every marked experts module in `module` shows its experts one by one,
    under the keys of DeepSpeed's MoE layer."""
    marked = [m for m in module.modules() if _is_marked(m)]
    for experts in marked:
        experts._presenting_experts_one_by_one = True
    try:
        yield
    finally:
        for experts in marked:
            experts._presenting_experts_one_by_one = False


def _save_experts_in_deepspeed_moe_checkpoints(engine_class):
    """
    Make `engine_class.save_checkpoint` (behind `accelerator.save_state` and the Trainer's checkpoints) present the
    experts of stage-1/2 expert-parallel models one by one while it saves (`experts_presented_one_by_one`). Other
    models and stage 3 are saved as before. Done once.
    """
    save = engine_class.save_checkpoint
    if getattr(save, "presents_experts_one_by_one", False):
        return

    @wraps(save)
    def save_checkpoint(engine, *args, **kwargs):
        if expert_parallel_zero_stage(engine.module) not in (1, 2):
            return save(engine, *args, **kwargs)
        with experts_presented_one_by_one(engine.module):
            return save(engine, *args, **kwargs)

    save_checkpoint.presents_experts_one_by_one = True
    engine_class.save_checkpoint = save_checkpoint


def _gather_experts_in_16bit_saves(engine_class):
    """
    Make `engine_class.save_16bit_model` (behind accelerate's and users' 16-bit saves) write every expert of a
    stage-1/2 expert-parallel model: at stages 1 and 2 it writes rank 0's `engine.module_state_dict()`, which holds
    rank 0's experts only. While it runs, `module_state_dict` gathers the experts across the expert-parallel group
    onto rank 0 (`gather_expert_parallel_state_dict_under_zero3`, which at stages 1 and 2 only gathers the experts);
    `save_16bit_model` is a collective (every rank calls it), `module_state_dict` alone is not (DeepSpeed's
    checkpoints call it on one rank), hence the two wraps. Other models and stage 3 are saved as before. Done once.
    """
    save = engine_class.save_16bit_model
    if getattr(save, "gathers_experts_at_zero12", False):
        return
    module_state_dict = engine_class.module_state_dict

    @wraps(save)
    def save_16bit_model(engine, *args, **kwargs):
        if expert_parallel_zero_stage(engine.module) not in (1, 2):
            return save(engine, *args, **kwargs)
        from .deepspeed_expert_parallel_save import _expert_parallel_models_in

        engine._gathering_experts_for_a_16bit_save = True
        try:
            return save(engine, *args, **kwargs)
        finally:
            engine._gathering_experts_for_a_16bit_save = False
            for model in _expert_parallel_models_in(engine.module):
                # The gather's record for a `save_pretrained(state_dict=...)` that follows: none follows here
                model._whole_state_dict_sent_to_rank_0 = False

    @wraps(module_state_dict)
    def module_state_dict_with_every_expert(engine, *args, exclude_frozen_parameters=False, **kwargs):
        if not vars(engine).get("_gathering_experts_for_a_16bit_save", False):
            return module_state_dict(engine, *args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        from .deepspeed_expert_parallel_save import gather_expert_parallel_state_dict_under_zero3

        return gather_expert_parallel_state_dict_under_zero3(engine.module, exclude_frozen_parameters)

    save_16bit_model.gathers_experts_at_zero12 = True
    engine_class.save_16bit_model = save_16bit_model
    engine_class.module_state_dict = module_state_dict_with_every_expert


def _model_whose_state_dict(item):
    """
    The stage-1/2 expert-parallel model `item` is the whole `state_dict()` of, and the prefix of its keys there (a
    wrapper's state dict, e.g. PEFT's, prefixes them), or `(None, None)`. Told by the storage of the expert
    parameters, which a state dict shares with the model, and by every parameter of the model being there: DeepSpeed's
    own checkpoint code clones other dicts through the same function (its frozen parameters, a rank's own state), which
    must not start a gather on one rank. Never while DeepSpeed saves a checkpoint of the model.
    """
    if not isinstance(item, dict):
        return None, None
    by_storage = {
        value.data_ptr(): key for key, value in item.items() if torch.is_tensor(value) and value.numel() > 0
    }
    for model in list(_HANDED_OVER_MODELS):
        params = dict(model.named_parameters())
        experts = {name: param for name, param in params.items() if hasattr(param, "expert_shard_layout")}
        first_name, first = next(iter(experts.items()))
        key = by_storage.get(first.data_ptr())
        if key is None or not key.endswith(first_name):
            continue  # the common case, e.g. each nested dict of DeepSpeed's own checkpoint state
        if any(vars(m).get("_presenting_experts_one_by_one", False) for m in model.modules()):
            continue
        prefix = key[: len(key) - len(first_name)]
        every_parameter = all(prefix + name in item for name in params)
        every_expert_shared = all(by_storage.get(p.data_ptr()) == prefix + name for name, p in experts.items())
        if every_parameter and every_expert_shared:
            return model, prefix
    return None, None


def _gather_experts_in_accelerates_state_dict():
    """
    accelerate's `get_state_dict` (behind `accelerator.save_model` and its documented
    `save_pretrained(dir, state_dict=accelerator.get_state_dict(model))`) returns at ZeRO stages 1 and 2
    `clone_tensors_for_torch_save(model.state_dict())`: one rank's experts only. It imports DeepSpeed's
    `clone_tensors_for_torch_save` when it runs (DeepSpeed's own modules bound it at import), so the fork wraps that
    function: given the state dict of a stage-1/2 expert-parallel model, it gathers every expert onto rank 0
    (`gather_expert_parallel_state_dict_under_zero3`, a collective: accelerate's `get_state_dict` runs on every rank,
    as it must under ZeRO-3) and returns it there, None on the other ranks (which accelerate's `save_model` and the
    fork's `save_pretrained` expect, as under ZeRO-3). Anything else is cloned as DeepSpeed does. Done once.
    """
    import deepspeed.checkpoint.utils as checkpoint_utils

    clone = checkpoint_utils.clone_tensors_for_torch_save
    if getattr(clone, "gathers_expert_parallel_models", False):
        return

    @wraps(clone)
    def clone_tensors_for_torch_save(item, *args, **kwargs):
        from .deepspeed_expert_parallel_save import gather_expert_parallel_state_dict_under_zero3

        model, prefix = _model_whose_state_dict(item)
        if model is None:
            return clone(item, *args, **kwargs)
        gathered = gather_expert_parallel_state_dict_under_zero3(model)
        if gathered is None:
            return None
        return {prefix + key: value for key, value in gathered.items()}

    clone_tensors_for_torch_save.gathers_expert_parallel_models = True
    checkpoint_utils.clone_tensors_for_torch_save = clone_tensors_for_torch_save


def topology_problem(engine, checkpoint_dir: str) -> str | None:
    """
    Why a stage-1/2 expert-parallel engine cannot resume from the DeepSpeed checkpoint in `checkpoint_dir` with
    DeepSpeed's own loader, None when it can: one written under ZeRO-3, or on another number of ranks or EP size
    (DeepSpeed's loader checks neither the EP size nor the stage, and would load the optimizer's flat partitions of
    another layout). The saved `mp_rank_00_model_states.pt` (stage 1/2) holds the data-parallel world size and the
    shapes of rank 0's parameters in each optimizer group, which every rank compares with its own (the experts' shapes
    are E/P on every rank). A collective: the ranks agree on the answer; a rank that cannot read the file raises on
    every rank.
    """
    import torch.distributed as dist

    from .deepspeed_expert_parallel import errors_raised_on_every_rank

    problem = None
    with errors_raised_on_every_rank("Reading the checkpoint's topology"):
        model_states = os.path.join(checkpoint_dir, "mp_rank_00_model_states.pt")
        if not os.path.isfile(model_states):
            problem = "it was not written under ZeRO stage 1 or 2 (no mp_rank_00_model_states.pt)"
        else:
            saved = torch.load(model_states, map_location="cpu", weights_only=False, mmap=True)
            saved_stage = (saved.get("ds_config") or {}).get("zero_optimization", {}).get("stage")
            shapes = [list(group.items()) for group in saved.get("param_shapes") or []]
            if saved_stage not in (1, 2, None):
                problem = f"it was written under ZeRO stage {saved_stage}"
            elif saved.get("dp_world_size") != dist.get_world_size():
                problem = f"it was written on {saved.get('dp_world_size')} ranks, not {dist.get_world_size()}"
            elif shapes != [list(group.items()) for group in engine._get_zero_param_shapes()]:
                problem = "its parameters have other shapes or groups (another EP size, model or optimizer)"
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


def other_topology_error(engine, checkpoint_dir: str, problem: str) -> NotImplementedError:
    return NotImplementedError(
        f"Cannot resume the expert-parallel model under ZeRO stage {expert_parallel_zero_stage(engine.module)} from "
        f"{checkpoint_dir}: {problem}, and it is neither a ZeRO-3 checkpoint nor one of ZeRO stage 1 or 2 of an "
        "expert-parallel model, which resume on any topology. Save the model with `save_pretrained` and load it here "
        "(the optimizer state starts anew)."
    )


def load_whole_tensors(engine, saved, load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True):
    """
    Load a checkpoint read as whole tensors (`saved`: `SavedZero3Checkpoint` or `SavedZero12Checkpoint`, any number of
    ranks and EP size) into a stage-1/2 engine of an expert-parallel model: each trained parameter (this rank's experts
    of an expert tensor, a dense one whole) from the checkpoint's fp32 master weights, into the model and the fp32
    master partition this rank holds; with `load_optimizer_states`, Adam's moments, its step count and
    hyperparameters; the engine's counters and with `load_lr_scheduler_states` DeepSpeed's scheduler. Through
    DeepSpeed's public `safe_set_full_*` setters, which at stages 1 and 2 write this rank's fragment of the value.
    Every rank must call it.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from .deepspeed_expert_parallel_reshard import (
        MOMENT_KEYS,
        _check_same_parameters,
        _load_engine_counters,
        _trained_parameters,
        _whole_for_this_rank,
        create_adam_states,
        load_optimizer_step_and_hyperparameters,
    )

    zero_optimizer = engine.optimizer
    flat_partitions = zero_optimizer.single_partition_of_fp32_groups
    if load_optimizer_states:
        create_adam_states(zero_optimizer.optimizer, flat_partitions)
        link_optimizer_state_of_every_group(zero_optimizer)
    params = _trained_parameters(engine)
    _check_same_parameters(saved, params)
    with torch.no_grad():
        for name, param in params.items():
            weight = _whole_for_this_rank(saved, name, param, "fp32")
            param.data.copy_(weight.view_as(param))
            # The fp32 master too, or the next step would write the master the engine started from back into the model
            safe_set_full_fp32_param(param, weight)
            if load_optimizer_states:
                for key in MOMENT_KEYS:
                    safe_set_full_optimizer_state(param, _whole_for_this_rank(saved, name, param, key), key)
    if load_optimizer_states:
        load_optimizer_step_and_hyperparameters(zero_optimizer.optimizer, flat_partitions, saved)
    _load_engine_counters(engine, saved, load_lr_scheduler_states)


def split_optimizer_param_groups_for_experts(optimizer):
    """
    Split, in place and before any step, the parameter groups of a torch optimizer built over an expert-parallel model
    into dense groups and DeepSpeed MoE groups (`moe: True`, `name: ep_size_<P>`), as DeepSpeed's ZeRO-1/2 optimizer
    requires of MoE models (DeepSpeed's `split_params_into_different_moe_groups_for_optimizer`). Each MoE group keeps
    the settings (learning rate, weight decay, ...) of the group it came from; groups get unique names first, since
    DeepSpeed merges the expert parameters of groups of the same name. A no-op when some group is a MoE group already.
    Returns the optimizer.
    """
    from deepspeed.moe.utils import is_moe_param_group, split_params_into_different_moe_groups_for_optimizer

    if any(is_moe_param_group(group) for group in optimizer.param_groups):
        return optimizer
    if optimizer.state:
        raise ValueError(
            "The optimizer of an expert-parallel model under DeepSpeed ZeRO stage 1 or 2 has already stepped: its "
            "parameter groups must be split for the experts before its first step. Create it right before "
            "`deepspeed.initialize` / `accelerator.prepare`."
        )
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        raise ValueError(
            "An LR scheduler was created for the optimizer of an expert-parallel model before `deepspeed.initialize` "
            "/ `accelerator.prepare`: under DeepSpeed ZeRO stage 1 or 2 its parameter groups are split for the experts "
            "there, and the scheduler would keep one learning rate per group of the old split. Create the scheduler "
            "after `prepare` (as the Trainer does), or pass a DeepSpeed `scheduler` in its config."
        )
    seen = set()
    named = []
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name", f"group_{i}")
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        named.append({**group, "name": name})
    split = split_params_into_different_moe_groups_for_optimizer(named)
    optimizer.param_groups[:] = [group for group in split if group["params"]]
    return optimizer


def link_optimizer_state_of_every_group(zero_optimizer):
    """
    Make DeepSpeed's ZeRO-1/2 optimizer link the optimizer state (Adam's moments) of every parameter group to its
    parameters, which `safe_get_full_optimizer_state` / `safe_set_full_optimizer_state` read. DeepSpeed links every
    group once, right after the first group's first step, when the later groups (the experts' MoE groups come after the
    dense ones) have no state yet, and never again: their moments then cannot be read, and with several ranks per
    expert-data-parallel group a read hangs (the ranks holding no fragment skip the lookup that raises on the others).
    Links now when every group has state (after a checkpoint load), else once the last group has stepped (a step
    post-hook on the torch optimizer it wraps; public torch API, DeepSpeed's CPU Adam included).
    """
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    basic = zero_optimizer.optimizer
    flat_groups = zero_optimizer.single_partition_of_fp32_groups

    def link_if_every_group_has_state():
        # `.get`: the state is a defaultdict, and DeepSpeed's own linking leaves empty entries for the groups it found
        # without state
        if not all(basic.state.get(flat) for flat in flat_groups):
            return False
        for lp_params, flat in zip(zero_optimizer.bit16_groups, flat_groups):
            lazy_init_hp_params_optimizer_state(lp_params, flat, basic.state)
        return True

    if link_if_every_group_has_state():
        return
    handle = None

    def link_after_step(optimizer, args, kwargs):
        if link_if_every_group_has_state():
            handle.remove()

    handle = basic.register_step_post_hook(link_after_step)


def _has_trainable_experts(module) -> bool:
    return any(getattr(p, "allreduce", True) is False and p.requires_grad for p in module.parameters())


def _split_client_optimizers_for_experts(engine_class):
    """
    Wrap `engine_class._configure_optimizer` (private DeepSpeed API, the one step of `deepspeed.initialize` that every
    entry point passes through with the optimizer as given: an instance, a callable, accelerate's CPU Adam mapping, or
    none) so that for an engine of a stage-1/2 expert-parallel model:
    - a client optimizer (instance, or what a callable builds) has its groups split for the experts
      (`split_optimizer_param_groups_for_experts`); DeepSpeed splits the optimizers it builds from its config itself;
    - with no trainable expert (frozen experts, e.g. adapters on the dense layers) the ZeRO optimizer is built as for a
      dense model: DeepSpeed would require a MoE group and find none. The engine stays a MoE engine for checkpoints;
    - the optimizer state of every group is linked once it exists (`link_optimizer_state_of_every_group`).
    Other engines are left alone. Done once; the signature is checked first (it is private).
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    configure = engine_class._configure_optimizer
    if getattr(configure, "splits_expert_parameter_groups", False):
        return
    if list(inspect.signature(configure).parameters) != ["self", "client_optimizer", "model_parameters"]:
        raise NotImplementedError(
            "Expert parallelism under DeepSpeed ZeRO stage 1 or 2 needs DeepSpeed's "
            "`DeepSpeedEngine._configure_optimizer(self, client_optimizer, model_parameters)`, which this DeepSpeed "
            "release does not have: use ZeRO stage 3, or a DeepSpeed release this fork is tested with."
        )

    @wraps(configure)
    def configure_optimizer(engine, client_optimizer, model_parameters):
        if expert_parallel_zero_stage(engine.module) not in (1, 2) or not engine.has_moe_layers:
            return configure(engine, client_optimizer, model_parameters)
        if isinstance(client_optimizer, torch.optim.Optimizer):
            split_optimizer_param_groups_for_experts(client_optimizer)
        elif callable(client_optimizer):
            build = client_optimizer

            def client_optimizer(params):
                return split_optimizer_param_groups_for_experts(build(params))

        trainable_experts = _has_trainable_experts(engine.module)
        engine.has_moe_layers = trainable_experts
        try:
            result = configure(engine, client_optimizer, model_parameters)
        finally:
            engine.has_moe_layers = True
        if isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
            link_optimizer_state_of_every_group(engine.optimizer)
        return result

    configure_optimizer.splits_expert_parameter_groups = True
    engine_class._configure_optimizer = configure_optimizer


def hand_over_for_zero_stage_1_or_2(model, experts_modules, group_name: str):
    """
    The stage-1/2 part of the hand-over (`prepare_expert_parallel_model_for_deepspeed`): each experts module of `model`
    marked as a DeepSpeed MoE layer of `group_name`, and `deepspeed.initialize`, DeepSpeed's saves and accelerate's
    `get_state_dict` made to treat such models as described in this module's docstring (installed once). Registered
    with the hand-over when this module is imported (the fork's modeling code imports it with the resharding module).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    _split_client_optimizers_for_experts(DeepSpeedEngine)
    _save_experts_in_deepspeed_moe_checkpoints(DeepSpeedEngine)
    _gather_experts_in_16bit_saves(DeepSpeedEngine)
    _gather_experts_in_accelerates_state_dict()
    for experts in experts_modules:
        mark_experts_as_deepspeed_moe(experts, group_name)
    _HANDED_OVER_MODELS.add(model)


register_zero12_hand_over(hand_over_for_zero_stage_1_or_2)
