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
The weights of a DeepSpeed ZeRO-3 checkpoint of an expert-parallel model, offline: in one process, without GPUs and
without the topology it was trained on.

DeepSpeed's way (`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`, which the `zero_to_fp32.py`
copied into each checkpoint folder runs) assumes every ZeRO-3 parameter was partitioned over all ranks. The experts of
an expert-parallel model were partitioned over their expert-data-parallel group instead, each EP rank holding other
experts under the same parameter name: DeepSpeed's reader runs out of elements ("consumed N numels out of M").
The reader that resumes such checkpoints on another topology (`deepspeed_expert_parallel_reshard.SavedZero3Checkpoint`)
already rebuilds each whole parameter from the partition groups the checkpoint records; here its whole fp32 master
weights become a state dict. A checkpoint without expert parallelism goes to DeepSpeed's own function, so that its
output stays DeepSpeed's.
"""

import os

from ..utils import is_torch_available, logging
from .deepspeed_expert_parallel_reshard import SavedZero3Checkpoint, _checkpoint_files, resolve_checkpoint_dir


if is_torch_available():
    import torch


logger = logging.get_logger(__name__)


def _frozen_partition_size(numel: int, fragment_numel: int, world_size: int) -> int | None:
    """
    Over how many ranks a frozen ZeRO-3 parameter of `numel` elements was partitioned, told from one rank's partition
    (`fragment_numel`, `ceil(numel / ranks)` with padding): all ranks for a dense weight, the W/P ranks of an
    expert-data-parallel group for an expert. None when several group sizes give that partition (a tensor with fewer
    elements than ranks): the checkpoint does not say which.
    """
    sizes = [size for size in range(1, world_size + 1)
             if world_size % size == 0 and -(-numel // size) == fragment_numel]
    return sizes[0] if len(sizes) == 1 else None


def _frozen_shapes(model_state: dict) -> dict:
    """The frozen parameters' shapes on the rank, by name; none when the checkpoint was saved without them."""
    if model_state.get("frozen_param_fragments") is None:
        return {}
    return model_state.get("frozen_param_shapes") or {}


