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
weights become a state dict (`get_fp32_state_dict_from_zero_checkpoint`), files as DeepSpeed writes them
(`convert_zero_checkpoint_to_fp32_state_dict`, `convert_zero_checkpoint_to_state_dict`), or a model's weights
(`load_state_dict_from_zero_checkpoint`). A checkpoint without expert parallelism goes to DeepSpeed's own functions, so
that their output stays DeepSpeed's.

Under ZeRO stages 1 and 2 the checkpoints of expert-parallel models are in DeepSpeed's MoE layout (one file per
expert), which DeepSpeed's reader cannot read either ("is not a model state checkpoint"): they are read by
`deepspeed_expert_parallel_zero12_reader.SavedZero12Checkpoint`, behind the same functions.

The `zero_to_fp32.py` DeepSpeed copies into each checkpoint folder is the fork's own in the checkpoints of
expert-parallel models (`deepspeed_expert_parallel_zero_to_fp32.py`, copied by
`write_own_recovery_script_in_deepspeed_checkpoints`): DeepSpeed's command line, these functions behind it.
"""

import json
import os
import shutil
from collections.abc import Callable
from functools import partial, wraps
from typing import NamedTuple

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


def _rank_0_optimizer_state(checkpoint_dir: str) -> dict | None:
    """What rank 0's optimizer-states file holds (memory-mapped), None without one."""
    optim_files = _checkpoint_files(checkpoint_dir, "optim")
    if 0 not in optim_files:
        return None
    return SavedZero3Checkpoint._load(optim_files[0])["optimizer_state_dict"]


def is_expert_parallel_checkpoint(checkpoint_dir: str) -> bool:
    """
    Whether the ZeRO checkpoint in `checkpoint_dir` (one tag's folder) is one of an expert-parallel model, which
    DeepSpeed's `zero_to_fp32` cannot read. At ZeRO-3, whether it holds parameters partitioned over
    expert-data-parallel groups (the experts): DeepSpeed's reader stops on trained ones and returns one rank's slice of
    frozen ones. For trained experts DeepSpeed records the ranks of their sub-groups (`ds_zero_partition_groups`) in
    each rank's optimizer states, and nothing for a model without them (every rank of an expert-parallel model holds
    experts, so rank 0's file answers); frozen ones are told by the size of their partitions
    (`_frozen_expert_parallel_sizes`). At stages 1 and 2, whether it holds the per-expert files of transformers'
    experts modules (`deepspeed_expert_parallel_zero12_reader.is_expert_parallel_zero12_checkpoint`).
    """
    optimizer_state = _rank_0_optimizer_state(checkpoint_dir)
    if optimizer_state is None:
        return False
    if optimizer_state.get("zero_stage") != 3:
        from .deepspeed_expert_parallel_zero12_reader import is_expert_parallel_zero12_checkpoint

        return is_expert_parallel_zero12_checkpoint(checkpoint_dir)
    groups = optimizer_state.get("ds_zero_partition_groups") or []
    if any("autoep_expert" in group["families"] for group in groups):
        return True
    model_files = _checkpoint_files(checkpoint_dir, "model")
    model_states = {rank: SavedZero3Checkpoint._load(path) for rank, path in model_files.items()}
    return bool(model_states) and _frozen_expert_parallel_sizes(model_states) - {1} != set()


def holds_expert_partitions(saved: SavedZero3Checkpoint) -> bool:
    """`is_expert_parallel_checkpoint` for a ZeRO-3 checkpoint already read, from what the reader indexed."""
    if any(group.is_expert for groups in saved.groups.values() for group in groups):
        return True
    return _frozen_expert_parallel_sizes(saved.model_states) - {1} != set()


def _buffers(saved: SavedZero3Checkpoint) -> dict:
    """The module's buffers as rank 0 saved them (they are whole on every rank), floating ones in fp32."""
    model_state = saved.model_states[0]
    buffer_names = set(model_state.get("buffer_names", ()))
    return {
        name: tensor.float() if tensor.is_floating_point() else tensor.clone()
        for name, tensor in model_state["module"].items()
        if name in buffer_names
    }


