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

import glob
import os

from ..utils import is_torch_available, logging
from .deepspeed_expert_parallel_reshard import SavedZero3Checkpoint, resolve_checkpoint_dir


if is_torch_available():
    import torch


logger = logging.get_logger(__name__)


def is_expert_parallel_checkpoint(checkpoint_dir: str) -> bool:
    """
    Whether the ZeRO-3 checkpoint in `checkpoint_dir` (one tag's folder) holds sub-groups partitioned over
    expert-data-parallel groups (the experts of an expert-parallel model), which DeepSpeed's `zero_to_fp32` cannot
    read. DeepSpeed records the ranks of such sub-groups (`ds_zero_partition_groups`) in each rank's optimizer
    states, and nothing for a model without them; every rank of an expert-parallel model holds experts, so rank 0's
    file answers. ZeRO stages 1 and 2 (no such groups) answer no.
    """
    files = sorted(glob.glob(os.path.join(checkpoint_dir, "*zero_pp_rank_0_mp_rank_*_optim_states.pt")))
    if not files:
        return False
    optimizer_state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
    if optimizer_state.get("zero_stage") != 3:
        return False
    groups = optimizer_state.get("ds_zero_partition_groups") or []
    return any("autoep_expert" in group["families"] for group in groups)


def _buffers(saved: SavedZero3Checkpoint) -> dict:
    """The module's buffers as rank 0 saved them (they are whole on every rank), floating ones in fp32."""
    model_state = saved.model_states[0]
    buffer_names = set(model_state.get("buffer_names", ()))
    return {
        name: tensor.float() if tensor.is_floating_point() else tensor.clone()
        for name, tensor in model_state["module"].items()
        if name in buffer_names
    }


def _refuse_frozen_parameters(saved: SavedZero3Checkpoint):
    """
    Frozen parameters are saved as each rank's bare partition, without the group it was cut over: under expert
    parallelism a frozen expert (one group per EP rank) cannot be told from a frozen dense weight (all ranks), so they
    are not rebuilt rather than rebuilt wrong. They are the weights the model was loaded with.
    """
    frozen = sorted(saved.model_states[0].get("frozen_param_shapes") or {})
    if frozen:
        raise NotImplementedError(
            f"{saved.checkpoint_dir} holds frozen parameters (e.g. {frozen[:3]}), which the reader of expert-parallel "
            "checkpoints does not rebuild. Pass `exclude_frozen_parameters=True` and take them from the checkpoint "
            "the model was loaded from: frozen parameters keep the weights they were loaded with."
        )


def _expert_parallel_fp32_state_dict(checkpoint_dir: str, exclude_frozen_parameters: bool) -> dict:
    saved = SavedZero3Checkpoint(checkpoint_dir)
    if not exclude_frozen_parameters:
        _refuse_frozen_parameters(saved)
    state_dict = _buffers(saved)
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
    under the model's parameter names, with the buffers (floating ones in fp32) and tied weights, in one process.

    Args:
        checkpoint_dir (`str`):
            The folder `engine.save_checkpoint` / `accelerator.save_state` wrote (holding `latest` and the tag's
            folder), or a Trainer's `checkpoint-N`.
        tag (`str`, *optional*):
            The checkpoint's tag (e.g. `global_step14`): read from `checkpoint_dir/latest` when not given, or the only
            `global_step*` folder there.
        exclude_frozen_parameters (`bool`, *optional*, defaults to `False`):
            Leave out the parameters that were not trained. An expert-parallel checkpoint holding frozen parameters
            needs it (they are refused otherwise: `_refuse_frozen_parameters`).

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