def _frozen_expert_parallel_sizes(model_states: dict) -> set:
    """
    The expert-parallel sizes the frozen parameters were partitioned with (1: over all ranks). DeepSpeed saves each
    frozen parameter as every rank's bare partition (`frozen_param_fragments`) with the shape it had on the rank
    (`frozen_param_shapes`), without the ranks it was cut over: the partition's size tells them (an expert's are its
    expert-data-parallel group). Tensors too small to tell and empty ones are left out.
    """
    world_size = len(model_states)
    sizes = set()
    for name, shape in _frozen_shapes(model_states[0]).items():
        fragment = model_states[0]["frozen_param_fragments"][name]
        group_size = _frozen_partition_size(shape.numel(), fragment.numel(), world_size) if shape.numel() else None
        if group_size is not None:
            sizes.add(world_size // group_size)
    return sizes


def is_expert_parallel_checkpoint(checkpoint_dir: str) -> bool:
    """
    Whether the ZeRO-3 checkpoint in `checkpoint_dir` (one tag's folder) holds parameters partitioned over
    expert-data-parallel groups (the experts of an expert-parallel model), which DeepSpeed's `zero_to_fp32` cannot
    read: it stops on trained ones and returns one rank's slice of frozen ones. For trained experts DeepSpeed records
    the ranks of their sub-groups (`ds_zero_partition_groups`) in each rank's optimizer states, and nothing for a
    model without them (every rank of an expert-parallel model holds experts, so rank 0's file answers); frozen ones
    are told by the size of their partitions (`_frozen_expert_parallel_sizes`). ZeRO stages 1 and 2 answer no.
    """
    optim_files = _checkpoint_files(checkpoint_dir, "optim")
    if 0 not in optim_files:
        return False
    optimizer_state = SavedZero3Checkpoint._load(optim_files[0])["optimizer_state_dict"]
    if optimizer_state.get("zero_stage") != 3:
        return False
    groups = optimizer_state.get("ds_zero_partition_groups") or []
    if any("autoep_expert" in group["families"] for group in groups):
        return True
    model_files = _checkpoint_files(checkpoint_dir, "model")
    model_states = {rank: SavedZero3Checkpoint._load(path) for rank, path in model_files.items()}
    return bool(model_states) and _frozen_expert_parallel_sizes(model_states) - {1} != set()


def _buffers(saved: SavedZero3Checkpoint) -> dict:
    """The module's buffers as rank 0 saved them (they are whole on every rank), floating ones in fp32."""
    model_state = saved.model_states[0]
    buffer_names = set(model_state.get("buffer_names", ()))
    return {
        name: tensor.float() if tensor.is_floating_point() else tensor.clone()
        for name, tensor in model_state["module"].items()
        if name in buffer_names
    }


def _frozen_whole_tensor(saved: SavedZero3Checkpoint, name: str, shape) -> "torch.Tensor":
    """
    A frozen parameter, whole: its partitions concatenated within their group, and for an expert the groups' slices
    in the order of their expert-parallel ranks (EP rank e's group holds the ranks e, e + P, ..., as for trained
    experts, `SavedZero3Checkpoint.whole_tensor`). In the dtype it was saved in, as DeepSpeed's reader returns frozen
    parameters.
    """
    world_size = saved.world_size
    fragments = [saved.model_states[rank]["frozen_param_fragments"][name].reshape(-1) for rank in range(world_size)]
    numel = shape.numel()
    if numel == 0:
        return fragments[0].new_empty(shape)
    group_size = _frozen_partition_size(numel, fragments[0].numel(), world_size)
    if group_size is None:
        raise NotImplementedError(
            f"{saved.checkpoint_dir}: the frozen parameter `{name}` ({numel} elements) is too small to tell over which "
            "ranks it was partitioned. Pass `exclude_frozen_parameters=True` and take it from the checkpoint the "
            "model was loaded from: frozen parameters keep the weights they were loaded with."
        )
    ep_size = world_size // group_size
    slices = [torch.cat(fragments[ep_rank::ep_size]).narrow(0, 0, numel).view(shape) for ep_rank in range(ep_size)]
    return torch.cat(slices) if ep_size > 1 else slices[0]


def _frozen_parameters(saved: SavedZero3Checkpoint) -> dict:
    shapes = _frozen_shapes(saved.model_states[0])
    return {name: _frozen_whole_tensor(saved, name, shape) for name, shape in shapes.items()}


def _expert_parallel_fp32_state_dict(checkpoint_dir: str, exclude_frozen_parameters: bool) -> dict:
    saved = SavedZero3Checkpoint(checkpoint_dir)
    state_dict = _buffers(saved)
    if not exclude_frozen_parameters:
        state_dict.update(_frozen_parameters(saved))
    for name in saved.groups:
        state_dict[name] = saved.whole_tensor(name, "fp32")
    # Tied weights were saved once, under one of their names
    for name, saved_as in saved.model_states[0].get("shared_params", {}).items():
        if saved_as in state_dict:
            state_dict[name] = state_dict[saved_as]
    logger.info(f"Read the fp32 weights of {len(state_dict)} tensors from {checkpoint_dir} ({saved.topology()}).")
    return state_dict


def get_fp32_state_dict_from_zero_checkpoint(
    checkpoint_dir: str, tag: str | None = None, exclude_frozen_parameters: bool = False
) -> dict:
    """
    DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` for checkpoints of expert-parallel models too: the fp32
    master weights of a DeepSpeed ZeRO checkpoint, whole (every expert of every expert parallel rank), on the CPU,
    under the model's parameter names, with the buffers (floating ones in fp32), the frozen parameters and tied
    weights, in one process.

    Args:
        checkpoint_dir (`str`):
            The folder `engine.save_checkpoint` / `accelerator.save_state` wrote (holding `latest` and the tag's
            folder), or a Trainer's `checkpoint-N`.
        tag (`str`, *optional*):
            The checkpoint's tag (e.g. `global_step14`): read from `checkpoint_dir/latest` when not given, or the only
            `global_step*` folder there.
        exclude_frozen_parameters (`bool`, *optional*, defaults to `False`):
            Leave out the parameters that were not trained. Otherwise they come whole, experts included, in the dtype
            they were saved in (as DeepSpeed's reader returns them); a frozen parameter of an expert-parallel
            checkpoint with fewer elements than ranks is refused (`_frozen_whole_tensor`).

    Checkpoints without expert parallelism (and ZeRO stages 1 and 2) are read by DeepSpeed's own function, unchanged.
    """
    from deepspeed.utils import zero_to_fp32

    tag_dir = resolve_checkpoint_dir(checkpoint_dir, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"No checkpoint folder {tag_dir}.")
    if not is_expert_parallel_checkpoint(tag_dir):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            checkpoint_dir, tag=os.path.basename(tag_dir), exclude_frozen_parameters=exclude_frozen_parameters
        )
    return _expert_parallel_fp32_state_dict(tag_dir, exclude_frozen_parameters)
