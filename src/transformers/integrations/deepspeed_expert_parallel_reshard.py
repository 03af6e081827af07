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
Resume a DeepSpeed ZeRO-3 checkpoint of an expert-parallel model on another topology: another number of ranks, another
EP size, or without expert parallelism (and back), with the fp32 master weights and the Adam moments.

DeepSpeed's own loader (`engine.load_checkpoint`, also behind `accelerator.load_state` and the Trainer's
`resume_from_checkpoint`) needs the topology the checkpoint was written with: it refuses another data-parallel world
size ("The checkpoint being loaded used a DP world size of ...") and, for a model whose experts are partitioned over
expert-data-parallel groups, another placement ("AutoEP ZeRO-3 checkpoints can only be loaded with the same parameter
placement topology"). Its Universal Checkpoint does not know transformers' expert modules either: the converter
(`ds_to_universal`) rebuilds experts only from the metadata DeepSpeed's own AutoEP layers write (`ds_autoep_layers`)
and otherwise joins the partitions of an expert tensor in rank order, which scrambles the experts of a run with more
ranks than EP ranks; the loader (`"checkpoint": {"load_universal": true}`) cuts each rank's partition out of the whole
tensor as if the rank held every expert. The conversion cannot be stopped from here; the load is refused where it
would be wrong (`refuse_universal_checkpoint_if_wrong`).

`load_checkpoint_on_new_topology(engine, load_dir)` reads the checkpoint files of the old topology instead, which say
everything needed: for each ZeRO-3 sub-group, the parameters' names and shapes (`param_shapes`, model-states files) and
the ranks it was partitioned over (`ds_zero_partition_groups`, optimizer-states files; every rank when absent, for a
model without expert parallelism). From them it rebuilds each parameter's whole fp32 weight, `exp_avg` and `exp_avg_sq`
(partitions concatenated within their group; an expert tensor's slices in the order of the expert-parallel ranks that
held them), then fills each rank's partitions of the new engine: the model's partition, the fp32 master and the
moments, the optimizer step, hyperparameters, learning-rate scheduler and the engine's step counters. One parameter
at a time, from memory-mapped files: a rank holds at most one whole parameter's tensors beyond its own state.
"""

import contextlib
import glob
import os
import re
from collections import defaultdict
from functools import wraps
from typing import NamedTuple

from ..utils import is_torch_available, logging
from .deepspeed_expert_parallel import errors_raised_on_every_rank, offload_device
from .deepspeed_expert_parallel_zero12 import (
    expert_parallel_zero_stage,
    link_optimizer_state_of_every_group,
    load_whole_tensors,
    other_topology_error,
    topology_problem,
)


if is_torch_available():
    import torch


logger = logging.get_logger(__name__)

# What a ZeRO-3 optimizer-states file holds for each sub-group, by the name DeepSpeed's Adam gives it.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_RANK_IN_FILE_NAME = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
# Keys of a model-states file that are DeepSpeed's, not the client state `save_checkpoint` was given.
_DEEPSPEED_MODEL_STATE_KEYS = frozenset(
    {
        "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
        "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
        "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
        "checkpoint_parallel_dimensions",
        "ds_config", "ds_version",
    }
)


class _Fragment(NamedTuple):
    """Where one rank's partition of one parameter sits in its sub-group's flat tensors."""

    rank: int
    sub_group: int
    offset: int
    numel: int
    partition_rank: int


class _PartitionGroup(NamedTuple):
    ranks: tuple[int, ...]
    is_expert: bool


def _checkpoint_files(checkpoint_dir: str, kind: str) -> dict[int, str]:
    files = {}
    for path in glob.glob(os.path.join(checkpoint_dir, f"*zero_pp_rank_*_mp_rank_*_{kind}_states.pt")):
        match = _RANK_IN_FILE_NAME.search(path)
        if match is None:
            continue
        if int(match.group(2)) != 0:
            raise NotImplementedError(
                f"{path} belongs to model-parallel rank {match.group(2)}: checkpoints with tensor or pipeline "
                "parallelism cannot be resumed on another topology."
            )
        files[int(match.group(1))] = path
    return files


def resolve_checkpoint_dir(load_dir: str, tag: str | None = None) -> str:
    """
    The directory of one checkpoint: `load_dir/tag`, the tag read from `load_dir/latest` unless given. DeepSpeed writes
    `latest` on global rank 0 only, also with node-local storage: without it, a folder holding a single `global_step*`
    checkpoint (a Trainer's `checkpoint-N`) names the tag.
    """
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        steps = glob.glob(os.path.join(load_dir, "global_step*"))
        if os.path.isfile(latest):
            with open(latest) as f:
                tag = f.read().strip()
        elif len(steps) == 1:
            tag = os.path.basename(steps[0])
        else:
            raise FileNotFoundError(f"No `latest` file in {load_dir}: pass the checkpoint's `tag`.")
    return os.path.join(load_dir, tag)


class SavedZero3Checkpoint:
    """
    The per-rank files of a DeepSpeed ZeRO-3 checkpoint, read as whole per-parameter tensors. The files are
    memory-mapped: `whole_tensor` reads only the partitions of the parameter it is asked for.
    """

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir
        model_files = _checkpoint_files(checkpoint_dir, "model")
        optim_files = _checkpoint_files(checkpoint_dir, "optim")
        if not model_files or sorted(model_files) != sorted(optim_files) or sorted(model_files) != list(
            range(len(model_files))
        ):
            raise FileNotFoundError(
                f"{checkpoint_dir} does not hold the model and optimizer states of every rank of a DeepSpeed ZeRO-3 "
                f"checkpoint (model states of ranks {sorted(model_files)}, optimizer states of ranks "
                f"{sorted(optim_files)}). On disks that are not shared between nodes, gather every rank's files first."
            )
        self.world_size = len(model_files)
        self.model_states = {r: self._load(path) for r, path in model_files.items()}
        saved_world_size = self.model_states[0].get("dp_world_size", self.world_size)
        if saved_world_size != self.world_size:
            # Node-local storage: each node's disk holds its own ranks' files only
            raise FileNotFoundError(
                f"{checkpoint_dir} was saved on {saved_world_size} ranks but holds the files of ranks "
                f"{sorted(model_files)} only (DeepSpeed's node-local storage?). Resharding reads every rank's files: "
                "copy the checkpoint folders of every node into one directory that every rank can read."
            )
        self.optimizer_states = {r: self._load(path)["optimizer_state_dict"] for r, path in optim_files.items()}
        self.shapes: dict[str, torch.Size] = {}
        self.groups: dict[str, dict[_PartitionGroup, list[_Fragment]]] = defaultdict(lambda: defaultdict(list))
        for rank in range(self.world_size):
            self._index_rank(rank)

    @staticmethod
    def _load(path: str):
        # DeepSpeed writes them with torch.save (pickled Python objects beside the tensors), in the zip format
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)

    def _partition_metadata(self, rank: int, sub_group: int) -> tuple[_PartitionGroup, int]:
        """The ranks sub-group `sub_group` of `rank` was partitioned over, and its rank among them."""
        metadata = self.optimizer_states[rank].get("ds_zero_partition_groups")
        if metadata is None:  # written only when a sub-group holds experts: all over the world
            return _PartitionGroup(tuple(range(self.world_size)), False), rank
        entry = metadata[sub_group]
        group = _PartitionGroup(tuple(entry["partition_ranks"]), "autoep_expert" in entry["families"])
        return group, entry["partition_rank"]

    def _index_rank(self, rank: int):
        for sub_group, shapes in enumerate(self.model_states[rank]["param_shapes"]):
            group, partition_rank = self._partition_metadata(rank, sub_group)
            offset = 0
            for name, shape in shapes.items():
                numel = shape.numel()
                partition_numel = -(-numel // len(group.ranks))
                fragment_numel = max(0, min(partition_numel, numel - partition_rank * partition_numel))
                self.groups[name][group].append(_Fragment(rank, sub_group, offset, fragment_numel, partition_rank))
                self.shapes.setdefault(f"{name}@{group.ranks}", shape)
                offset += partition_numel

    @property
    def step(self):
        """The optimizer's step count, the same in every sub-group of every rank."""
        steps = {
            float(state["step"])
            for optimizer_state in self.optimizer_states.values()
            for state in optimizer_state["optimizer_state_dict"]["state"].values()
            if "step" in state
        }
        if len(steps) > 1:
            raise ValueError(f"The sub-groups of {self.checkpoint_dir} were saved at the steps {sorted(steps)}.")
        return steps.pop() if steps else None

    def optimizer_hyperparameters(self) -> list[dict]:
        """The torch optimizer's param groups without their parameters (lr, betas, eps, ...), as rank 0 saved them."""
        groups = self.optimizer_states[0]["optimizer_state_dict"]["param_groups"]
        return [{key: value for key, value in group.items() if key != "params"} for group in groups]

    def _flat_tensor(self, fragment: _Fragment, key: str) -> torch.Tensor:
        optimizer_state = self.optimizer_states[fragment.rank]
        if key == "fp32":
            return optimizer_state["fp32_flat_groups"][fragment.sub_group]
        state = optimizer_state["optimizer_state_dict"]["state"].get(fragment.sub_group, {})
        if key not in state:
            raise KeyError(f"{self.checkpoint_dir} holds no optimizer state `{key}` (an optimizer other than Adam?).")
        return state[key]

    def _partitions(self, name: str, group: _PartitionGroup, key: str) -> list[torch.Tensor]:
        """The partitions one partition group held of `name`, in order, without their padding."""
        fragments = sorted(self.groups[name][group], key=lambda fragment: fragment.partition_rank)
        if [fragment.partition_rank for fragment in fragments] != list(range(len(group.ranks))):
            raise FileNotFoundError(f"{self.checkpoint_dir}: partitions of `{name}` are missing or repeated.")
        return [self._flat_tensor(f, key).narrow(0, f.offset, f.numel) for f in fragments if f.numel > 0]

    def whole_tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        """
        The whole parameter `name` (`key`: "fp32" for the master weights, or an optimizer state such as "exp_avg"). An
        expert parameter was partitioned over one expert-data-parallel group per expert-parallel rank: DeepSpeed lays
        the expert-parallel groups out on consecutive ranks, so EP rank e's group starts at global rank e, and the
        whole tensor is the groups' slices concatenated in that order.
        """
        if name not in self.groups:
            raise KeyError(name)
        groups = sorted(self.groups[name], key=lambda group: group.ranks[0])
        shapes = [self.shapes[f"{name}@{group.ranks}"] for group in groups]
        if len(groups) == 1 and not groups[0].is_expert:
            return torch.cat(self._partitions(name, groups[0], key)).view(shapes[0])
        if not all(group.is_expert for group in groups) or [g.ranks[0] for g in groups] != list(range(len(groups))):
            raise ValueError(
                f"{self.checkpoint_dir}: `{name}` was partitioned over the groups {[g.ranks for g in groups]}, which "
                "are not the expert-data-parallel groups of consecutive expert-parallel ranks."
            )
        # The groups' slices follow each other on dim 0: the whole tensor is every group's partitions in order, copied
        # once (not each group's slice, then the slices again).
        partitions = [partition for group in groups for partition in self._partitions(name, group, key)]
        return torch.cat(partitions).view(sum(shape[0] for shape in shapes), *shapes[0][1:])

    def trained_names(self) -> list[str]:
        """The parameters the optimizer held (the stage-1/2 reader, `SavedZero12Checkpoint`, has the same)."""
        return list(self.groups)

    def client_state(self) -> dict:
        """What `save_checkpoint(client_state=...)` was given, as `load_checkpoint` returns it."""
        return {k: v for k, v in self.model_states[0].items() if k not in _DEEPSPEED_MODEL_STATE_KEYS}

    def topology(self) -> str:
        expert_groups = {g.ranks for groups in self.groups.values() for g in groups if g.is_expert}
        if not expert_groups:
            return f"{self.world_size} ranks without expert parallelism"
        return f"{self.world_size} ranks, EP {len(expert_groups)}"


def _local_partition(whole: torch.Tensor, param) -> torch.Tensor:
    """This rank's ZeRO-3 partition of `whole` for `param`: elements [r * n, (r + 1) * n) of it, zero-padded to n."""
    import torch.distributed as dist

    numel = param.partition_numel()
    start = dist.get_rank(group=param.ds_process_group) * numel
    flat = whole.reshape(-1)[start : start + numel]
    if flat.numel() < numel:
        flat = torch.cat([flat, flat.new_zeros(numel - flat.numel())])
    return flat


def _whole_for_this_rank(saved: SavedZero3Checkpoint, name: str, param, key: str) -> torch.Tensor:
    """The tensor `param` stands for on this rank: the whole parameter, or for an expert, this rank's experts."""
    whole = saved.whole_tensor(name, key)
    layout = getattr(param, "expert_shard_layout", None)
    expected = tuple(layout.global_shape) if layout is not None else tuple(getattr(param, "ds_shape", param.shape))
    if tuple(whole.shape) != expected:
        raise ValueError(
            f"`{name}` has the shape {tuple(whole.shape)} in {saved.checkpoint_dir} and {expected} in this model: not "
            "a checkpoint of this model."
        )
    if layout is not None:
        whole = whole.chunk(layout.ep_size, dim=layout.shard_dim)[layout.ep_rank]
    return whole


def _trained_parameters(engine) -> dict[str, "torch.nn.Parameter"]:
    """The parameters the optimizer holds. Frozen ones are not in its states: they keep what the model loaded."""
    return {name: param for name, param in engine.module.named_parameters() if param.requires_grad}


def _check_same_parameters(saved, params: dict):
    trained = set(saved.trained_names())
    missing, unexpected = sorted(set(params) - trained), sorted(trained - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{saved.checkpoint_dir} is not a checkpoint of this model: parameters missing from it {missing[:5]}, "
            f"parameters this model does not have {unexpected[:5]}."
        )


def create_adam_states(optimizer, flat_partitions):
    """
    Adam's states of each flat fp32 partition (the ZeRO optimizer's, of the torch `optimizer` it wraps), zero, where
    the optimizer has none yet: torch's Adam creates them at its first step, so an engine that has not stepped has none
    to load the checkpoint's into. As torch creates them.
    """
    for flat in flat_partitions:
        state = optimizer.state[flat]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in MOMENT_KEYS:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def _load_parameters(engine, saved: SavedZero3Checkpoint, load_optimizer_states: bool):
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    if load_optimizer_states:
        create_adam_states(engine.optimizer.optimizer, engine.optimizer.fp32_partitioned_groups_flat)
    params = _trained_parameters(engine)
    _check_same_parameters(saved, params)
    for name, param in params.items():
        weight = _local_partition(_whole_for_this_rank(saved, name, param, "fp32"), param)
        param.ds_tensor.data.copy_(weight.to(param.ds_tensor.dtype))
        # The fp32 master too, or the next step would write the master the engine started from back into the model
        safe_set_local_fp32_param(param, weight)
        if load_optimizer_states:
            for key in MOMENT_KEYS:
                moment = _local_partition(_whole_for_this_rank(saved, name, param, key), param)
                safe_set_local_optimizer_state(param, moment, key)


def load_optimizer_step_and_hyperparameters(optimizer, flat_partitions, saved):
    """The step count of every flat fp32 partition of the torch `optimizer` (Adam's bias correction), and lr, betas,
    ... of the param groups (`apply_saved_hyperparameters`: a checkpoint of another stage may have another number of
    groups)."""
    step = saved.step
    if step is not None:
        for flat in flat_partitions:
            state = optimizer.state[flat]
            state["step"] = torch.tensor(step, dtype=torch.float32) if torch.is_tensor(state.get("step")) else step
    apply_saved_hyperparameters(optimizer, saved)


# Keys of a param group that say which group it is (DeepSpeed's MoE split names its groups), not how it optimizes
_GROUP_IDENTITY_KEYS = frozenset({"params", "name", "moe"})


def apply_saved_hyperparameters(optimizer, saved):
    """
    The checkpoint's lr, betas, ... onto the torch optimizer's param groups: group by group when it has as many, else
    the one setting all of its groups share. ZeRO stages 1 and 2 split an expert-parallel model's groups into dense
    and MoE groups of the same settings, ZeRO-3 does not: a resume across stages meets another number of groups.
    """
    saved_groups = [
        {key: value for key, value in group.items() if key not in _GROUP_IDENTITY_KEYS}
        for group in saved.optimizer_hyperparameters()
    ]
    if len(saved_groups) == len(optimizer.param_groups):
        for group, saved_group in zip(optimizer.param_groups, saved_groups):
            group.update(saved_group)
    elif all(group == saved_groups[0] for group in saved_groups):
        for group in optimizer.param_groups:
            group.update(saved_groups[0])
    else:
        raise ValueError(
            f"{saved.checkpoint_dir} has {len(saved_groups)} optimizer param groups of different settings, this "
            f"optimizer {len(optimizer.param_groups)}: build the optimizer with the same param groups as the run that "
            "saved it."
        )


def read_checkpoint(checkpoint_dir: str):
    """The reader of the DeepSpeed checkpoint in `checkpoint_dir` as whole tensors: `SavedZero12Checkpoint` for one
    of ZeRO stage 1 or 2 of an expert-parallel model, else `SavedZero3Checkpoint`."""
    from .deepspeed_expert_parallel_zero12_reader import SavedZero12Checkpoint, is_expert_parallel_zero12_checkpoint

    if is_expert_parallel_zero12_checkpoint(checkpoint_dir):
        return SavedZero12Checkpoint(checkpoint_dir)
    return SavedZero3Checkpoint(checkpoint_dir)


def _load_engine_counters(engine, saved: SavedZero3Checkpoint, load_lr_scheduler_states: bool):
    model_state = saved.model_states[0]
    engine.global_steps = model_state.get("global_steps", engine.global_steps)
    engine.global_samples = model_state.get("global_samples", engine.global_samples)
    engine.skipped_steps = model_state.get("skipped_steps", engine.skipped_steps)
    if load_lr_scheduler_states and engine.lr_scheduler is not None and model_state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model_state["lr_scheduler"])


def _check_engine_supported(engine):
    """
    A ZeRO-3 engine, with its partitions in memory: offload to the CPU is fine (the partitions and the fp32 master are
    written where they live), NVMe offload is not (they are swapped out to files the loader does not write). The
    offload device is read from the config (`offload_device`): accelerate's generated config says "no offload" with
    `{device: none}` sections.
    """
    if not engine.zero_optimization_partition_weights():
        raise NotImplementedError(
            "load_checkpoint_on_new_topology loads DeepSpeed ZeRO stage 3 checkpoints into a ZeRO-3 engine; this "
            f"engine runs ZeRO stage {engine.zero_optimization_stage()}."
        )
    on_nvme = [
        what for what, offload in (("parameters", engine.zero_offload_param()),
                                   ("optimizer states", engine.zero_offload_optimizer()))
        if offload_device(offload) == "nvme"
    ]
    if on_nvme:
        raise NotImplementedError(
            f"load_checkpoint_on_new_topology does not support NVMe offload (here of the {' and '.join(on_nvme)}): "
            "it writes each rank's partitions in memory, where NVMe offload swaps them out. Resume on the new "
            'topology with offload to the CPU (`{"device": "cpu"}`) or none, save a checkpoint there '
            "(`engine.save_checkpoint`), then resume from that checkpoint with NVMe offload on the same topology "
            "(DeepSpeed's own `load_checkpoint`)."
        )


def load_checkpoint_on_new_topology(
    engine, load_dir: str, tag: str | None = None, load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
):
    """
    `engine.load_checkpoint(load_dir, tag)` for a DeepSpeed ZeRO-3 checkpoint written on another topology: another
    number of ranks, another EP size (`DistributedConfig(ep_size=...)`), or a model loaded without expert parallelism
    (and back). Call it on every rank, in place of `engine.load_checkpoint`, after `deepspeed.initialize` (or
    `accelerator.prepare`: pass the prepared model, which is the engine). It works for the same topology too.

    It loads the model's weights (from the fp32 master weights of the checkpoint), the fp32 master weights and, with
    `load_optimizer_states`, Adam's `exp_avg` and `exp_avg_sq` and its step count, exactly: each rank's partitions are
    cut from the whole tensors the old ranks' partitions make up. Also the optimizer's hyperparameters, the engine's
    step counters, and with `load_lr_scheduler_states` DeepSpeed's learning-rate scheduler. Not the random number
    generators' states, nor anything else the old ranks saved beside DeepSpeed's files (e.g. the Trainer's
    `rng_state_N.pth`). Every rank reads the model and optimizer states of every old rank (memory-mapped, one parameter
    at a time), so all of them must be readable from every rank.

    Returns `(load_path, client_state)` as `engine.load_checkpoint` does. An error on any rank (a missing file, another
    model) is raised on every rank.
    """
    import torch.distributed as dist

    checkpoint_dir = None
    with errors_raised_on_every_rank("Loading the checkpoint on a new topology"):
        _check_engine_supported(engine)
        checkpoint_dir = resolve_checkpoint_dir(load_dir, tag)
        saved = read_checkpoint(checkpoint_dir)
        with torch.no_grad():
            _load_parameters(engine, saved, load_optimizer_states)
        if load_optimizer_states:
            load_optimizer_step_and_hyperparameters(
                engine.optimizer.optimizer, engine.optimizer.fp32_partitioned_groups_flat, saved
            )
        _load_engine_counters(engine, saved, load_lr_scheduler_states)
        client_state = saved.client_state()
        logger.info(
            f"Loaded {checkpoint_dir} ({saved.topology()}) on {dist.get_world_size()} ranks, optimizer states "
            f"{'included' if load_optimizer_states else 'not loaded'}."
        )
    return checkpoint_dir, client_state


def checkpoint_topology_differs(engine, checkpoint_dir: str) -> bool:
    """
    Whether the DeepSpeed ZeRO-3 checkpoint in `checkpoint_dir` was written on another topology than `engine`'s:
    another number of ranks, or other ZeRO-3 sub-groups (another EP size, or expert parallelism turned on or off,
    changes the shapes of the expert parameters each rank holds and the sub-groups they are in). Each rank reads the
    file of its own rank index (which DeepSpeed's node-local storage keeps on that rank's node): the data-parallel
    world size and parameter shapes saved there against its own. A collective: the ranks agree on the answer (any rank
    that finds a difference, or no file of its own, decides).
    """
    import torch.distributed as dist

    differs = None
    with errors_raised_on_every_rank("Reading the checkpoint's topology"):
        own = _checkpoint_files(checkpoint_dir, "model").get(dist.get_rank())
        differs = own is None
        if not differs:
            saved = torch.load(own, map_location="cpu", weights_only=False, mmap=True)
            current_shapes = engine._get_zero_param_shapes()
            differs = saved.get("dp_world_size", dist.get_world_size()) != dist.get_world_size() or [
                list(group.items()) for group in saved["param_shapes"]
            ] != [list(group.items()) for group in current_shapes]
    answers = [None] * dist.get_world_size()
    dist.all_gather_object(answers, differs)
    return any(answers)


# Where the fork's ways to change topology are described, for the errors that send users there
_RESHARDING_DOCS = 'docs/ep_deepspeed.md, "Resuming on another topology" and "Universal Checkpoint"'
# The ZeRO-3 placement family the fork gives expert parameters (as DeepSpeed's AutoEP does), recorded per sub-group
_EXPERT_FAMILY = "autoep_expert"


def _universal_checkpoint_dir(load_dir: str, tag: str | None) -> str | None:
    """The folder DeepSpeed's universal loader reads: `load_dir/tag`, the tag from `load_dir/latest_universal` (which
    `ds_to_universal` writes beside its output folder) unless given; None without one (DeepSpeed then raises)."""
    if tag is None:
        latest = os.path.join(load_dir, "latest_universal")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
    return os.path.join(load_dir, str(tag))


def universal_checkpoint_has_experts(universal_dir: str) -> bool:
    """
    Whether the Universal Checkpoint in `universal_dir` (the folder `ds_to_universal` wrote) was converted from a
    ZeRO-3 checkpoint whose trained experts were partitioned over expert-data-parallel groups (an expert-parallel model
    of this fork). `ds_to_universal` copies rank 0's optimizer states, with the placement of their sub-groups
    (`ds_zero_partition_groups`), into `zero/optimizer_state.pt`; a checkpoint without experts partitioned so has
    none. Frozen parameters are not in a Universal Checkpoint: the model keeps what it loaded.
    """
    path = os.path.join(universal_dir, "zero", "optimizer_state.pt")
    if not os.path.isfile(path):
        return False  # not a Universal Checkpoint: DeepSpeed's loader says so
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    groups = state.get("ds_zero_partition_groups") or []
    return any(_EXPERT_FAMILY in group.get("families", ()) for group in groups)


def _universal_checkpoint_of_expert_parallel_model_error() -> NotImplementedError:
    return NotImplementedError(
        "DeepSpeed's Universal Checkpoint cannot be loaded into an expert-parallel model: its loader "
        '(`"checkpoint": {"load_universal": true}` in the DeepSpeed config) cuts each parameter\'s ZeRO-3 partition '
        "out of the whole tensor, where each rank of this model holds the experts of its EP rank only. The fork "
        "changes the topology itself, from the checkpoint `ds_to_universal` read (the `global_stepN` folder, with its "
        "`latest` file): remove `load_universal` from the DeepSpeed config and call "
        "`engine.load_checkpoint(load_dir)` (or `accelerator.load_state`, the Trainer's `resume_from_checkpoint`, "
        "`load_checkpoint_on_new_topology(engine, load_dir)`), which reshards ZeRO-3 checkpoints, with or without "
        f"expert parallelism, to any number of ranks and EP size. See {_RESHARDING_DOCS}."
    )


def _universal_checkpoint_with_experts_error(universal_dir: str) -> NotImplementedError:
    return NotImplementedError(
        f"{universal_dir} is a Universal Checkpoint converted from a checkpoint of an expert-parallel model: "
        "`ds_to_universal` does not know where transformers' expert-parallel ranks keep their experts and joins the "
        "partitions of an expert tensor in rank order, which puts experts in the wrong places whenever the run had "
        "fewer EP ranks than ranks. Load the checkpoint `ds_to_universal` read (the `global_stepN` folder, with its "
        "`latest` file) without `load_universal` in the DeepSpeed config, with "
        "`load_checkpoint_on_new_topology(engine, load_dir)` (or the Trainer's `resume_from_checkpoint`), which "
        f"reshards it for this model and topology. See {_RESHARDING_DOCS}."
    )


def refuse_universal_checkpoint_if_wrong(engine, load_dir: str, tag: str | None = None):
    """
    Before DeepSpeed's universal loader runs (`load_universal` in the engine's config), on every rank: refuse what it
    would load wrong. Into an expert-parallel model, any Universal Checkpoint (its loader partitions whole tensors over
    the expert-data-parallel group as if each rank held every expert: it stops on a size mismatch or loads other
    ranks' experts). Into another model, one converted from an expert-parallel checkpoint (`ds_to_universal` scrambles
    the experts of a run with more ranks than EP ranks). Models with DeepSpeed's own MoE layers (AutoEP) keep
    DeepSpeed's loader, which reads the expert metadata they write.

    The first refusal needs nothing but the model, the same on every rank, so every rank raises it without a
    collective; the second reads the checkpoint, and an error on any rank is raised on every rank.
    """
    from .deepspeed_expert_parallel_save import _expert_parallel_models_in

    if _expert_parallel_models_in(engine.module):
        raise _universal_checkpoint_of_expert_parallel_model_error()
    if getattr(engine, "has_moe_layers", False):
        return
    with errors_raised_on_every_rank("Checking the Universal Checkpoint"):
        universal_dir = _universal_checkpoint_dir(load_dir, tag)
        if universal_dir is not None and universal_checkpoint_has_experts(universal_dir):
            raise _universal_checkpoint_with_experts_error(universal_dir)


def deepspeed_load_checkpoint_on_any_topology(engine, checkpoint_path: str, load_module_strict: bool = True):
    """
    The Trainer's resume from a checkpoint folder (`checkpoint-N`, holding DeepSpeed's `global_stepN`): DeepSpeed's
    `load_checkpoint` when the checkpoint was written on this topology, `load_checkpoint_on_new_topology` when it was
    written on another number of ranks or EP size under ZeRO-3, which DeepSpeed's loader refuses. Also from each
    node's own disk (`save_on_each_node`, DeepSpeed's node-local storage): DeepSpeed writes the `latest` tag file on the
    main node only, so the tag is the folder's `global_step*` (`resolve_checkpoint_dir`).
    """
    from .deepspeed import deepspeed_load_checkpoint

    if engine.load_universal_checkpoint():
        # DeepSpeed's Universal Checkpoint, the topology its business: loaded as upstream unless it would load wrong
        refuse_universal_checkpoint_if_wrong(engine, checkpoint_path)
        with _topology_checked(engine):
            deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=load_module_strict)
        return
    if engine.zero_optimization_partition_weights() and glob.glob(os.path.join(checkpoint_path, "global_step*")):
        checkpoint_dir = None
        with errors_raised_on_every_rank("Reading the checkpoint's topology"):
            checkpoint_dir = resolve_checkpoint_dir(checkpoint_path)
        if checkpoint_topology_differs(engine, checkpoint_dir):
            logger.info(f"{checkpoint_path} was saved on another topology: resharding it for this one.")
            load_checkpoint_on_new_topology(engine, checkpoint_path)
            return
        # The same topology: DeepSpeed's loader, without the check again (`_reshard_expert_parallel_checkpoints_too`)
        with _topology_checked(engine):
            if os.path.isfile(os.path.join(checkpoint_path, "latest")):
                deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=load_module_strict)
                return
            load_path, _ = engine.load_checkpoint(
                checkpoint_path, tag=os.path.basename(checkpoint_dir), load_module_strict=load_module_strict,
                load_optimizer_states=True, load_lr_scheduler_states=True,
            )
        if load_path is None:
            raise ValueError(f"[deepspeed] failed to resume from checkpoint {checkpoint_path}")
        return
    deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=load_module_strict)


