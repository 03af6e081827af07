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
DeepSpeed ZeRO stage 1 and 2 checkpoints of expert-parallel models, read offline: whole parameters (every expert) by
name, in one process, without GPUs and without the topology they were written on.

At stages 1 and 2 such checkpoints are in DeepSpeed's MoE layout (`deepspeed_expert_parallel_zero12`):
- `layer_<L>_expert_<G>_mp_rank_00_model_states.pt`, one file per expert of each experts module, written by the first
  rank of each expert-data-parallel group: the module weights of expert `G` (its global index) under
  `<module>.deepspeed_moe.experts.deepspeed_experts.<G>.<gate_up_proj|down_proj>`;
- `mp_rank_00_model_states.pt` (rank 0): the module state without the experts, the buffers, the frozen dense
  parameters (`frozen_param_fragments`, stage 2 only), the shared (tied) names and, per optimizer group, the names and
  shapes of its parameters in the order of its flat tensor (`param_shapes`, rank 0's: E/P experts for an expert);
- `[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt` per rank: for each optimizer group, the rank's partition of
  the group's flat fp32 master weights (`single_partition_of_fp32_groups`, without the padding that aligns the group)
  and of Adam's moments (`base_optimizer_state`, with it), the parameters' alignment paddings, the groups' settings.

DeepSpeed's `zero_to_fp32` cannot read them: it takes the per-expert files for model-states files ("is not a model
state checkpoint"), and it joins every group's partitions over all ranks, where each expert-parallel rank partitioned
its own experts over its expert-data-parallel group. `SavedZero12Checkpoint` rebuilds each parameter as the ZeRO-3
reader (`deepspeed_expert_parallel_reshard.SavedZero3Checkpoint`) does, behind the same `whole_tensor(name, key)`:
- a dense group was partitioned over all W ranks: its flat tensor is the partitions of ranks 0..W-1 in order;
- a MoE group (`moe: True`, named `ep_size_<P>` by DeepSpeed) once per EP rank e, over its expert-data-parallel group,
  the ranks e, e + P, ..., e + W - P (DeepSpeed's expert groups without tensor or pipeline parallelism, which the
  hand-over checks against the model's mesh): EP rank e's flat tensor is those ranks' partitions in order, and holds
  its E/P experts of each parameter; the whole parameter is the EP ranks' experts concatenated on dim 0;
- in a flat tensor each parameter of `param_shapes` follows the previous one and its alignment padding.
Frozen parameters are in no optimizer group: the experts come from the per-expert files, stacked by global index, the
others from `frozen_param_fragments` (stage 2) or the module state (stage 1), in the dtype they were saved in.

`deepspeed_expert_parallel_checkpoint` (`get_fp32_state_dict_from_zero_checkpoint`, the conversions and the
`zero_to_fp32.py` DeepSpeed copies into the checkpoint folder) and `deepspeed_expert_parallel_export` read these
checkpoints through here.
"""

import glob
import os
import re
from collections import defaultdict
from functools import partial
from typing import NamedTuple

from ..utils import is_torch_available, logging
from .deepspeed_expert_parallel_checkpoint import Unread, _buffers
from .deepspeed_expert_parallel_reshard import SavedZero3Checkpoint, _checkpoint_files


if is_torch_available():
    import torch


logger = logging.get_logger(__name__)

MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
# The key of one expert of a transformers experts module (the stacked parameter's name last, without dots); DeepSpeed's
# own MoE layers hold a module per expert, whose keys go on (`...deepspeed_experts.<G>.<module>.weight`)
_EXPERT_KEY = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.([^.]+)$")
# DeepSpeed names the MoE groups of its optimizer after the expert groups (`split_params_into_different_moe_groups`)
_MOE_GROUP_NAME = re.compile(r"ep_size_(\d+)$")


class _ExpertSlot(NamedTuple):
    """Where one expert of a stacked expert parameter is: its file and key, with the shape and dtype it was saved in."""

    path: str
    key: str
    shape: "torch.Size"
    dtype: "torch.dtype"


class _OptimizerGroup(NamedTuple):
    """One optimizer group: its index, the EP size of a MoE group (1 for a dense one), and where each of its
    parameters starts in the flat tensor of an EP rank, with its shape there."""

    index: int
    ep_size: int
    offsets: dict


def _load(path: str):
    return SavedZero3Checkpoint._load(path)


def _expert_files(checkpoint_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(checkpoint_dir, "layer_*_expert_*_mp_rank_*_model_states.pt")))


def is_expert_parallel_zero12_checkpoint(checkpoint_dir: str) -> bool:
    """
    Whether `checkpoint_dir` (one tag's folder) is a stage-1/2 checkpoint of the fork's expert-parallel models: rank
    0's model states and per-expert files whose keys are those of transformers' experts modules (one stacked
    parameter per key). Checkpoints of DeepSpeed's own MoE layers, whose experts are modules, answer no.
    """
    files = _expert_files(checkpoint_dir)
    if not files or not os.path.isfile(os.path.join(checkpoint_dir, MODEL_STATES_FILE)):
        return False
    keys = list(_load(files[0]))
    return bool(keys) and all(_EXPERT_KEY.match(key) for key in keys)


def _index_expert_files(checkpoint_dir: str) -> dict[str, list[_ExpertSlot]]:
    """Every expert of each stacked expert parameter (its name in the model), in the order of their global index."""
    experts = defaultdict(dict)
    for path in _expert_files(checkpoint_dir):
        match = _EXPERT_FILE.search(path)
        if match is None:
            continue
        if int(match.group(3)) != 0:
            raise NotImplementedError(
                f"{path} belongs to model-parallel rank {match.group(3)}: checkpoints with tensor or pipeline "
                "parallelism are not read here."
            )
        for key, tensor in _load(path).items():
            key_match = _EXPERT_KEY.match(key)
            if key_match is None or key_match.group(2) != match.group(2):
                raise ValueError(
                    f"{path} holds `{key}`, not the expert {match.group(2)} of a transformers experts module: not a "
                    "checkpoint of an expert-parallel model of this fork."
                )
            prefix, expert, name = key_match.groups()
            experts[f"{prefix}.{name}"][int(expert)] = _ExpertSlot(path, key, tensor.shape, tensor.dtype)
    for name, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise FileNotFoundError(
                f"{checkpoint_dir} holds the experts {sorted(by_index)} of `{name}`: some expert's file is missing."
            )
    return {name: [by_index[i] for i in range(len(by_index))] for name, by_index in experts.items()}


def _ep_size_of_group(settings: dict) -> int:
    """The EP size a MoE optimizer group was split by (from its name), 1 for a dense group."""
    if not settings.get("moe", False):
        return 1
    match = _MOE_GROUP_NAME.search(str(settings.get("name", "")))
    if match is None:
        raise ValueError(
            f"A MoE optimizer group named {settings.get('name')!r}, not after its expert groups (`ep_size_<P>`): the "
            "ranks its experts were partitioned over are not known."
        )
    return int(match.group(1))


class SavedZero12Checkpoint:
    """
    The files of a DeepSpeed ZeRO stage 1 or 2 checkpoint of an expert-parallel model (see the module's docstring),
    read as whole per-parameter tensors. The files are memory-mapped: `whole_tensor` reads only the partitions of the
    parameter it is asked for.
    """

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir
        model_states = os.path.join(checkpoint_dir, MODEL_STATES_FILE)
        optim_files = _checkpoint_files(checkpoint_dir, "optim")
        if not os.path.isfile(model_states) or not optim_files:
            raise FileNotFoundError(
                f"{checkpoint_dir} does not hold a DeepSpeed ZeRO stage 1 or 2 checkpoint ({MODEL_STATES_FILE} and "
                "the optimizer states of every rank)."
            )
        # Only rank 0 writes model states at stages 1 and 2; `model_states` as the ZeRO-3 reader has it
        self.model_states = {0: _load(model_states)}
        self.world_size = self.model_states[0].get("dp_world_size", len(optim_files))
        if sorted(optim_files) != list(range(self.world_size)):
            raise FileNotFoundError(
                f"{checkpoint_dir} was saved on {self.world_size} ranks but holds the optimizer states of ranks "
                f"{sorted(optim_files)} (DeepSpeed's node-local storage?): copy the checkpoint folders of every node "
                "into one directory."
            )
        self.optimizer_states = {r: _load(path)["optimizer_state_dict"] for r, path in optim_files.items()}
        self._check_zero_optimizer()
        self.experts = _index_expert_files(checkpoint_dir)
        self.groups = [self._index_group(i, shapes) for i, shapes in enumerate(self.model_states[0]["param_shapes"])]
        self._group_of = {name: group for group in self.groups for name in group.offsets}
        self._check_trained_experts_have_files()

    def _check_trained_experts_have_files(self):
        """The per-expert files hold as many experts of each trained expert parameter as its MoE group: E/P per EP
        rank, P EP ranks (a missing file, or a group split by another EP size, shows here)."""
        for name, group in self._group_of.items():
            if group.ep_size > 1 and len(self.experts.get(name, ())) != self.trained_shape(name)[0]:
                raise ValueError(
                    f"{self.checkpoint_dir}: the optimizer holds {self.trained_shape(name)[0]} experts of `{name}` "
                    f"(EP size {group.ep_size}), the per-expert files {len(self.experts.get(name, ()))}."
                )

    def _check_zero_optimizer(self):
        # `BF16_Optimizer` (bf16 with fp32 gradient accumulation at stage 1) records no stage, and pads otherwise
        if any(state.get("zero_stage") not in (1, 2) for state in self.optimizer_states.values()):
            raise NotImplementedError(
                f"{self.checkpoint_dir} holds optimizer states of another optimizer than DeepSpeed's ZeRO-1/2 one (no "
                "ZeRO stage 1 or 2 recorded: `BF16_Optimizer`, which DeepSpeed takes for bf16 with fp32 gradient "
                "accumulation at stage 1?), whose layout this reader does not read."
            )

    def _index_group(self, index: int, shapes: dict) -> _OptimizerGroup:
        """Where the parameters of optimizer group `index` start in an EP rank's flat tensor, checked against the
        partitions every rank saved: they must add up exactly to the parameters and their alignment paddings."""
        rank_0 = self.optimizer_states[0]
        ep_size = _ep_size_of_group(rank_0["base_optimizer_state"]["param_groups"][index])
        for rank, state in self.optimizer_states.items():
            if state["partition_count"][index] * ep_size != self.world_size:
                raise ValueError(
                    f"{self.checkpoint_dir}: rank {rank} partitioned optimizer group {index} over "
                    f"{state['partition_count'][index]} ranks, not {self.world_size // ep_size} (EP size {ep_size} of "
                    f"{self.world_size} ranks)."
                )
        # Each parameter's padding to `parameter_alignment` (all 0 unless set; not recorded by older DeepSpeed)
        all_paddings = rank_0.get("param_alignment_paddings")
        paddings = all_paddings[index] if all_paddings else [0] * len(shapes)
        if len(paddings) != len(shapes):
            raise ValueError(f"{self.checkpoint_dir}: {len(paddings)} paddings for the {len(shapes)} parameters of "
                             f"optimizer group {index}.")
        offsets, offset = {}, 0
        for (name, shape), padding in zip(shapes.items(), paddings):
            shape = torch.Size(shape)
            offsets[name] = (offset, shape)
            offset += shape.numel() + padding
        for ep_rank in range(ep_size):
            joined = sum(self._flat_tensor(rank, index, "fp32").numel() for rank in self._ranks(ep_size, ep_rank))
            if joined != offset:
                raise ValueError(
                    f"{self.checkpoint_dir}: the partitions of optimizer group {index} of EP rank {ep_rank} hold "
                    f"{joined} elements, its parameters {offset}: not partitioned as DeepSpeed's ZeRO-1/2 optimizer "
                    "partitions the groups of an expert-parallel model."
                )
        return _OptimizerGroup(index, ep_size, offsets)

    def _ranks(self, ep_size: int, ep_rank: int) -> range:
        """The ranks EP rank `ep_rank`'s groups of EP size `ep_size` were partitioned over, in partition order: its
        expert-data-parallel group (every rank for a dense group, EP size 1)."""
        return range(ep_rank, self.world_size, ep_size)

    def _flat_tensor(self, rank: int, index: int, key: str) -> "torch.Tensor":
        """Rank `rank`'s partition of optimizer group `index`'s flat `key` ("fp32" or a moment), without padding."""
        state = self.optimizer_states[rank]
        master = state["single_partition_of_fp32_groups"][index]  # saved without the group's alignment padding
        if key == "fp32":
            return master
        base = state["base_optimizer_state"]
        moments = base["state"].get(base["param_groups"][index]["params"][0], {})
        if key not in moments:
            raise KeyError(f"{self.checkpoint_dir} holds no optimizer state `{key}` (an optimizer other than Adam?).")
        return moments[key].narrow(0, 0, master.numel())

    def _slice_of_ep_rank(self, group: _OptimizerGroup, ep_rank: int, key: str, offset: int, numel: int):
        """Elements [offset, offset + numel) of EP rank `ep_rank`'s flat `key` of `group`, from the partitions
        holding them (the partitions before the last one that holds anything are whole)."""
        pieces, start = [], 0
        for rank in self._ranks(group.ep_size, ep_rank):
            flat = self._flat_tensor(rank, group.index, key)
            first, last = max(offset, start), min(offset + numel, start + flat.numel())
            if first < last:
                pieces.append(flat.narrow(0, first - start, last - first))
            start += flat.numel()
        return torch.cat(pieces) if pieces else torch.empty(0)

    def whole_tensor(self, name: str, key: str = "fp32") -> "torch.Tensor":
        """
        The whole trained parameter `name` (`key`: "fp32" for the master weights, or an optimizer state such as
        "exp_avg"): for an expert, every EP rank's experts in the order of the EP ranks.
        """
        group = self._group_of.get(name)
        if group is None:
            raise KeyError(name)
        offset, shape = group.offsets[name]
        slices = [
            self._slice_of_ep_rank(group, ep_rank, key, offset, shape.numel()).view(shape)
            for ep_rank in range(group.ep_size)
        ]
        return torch.cat(slices) if len(slices) > 1 else slices[0]

    def trained_names(self) -> list[str]:
        """The trained parameters, in the order of the optimizer groups (DeepSpeed's reader's)."""
        return list(self._group_of)

    def trained_shape(self, name: str) -> "torch.Size":
        group = self._group_of[name]
        _, shape = group.offsets[name]
        return torch.Size((shape[0] * group.ep_size, *shape[1:])) if group.ep_size > 1 else shape

    def _frozen_dense(self) -> dict:
        """The frozen parameters outside the experts, whole (a rank holds all of them at stages 1 and 2), by name:
        DeepSpeed records them at stage 2; at stage 1 they are what the module state holds besides the buffers, the
        trained parameters and the second names of tied ones."""
        model_state = self.model_states[0]
        fragments = model_state.get("frozen_param_fragments")
        if fragments is None:
            others = set(model_state.get("buffer_names") or ()) | set(self._group_of)
            others |= set(model_state.get("shared_params") or {})
            fragments = {name: t for name, t in model_state["module"].items() if name not in others}
        # Frozen experts are there as rank 0's experts only: the per-expert files hold all of them
        return {name: tensor for name, tensor in fragments.items() if name not in self.experts}

    def frozen_parameters(self) -> dict:
        """The frozen parameters, each as an `Unread` (its whole shape, the dtype it was saved in, how to read it)."""
        frozen = {
            name: Unread(tensor.shape, tensor.dtype, partial(torch.Tensor.clone, tensor))
            for name, tensor in self._frozen_dense().items()
        }
        for name, slots in self.experts.items():
            if name not in self._group_of:
                shape = torch.Size((len(slots), *slots[0].shape))
                frozen[name] = Unread(shape, slots[0].dtype, partial(self.frozen_experts, name))
        return frozen

    def frozen_experts(self, name: str) -> "torch.Tensor":
        """Every expert of the stacked expert parameter `name`, from the per-expert files."""
        return torch.stack([_load(slot.path)[slot.key] for slot in self.experts[name]])

    @property
    def step(self):
        """The optimizer's step count, the same in every group of every rank."""
        steps = {
            float(state["step"])
            for optimizer_state in self.optimizer_states.values()
            for state in optimizer_state["base_optimizer_state"]["state"].values()
            if "step" in state
        }
        if len(steps) > 1:
            raise ValueError(f"The groups of {self.checkpoint_dir} were saved at the steps {sorted(steps)}.")
        return steps.pop() if steps else None

    def optimizer_hyperparameters(self) -> list[dict]:
        """The torch optimizer's param groups without their parameters (lr, betas, eps, ...), as rank 0 saved them."""
        groups = self.optimizer_states[0]["base_optimizer_state"]["param_groups"]
        return [{key: value for key, value in group.items() if key != "params"} for group in groups]

    def client_state(self) -> dict:
        """What `save_checkpoint(client_state=...)` was given, as `load_checkpoint` returns it."""
        from .deepspeed_expert_parallel_reshard import _DEEPSPEED_MODEL_STATE_KEYS

        return {k: v for k, v in self.model_states[0].items() if k not in _DEEPSPEED_MODEL_STATE_KEYS}

    def topology(self) -> str:
        ep_sizes = sorted({group.ep_size for group in self.groups if group.ep_size > 1})
        stage = int(self.optimizer_states[0]["zero_stage"])
        experts = f"EP {ep_sizes[0]}" if ep_sizes else "frozen experts"
        return f"ZeRO stage {stage}, {self.world_size} ranks, {experts}"

    def files(self) -> list[str]:
        """Every file the reader maps."""
        return [
            os.path.join(self.checkpoint_dir, MODEL_STATES_FILE),
            *_checkpoint_files(self.checkpoint_dir, "optim").values(),
            *_expert_files(self.checkpoint_dir),
        ]


def unread_zero12_state_dict(saved: SavedZero12Checkpoint, exclude_frozen_parameters: bool) -> dict:
    """
    Every tensor of the checkpoint's state dict, as `deepspeed_expert_parallel_checkpoint.unread_state_dict` gives a
    ZeRO-3 checkpoint's, in DeepSpeed's order (buffers, frozen parameters, trained parameters, tied names last), read
    lazily (`Unread`) except the buffers: the trained parameters' fp32 master weights, every expert.
    """
    state_dict = _buffers(saved)
    if not exclude_frozen_parameters:
        state_dict.update(saved.frozen_parameters())
    for name in saved.trained_names():
        state_dict[name] = Unread(saved.trained_shape(name), torch.float32, partial(saved.whole_tensor, name, "fp32"))
    for name, saved_as in (saved.model_states[0].get("shared_params") or {}).items():
        if saved_as in state_dict:
            state_dict[name] = state_dict[saved_as]
    logger.info(f"{len(state_dict)} tensors in {saved.checkpoint_dir} ({saved.topology()}).")
    return state_dict