def _frozen_whole_tensor(
    saved: SavedZero3Checkpoint, name: str, shape, expert_parallel: bool = True
) -> "torch.Tensor":
    """
    A frozen parameter, whole: its partitions concatenated within their group, and for an expert the groups' slices
    in the order of their expert-parallel ranks (EP rank e's group holds the ranks e, e + P, ..., as for trained
    experts, `SavedZero3Checkpoint.whole_tensor`). In the dtype it was saved in, as DeepSpeed's reader returns frozen
    parameters. Without `expert_parallel` every parameter was partitioned over all ranks.
    """
    world_size = saved.world_size
    fragments = [saved.model_states[rank]["frozen_param_fragments"][name].reshape(-1) for rank in range(world_size)]
    numel = shape.numel()
    if numel == 0:
        return fragments[0].new_empty(shape)
    if expert_parallel:
        group_size = _frozen_partition_size(numel, fragments[0].numel(), world_size)
    else:
        group_size = world_size
    if group_size is None:
        raise NotImplementedError(
            f"{saved.checkpoint_dir}: the frozen parameter `{name}` ({numel} elements) is too small to tell over which "
            "ranks it was partitioned. Pass `exclude_frozen_parameters=True` and take it from the checkpoint the "
            "model was loaded from: frozen parameters keep the weights they were loaded with."
        )
    ep_size = world_size // group_size
    slices = [torch.cat(fragments[ep_rank::ep_size]).narrow(0, 0, numel).view(shape) for ep_rank in range(ep_size)]
    return torch.cat(slices) if ep_size > 1 else slices[0]


class Unread(NamedTuple):
    """
    A tensor of the checkpoint not read yet: its shape and dtype are enough to plan the output's shards, and `read`
    gives it when its shard is written, so that a conversion holds one shard's tensors at a time, as DeepSpeed's does.
    """

    shape: "torch.Size"
    dtype: "torch.dtype"
    read: Callable[[], "torch.Tensor"]


def _read(value) -> "torch.Tensor":
    return value.read() if isinstance(value, Unread) else value


def _frozen_parameters(saved: SavedZero3Checkpoint, expert_parallel: bool = True) -> dict:
    shapes = _frozen_shapes(saved.model_states[0])
    fragments = saved.model_states[0].get("frozen_param_fragments") or {}
    return {
        name: Unread(shape, fragments[name].dtype, partial(_frozen_whole_tensor, saved, name, shape, expert_parallel))
        for name, shape in shapes.items()
    }


def _whole_shape(saved: SavedZero3Checkpoint, name: str) -> "torch.Size":
    """The whole shape of a trained parameter: an expert's slices (one per expert-parallel rank) stacked on dim 0."""
    shapes = [saved.shapes[f"{name}@{group.ranks}"] for group in saved.groups[name]]
    if len(shapes) == 1:
        return shapes[0]
    return torch.Size((sum(shape[0] for shape in shapes), *shapes[0][1:]))


def _expert_parallel_unread_state_dict(checkpoint_dir: str, exclude_frozen_parameters: bool) -> dict:
    """The state dict of an expert-parallel checkpoint (`is_expert_parallel_checkpoint`), by its ZeRO stage's
    reader."""
    if _rank_0_optimizer_state(checkpoint_dir).get("zero_stage") == 3:
        return unread_state_dict(SavedZero3Checkpoint(checkpoint_dir), exclude_frozen_parameters)
    from .deepspeed_expert_parallel_zero12_reader import SavedZero12Checkpoint, unread_zero12_state_dict

    return unread_zero12_state_dict(SavedZero12Checkpoint(checkpoint_dir), exclude_frozen_parameters)