@contextlib.contextmanager
def _topology_checked(engine):
    """While the caller loads a checkpoint it found to be of this topology: the `load_checkpoint` wrap does not read
    and agree on it a second time."""
    engine._expert_parallel_topology_checked = True
    try:
        yield
    finally:
        engine._expert_parallel_topology_checked = False


def _reshard_expert_parallel_checkpoints_too(engine_class):
    """
    Make `engine_class.load_checkpoint` (behind `accelerator.load_state` too) load a checkpoint written on another
    topology into an engine holding an expert-parallel model under ZeRO-3, through `load_checkpoint_on_new_topology`,
    where DeepSpeed's own loader refuses it (on the ranks it adds, with a bare `AssertionError`). The same topology,
    other models, `load_module_only` and a `custom_load_fn` keep DeepSpeed's loader; so does a checkpoint whose tag
    cannot be found, for which DeepSpeed warns and returns `(None, None)`. With `load_universal` in the engine's
    config, DeepSpeed's universal loader, after `refuse_universal_checkpoint_if_wrong`. Done once, when the first such
    model is handed over to DeepSpeed, as for the 16-bit consolidation.
    """
    load = engine_class.load_checkpoint
    if getattr(load, "reshards_expert_parallel_models", False):
        return

    @wraps(load)
    def load_checkpoint_on_any_topology(engine, load_dir, tag=None, load_module_strict=True,
                                        load_optimizer_states=True, load_lr_scheduler_states=True,
                                        load_module_only=False, custom_load_fn=None):
        from .deepspeed_expert_parallel_save import _expert_parallel_models_in

        def deepspeeds_own():
            return load(engine, load_dir, tag=tag, load_module_strict=load_module_strict,
                        load_optimizer_states=load_optimizer_states,
                        load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                        custom_load_fn=custom_load_fn)

        if getattr(engine, "_expert_parallel_topology_checked", False):
            return deepspeeds_own()
        if engine.load_universal_checkpoint():
            # DeepSpeed's universal loader also with `load_module_only`: refused before it runs where it would be wrong
            refuse_universal_checkpoint_if_wrong(engine, load_dir, tag)
            return deepspeeds_own()
        if load_module_only or custom_load_fn is not None or not _expert_parallel_models_in(engine.module):
            return deepspeeds_own()
        if expert_parallel_zero_stage(engine.module) in (1, 2):
            return _load_zero12_checkpoint(engine, load_dir, tag, load_optimizer_states, load_lr_scheduler_states,
                                           deepspeeds_own)
        checkpoint_dir = _checkpoint_dir_found_on_every_rank(load_dir, tag)
        if checkpoint_dir is None or not checkpoint_topology_differs(engine, checkpoint_dir):
            return deepspeeds_own()
        logger.info(f"{checkpoint_dir} was saved on another topology: resharding it for this one.")
        return load_checkpoint_on_new_topology(engine, load_dir, tag, load_optimizer_states, load_lr_scheduler_states)

    load_checkpoint_on_any_topology.reshards_expert_parallel_models = True
    engine_class.load_checkpoint = load_checkpoint_on_any_topology