def unread_state_dict(
    saved: SavedZero3Checkpoint, exclude_frozen_parameters: bool, expert_parallel: bool = True
) -> dict:
    """
    Every tensor of the state dict DeepSpeed's reader would return, in its order (buffers, frozen parameters, trained
    parameters, tied names last), read lazily (`Unread`) except the buffers. Tied weights were saved once, under one
    of their names: the other names get the same value, so that they stay one tensor once read. Without
    `expert_parallel` (a checkpoint of a model without expert parallelism) the frozen parameters were partitioned
    over all ranks.
    """
    checkpoint_dir = saved.checkpoint_dir
    state_dict = _buffers(saved)
    if not exclude_frozen_parameters:
        state_dict.update(_frozen_parameters(saved, expert_parallel))
    for name in saved.groups:
        state_dict[name] = Unread(_whole_shape(saved, name), torch.float32, partial(saved.whole_tensor, name, "fp32"))
    for name, saved_as in saved.model_states[0].get("shared_params", {}).items():
        if saved_as in state_dict:
            state_dict[name] = state_dict[saved_as]
    logger.info(f"{len(state_dict)} tensors in {checkpoint_dir} ({saved.topology()}).")
    return state_dict


def _read_tensors(unread: dict, names, dtype=None) -> dict:
    """
    The tensors `names` of `unread`, read once each (tied names share theirs), floating ones cast to `dtype` (when
    given), contiguous and owning their storage: `torch.save` writes a view's whole storage, which for a parameter
    rebuilt from padded partitions holds the padding too.
    """
    by_value, tensors = {}, {}
    for name in names:
        value = unread[name]
        if id(value) not in by_value:
            tensor = _read(value)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensor = tensor.contiguous()
            if tensor.untyped_storage().nbytes() != tensor.nbytes:
                tensor = tensor.clone()
            by_value[id(value)] = tensor
        tensors[name] = by_value[id(value)]
    return tensors


def _expert_parallel_fp32_state_dict(checkpoint_dir: str, exclude_frozen_parameters: bool) -> dict:
    unread = _expert_parallel_unread_state_dict(checkpoint_dir, exclude_frozen_parameters)
    return _read_tensors(unread, list(unread))


def _existing_tag_dir(checkpoint_dir: str, tag: str | None) -> str:
    """The tag's folder (`resolve_checkpoint_dir`), which must exist."""
    tag_dir = resolve_checkpoint_dir(checkpoint_dir, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"No checkpoint folder {tag_dir}.")
    return tag_dir


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

    Checkpoints without expert parallelism, at every ZeRO stage, are read by DeepSpeed's own function, unchanged.
    """
    from deepspeed.utils import zero_to_fp32

    tag_dir = _existing_tag_dir(checkpoint_dir, tag)
    if not is_expert_parallel_checkpoint(tag_dir):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            checkpoint_dir, tag=os.path.basename(tag_dir), exclude_frozen_parameters=exclude_frozen_parameters
        )
    return _expert_parallel_fp32_state_dict(tag_dir, exclude_frozen_parameters)


# The names of the output dtypes DeepSpeed's `convert_zero_checkpoint_to_state_dict` (and `zero_to_torch.py --dtype`)
# accepts, besides torch dtypes.
_OUTPUT_DTYPES = {
    "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _output_dtype(dtype) -> "torch.dtype":
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _OUTPUT_DTYPES:
        return getattr(torch, _OUTPUT_DTYPES[dtype.lower()])
    raise ValueError(f"Unsupported output dtype {dtype!r}: use float32, float16 or bfloat16.")


def _shard_plan(unread: dict, weights_name: str, max_shard_size, dtype) -> tuple[dict, dict | None]:
    """
    Which tensors go to which file, and the index when there are several: huggingface_hub's split, as DeepSpeed's
    conversion plans it (sizes in the output dtype; tied names in their tensor's file, counted once), but from meta
    tensors, so that planning allocates nothing. `max_shard_size=None`: one file.
    """
    if max_shard_size is None:
        return {weights_name: list(unread)}, None
    from huggingface_hub import split_torch_state_dict_into_shards

    first_name, tied, placeholders = {}, {}, {}
    for name, value in unread.items():
        source = first_name.setdefault(id(value), name)
        if source != name:
            tied[name] = source
            continue
        floating = value.dtype.is_floating_point
        placeholders[name] = torch.empty(value.shape, dtype=dtype if floating else value.dtype, device="meta")
    pattern = weights_name.replace(".bin", "{suffix}.bin").replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(placeholders, filename_pattern=pattern, max_shard_size=max_shard_size)
    files = {file_name: list(names) for file_name, names in split.filename_to_tensors.items()}
    weight_map = dict(split.tensor_to_filename)
    for name, source in tied.items():
        weight_map[name] = weight_map[source]
        files[weight_map[name]].append(name)
    index = {"metadata": split.metadata, "weight_map": weight_map} if split.is_sharded else None
    return files, index


def _write_state_dict(unread: dict, output_dir: str, dtype, max_shard_size, safe_serialization: bool):
    """
    DeepSpeed's outputs: `pytorch_model.bin` (`torch.save`) or `model.safetensors` (metadata `{"format": "pt"}`), or
    shards named by huggingface_hub (`model-00001-of-00002.safetensors`, ...) with their index
    (`model.safetensors.index.json` / `pytorch_model.bin.index.json`, as DeepSpeed writes it). One shard's tensors
    read at a time.
    """
    weights_name = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    files, index = _shard_plan(unread, weights_name, max_shard_size, dtype)
    os.makedirs(output_dir, exist_ok=True)
    for file_name, names in files.items():
        tensors = _read_tensors(unread, names, dtype)
        path = os.path.join(output_dir, file_name)
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(tensors, path, metadata={"format": "pt"})
        else:
            torch.save(tensors, path)
        logger.info(f"Wrote {len(tensors)} tensors to {path}.")
        del tensors
    if index is not None:
        index_path = os.path.join(output_dir, f"{weights_name}.index.json")
        with open(index_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def convert_zero_checkpoint_to_state_dict(
    checkpoint_dir: str,
    output_dir: str,
    dtype="float32",
    max_shard_size: int | str | None = "5GB",
    safe_serialization: bool = False,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
):
    """
    DeepSpeed's `convert_zero_checkpoint_to_state_dict` for checkpoints of expert-parallel models too: the fp32 master
    weights of a ZeRO checkpoint (every expert), floating tensors cast to `dtype`, written to `output_dir` as DeepSpeed
    writes them (`pytorch_model.bin`, or `model.safetensors` with `safe_serialization`, sharded over `max_shard_size`
    with an index; `None`: one file), one shard in memory at a time. `zero_to_torch.py`, which DeepSpeed copies into
    each checkpoint folder beside `zero_to_fp32.py`, calls it through the fork's `zero_to_fp32.py`.

    Checkpoints without expert parallelism, at every ZeRO stage, go to DeepSpeed's own function: the files are
    DeepSpeed's, byte for byte.
    """
    tag_dir = _existing_tag_dir(checkpoint_dir, tag)
    if not is_expert_parallel_checkpoint(tag_dir):
        from deepspeed.utils import zero_to_fp32

        return zero_to_fp32.convert_zero_checkpoint_to_state_dict(
            checkpoint_dir, output_dir, dtype=dtype, max_shard_size=max_shard_size,
            safe_serialization=safe_serialization, tag=os.path.basename(tag_dir),
            exclude_frozen_parameters=exclude_frozen_parameters,
        )
    unread = _expert_parallel_unread_state_dict(tag_dir, exclude_frozen_parameters)
    _write_state_dict(unread, output_dir, _output_dtype(dtype), max_shard_size, safe_serialization)


def convert_zero_checkpoint_to_fp32_state_dict(
    checkpoint_dir: str,
    output_dir: str,
    max_shard_size: int | str | None = "5GB",
    safe_serialization: bool = False,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
):
    """
    DeepSpeed's `convert_zero_checkpoint_to_fp32_state_dict` (what `zero_to_fp32.py` runs) for checkpoints of
    expert-parallel models too: `convert_zero_checkpoint_to_state_dict` in fp32. Checkpoints without expert
    parallelism go to DeepSpeed's own function, unchanged.
    """
    tag_dir = _existing_tag_dir(checkpoint_dir, tag)
    if not is_expert_parallel_checkpoint(tag_dir):
        from deepspeed.utils import zero_to_fp32

        return zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(
            checkpoint_dir, output_dir, max_shard_size=max_shard_size, safe_serialization=safe_serialization,
            tag=os.path.basename(tag_dir), exclude_frozen_parameters=exclude_frozen_parameters,
        )
    unread = _expert_parallel_unread_state_dict(tag_dir, exclude_frozen_parameters)
    _write_state_dict(unread, output_dir, torch.float32, max_shard_size, safe_serialization)


def load_state_dict_from_zero_checkpoint(model, checkpoint_dir: str, tag: str | None = None):
    """
    DeepSpeed's `load_state_dict_from_zero_checkpoint` for checkpoints of expert-parallel models too: the checkpoint's
    fp32 weights (`get_fp32_state_dict_from_zero_checkpoint`, every expert) loaded into `model` on the CPU
    (`strict=False`), which is returned. `model` must hold whole tensors: a model loaded without expert parallelism,
    in one process. Checkpoints without expert parallelism go to DeepSpeed's own function, unchanged.
    """
    from .deepspeed_expert_parallel_save import _expert_parallel_models_in

    tag_dir = _existing_tag_dir(checkpoint_dir, tag)
    if not is_expert_parallel_checkpoint(tag_dir):
        from deepspeed.utils import zero_to_fp32

        return zero_to_fp32.load_state_dict_from_zero_checkpoint(model, checkpoint_dir, tag=os.path.basename(tag_dir))
    if _expert_parallel_models_in(model):
        raise ValueError(
            "load_state_dict_from_zero_checkpoint loads whole tensors (every expert) into a model of one process: "
            "this model holds one rank's experts. Load the model without a `DistributedConfig`, or resume the "
            "checkpoint under expert parallelism with `engine.load_checkpoint` / `load_checkpoint_on_new_topology`."
        )
    state_dict = _expert_parallel_fp32_state_dict(tag_dir, exclude_frozen_parameters=False)
    model = model.cpu()
    model.load_state_dict(state_dict, strict=False)
    return model


# The fork's recovery script, copied into the checkpoint folders of expert-parallel models as `zero_to_fp32.py`.
RECOVERY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepspeed_expert_parallel_zero_to_fp32.py")


def _write_own_recovery_script_for_expert_parallel_models(engine_class):
    """
    Make `engine_class._copy_recovery_script` (DeepSpeed's `save_checkpoint`, behind `accelerator.save_state` and the
    Trainer's checkpoints, copies `zero_to_fp32.py` and `zero_to_torch.py` into the checkpoint folder with it) write
    the fork's `zero_to_fp32.py` instead of DeepSpeed's when the engine holds an expert-parallel model: DeepSpeed's
    cannot read such checkpoints, and the one in the folder is what users run on a machine without GPUs. DeepSpeed's
    `zero_to_torch.py` stays: it imports the `zero_to_fp32.py` beside it, so it converts these checkpoints too. Other
    models keep DeepSpeed's scripts. Done once, when the first such model is handed over to DeepSpeed.
    """
    copy_scripts = getattr(engine_class, "_copy_recovery_script", None)
    if copy_scripts is None or getattr(copy_scripts, "writes_expert_parallel_recovery_script", False):
        return

    @wraps(copy_scripts)
    def copy_recovery_scripts(engine, save_path):
        from .deepspeed_expert_parallel_save import _expert_parallel_models_in

        copy_scripts(engine, save_path)
        if _expert_parallel_models_in(engine.module):
            destination = os.path.join(save_path, "zero_to_fp32.py")
            shutil.copyfile(RECOVERY_SCRIPT, destination)
            engine._change_recovery_script_permissions(destination)  # executable, as DeepSpeed makes its own

    copy_recovery_scripts.writes_expert_parallel_recovery_script = True
    engine_class._copy_recovery_script = copy_recovery_scripts


def write_own_recovery_script_in_deepspeed_checkpoints():
    """
    Called when a model is handed over to DeepSpeed (through `reshard_in_deepspeed_load_checkpoint`): from then on, the
    DeepSpeed checkpoints of expert-parallel models carry the fork's `zero_to_fp32.py`
    (`_write_own_recovery_script_for_expert_parallel_models`).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    _write_own_recovery_script_for_expert_parallel_models(DeepSpeedEngine)