def _checkpoint_dir_found_on_every_rank(load_dir: str, tag: str | None) -> str | None:
    """The checkpoint's folder (`resolve_checkpoint_dir`) when every rank finds it, else None: DeepSpeed's loader then
    warns and returns `(None, None)`. A collective."""
    import torch.distributed as dist

    try:
        checkpoint_dir = resolve_checkpoint_dir(load_dir, tag)
    except FileNotFoundError:
        checkpoint_dir = None
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, checkpoint_dir is not None)
    return checkpoint_dir if all(found) else None


def _load_zero12_checkpoint(engine, load_dir, tag, load_optimizer_states, load_lr_scheduler_states, deepspeeds_own):
    """
    An expert-parallel engine under ZeRO stage 1 or 2: DeepSpeed's loader (the experts from DeepSpeed's per-expert
    files, see `deepspeed_expert_parallel_zero12`) when every rank found the checkpoint written on this topology
    (`topology_problem`), its errors raised on every rank, then the optimizer state of every group linked to the
    parameters again, which DeepSpeed's load unlinks. A checkpoint of another topology or stage is loaded as whole
    tensors (`load_whole_tensors`) when the fork can read it (ZeRO-3, or stage 1/2 of an expert-parallel model), and
    refused on every rank otherwise.
    """
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    checkpoint_dir = _checkpoint_dir_found_on_every_rank(load_dir, tag)
    problem = topology_problem(engine, checkpoint_dir) if checkpoint_dir is not None else None
    if problem is not None:
        from .deepspeed_expert_parallel_zero12_reader import is_expert_parallel_zero12_checkpoint

        try:
            readable_here = bool(_checkpoint_files(checkpoint_dir, "model")) or is_expert_parallel_zero12_checkpoint(
                checkpoint_dir
            )
        except Exception as e:  # noqa: BLE001 (answered as unreadable on every rank, not raised before the collective)
            logger.warning(f"Reading {checkpoint_dir} failed: {type(e).__name__}: {e}")
            readable_here = False
        readable = [None] * dist.get_world_size()
        dist.all_gather_object(readable, readable_here)
        if not all(readable):
            raise other_topology_error(engine, checkpoint_dir, problem)
        client_state = None
        with errors_raised_on_every_rank("Loading the checkpoint on a new topology"):
            saved = read_checkpoint(checkpoint_dir)
            logger.info(f"{checkpoint_dir} was saved on another topology ({saved.topology()}): loading it as whole "
                        "tensors.")
            load_whole_tensors(engine, saved, load_optimizer_states, load_lr_scheduler_states)
            client_state = saved.client_state()
        return checkpoint_dir, client_state
    result = None
    # Each rank reads its own experts' files: one that fails (a missing or foreign file) must not leave the others
    # waiting in their first collective after the load
    with errors_raised_on_every_rank("Loading the checkpoint"):
        result = deepspeeds_own()
    if load_optimizer_states and isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        link_optimizer_state_of_every_group(engine.optimizer)
    return result


def reshard_in_deepspeed_load_checkpoint():
    """
    Called when a model is handed over to DeepSpeed (`prepare_expert_parallel_model_for_deepspeed`): from then on,
    `engine.load_checkpoint` and `accelerator.load_state` resume expert-parallel models on any topology
    (`_reshard_expert_parallel_checkpoints_too`); and the checkpoints `engine.save_checkpoint` writes for them carry
    the fork's `zero_to_fp32.py`, which reads them offline (`write_own_recovery_script_in_deepspeed_checkpoints`).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    from .deepspeed_expert_parallel_checkpoint import write_own_recovery_script_in_deepspeed_checkpoints

    _reshard_expert_parallel_checkpoints_too(DeepSpeedEngine)
    write_own_recovery_script_in_deepspeed_checkpoints()
