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
Memory planner for expert parallelism (EP) under DeepSpeed ZeRO stages 1, 2 and 3: "will it fit, and at which stage?",
from a config alone.

    python -m transformers.integrations.deepspeed_expert_parallel_memory Qwen/Qwen3-30B-A3B --world-size 16 \
        --ep-size 8 --dtype bf16 --optimizer adamw --ranks-per-node 8 [--stage 2] [--gpu-memory 80] \
        [--offload-optimizer] [--deepspeed ds.json]

`plan_memory(config_or_path, world_size, ep_size, ...)` builds the model on the meta device (nothing is read or
allocated), splits its parameters into experts (the parameters the model's EP plan places with an expert style) and
dense ones, and applies the partitioning rules of DeepSpeed 0.19.8 for the stage of `ZeroOptions.stage`, as the fork
hands the model over (`deepspeed_expert_parallel`). `compare_stages` plans stages 1, 2 and 3 side by side.

ZeRO-3 (`runtime/zero/partition_parameters.py`, `stage3.py`, `parameter_offload.py`):

- a dense parameter is partitioned over all W ranks, an expert parameter (each rank holds E/P experts of it) over its
  expert-data-parallel group of W/P ranks; a partition is `ceil(numel / group size)` elements (the tensor is padded to
  a multiple of the group size, `_aligned_size`);
- a parameter of at most `stage3_param_persistence_threshold` elements (within `stage3_model_persistence_threshold`
  in total, in `named_parameters` order, `mark_persistent_parameters`) also stays whole on the device all along;
- the low-precision partitions are one flat buffer; gradients one flat buffer of the partitions in the gradient
  accumulation dtype (the model's unless `data_types.grad_accum_dtype`), on the host with `offload_optimizer`, where an
  fp32 gradient buffer per sub-group comes on top; the fp32 master partitions are always a copy, fp32 models included
  (`_create_fp32_partitions` would reuse the partitions of an fp32 model, but compares their `torch.device` with the
  device's name, a string, which is never equal with torch 2.13; measured); AdamW keeps `exp_avg` and `exp_avg_sq`
  (fp32) per master element, SGD without momentum nothing;
- working buffers: the reduce bucket (`reduce_bucket_size` elements of the gradient dtype) and the gathered parameters
  (the running module, prefetched ones up to `stage3_prefetch_bucket_size`, kept ones, all capped at
  `stage3_max_live_parameters` but never below the largest module).

ZeRO-1 and 2 (`runtime/zero/stage_1_and_2.py`, the fork's hand-over splitting the client optimizer with DeepSpeed's
`split_params_into_different_moe_groups_for_optimizer`, `zero12_optimizer_groups`):

- every rank keeps its parameters whole (the dense ones and its E/P experts), flattened per optimizer group: the dense
  parameters in one group, the experts in chunks of at most `MOE_GROUP_MAX_NUMEL` elements; each group is padded to a
  multiple of 2 x its group size and split in equal partitions, dense groups over all W ranks, expert chunks over the
  W/P ranks of the expert-data-parallel group;
- the fp32 master partitions are a copy (fp32 models included) and the optimizer state is per master element, as at
  ZeRO-3; the expert part of them is X/W whatever P;
- gradients: stage 1 keeps the whole gradients of the rank's parameters until the accumulation boundary; both stages
  copy the reduced gradients the rank owns into one buffer (`grads_in_partition`, model dtype), the sum of the *whole*
  parameters that overlap the rank's partitions (a parameter cut by a partition boundary counts whole on both ranks);
  with `grad_accum_dtype` fp32 and a 16-bit model, one fp32 buffer of exactly the partition per group instead;
- `offload_optimizer`: master, optimizer state, an fp32 gradient partition and a 16-bit partition buffer per group on
  the host, no `grads_in_partition`, and a staging buffer of the largest parameter on the host and on the device;
- at stage 1, bf16 with `grad_accum_dtype` fp32 and no offload, DeepSpeed takes `BF16_Optimizer`: whole fp32
  gradients of the local parameters kept all along, no partition buffer;
- working buffers: the reduce bucket (x 2 with `overlap_comm`, off by default at stages 1 and 2), released after the
  backward, and at the step the fp32 gradient of one group's partition at a time (`step_transient_bytes`).

Load and save peaks follow the fork's loader and streamed save (`load_working_set`, `save_working_set`: one small
function each, measured by tests/deepspeed/test_ep_zero3_memory_plan.py). At stages 1 and 2 the load with EP is the
same as at ZeRO-3 (measured); the save, and the load without EP, are not modelled. Activations, the CUDA context,
allocator fragmentation and communication buffers are not modelled: `activation_inputs` lists what an activation
estimate needs.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..utils import is_torch_available
from .deepspeed_expert_parallel import offload_device


if is_torch_available():
    import torch


GIB = 1024**3
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16"}
# Optimizer state elements (fp32) per master element: AdamW `exp_avg` + `exp_avg_sq`, SGD `momentum_buffer` if any
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1}
# Save working sets in units of the largest full tensor (one layer's fused experts, all of them), memory in use as
# measured on CPU by tests/deepspeed/test_ep_zero3_memory_plan.py (glibc's mmap threshold fixed, so that freed memory
# goes back at once; with glibc's default, RSS can peak up to about one such tensor higher, `make bench-save`).
# Save where every rank writes (EP size P, one host or a file system every node sees): each rank converts its own
# experts whose keys the conversion copies (the gate and up projections split from the fused tensor), 1/P, read in
# place where the expert-data-parallel group is one rank, else gathered over it first, 2/P; the rest is written in
# place from the ZeRO-3 partitions. One writer (nodes with a disk each): 2 + 1/P (the full tensor, its gathered
# experts, the copies written out), the others 2/P. Consolidated save (no EP): the whole model plus 2 (writing rank)
# and 2.5 (the others).
PARALLEL_SAVE_COPIES = 1.0
PARALLEL_SAVE_GATHERED_COPIES = 2.0
SAVE_WRITER_COPIES = 2.0
SAVE_OTHER_RANK_COPIES = 2.0
CONSOLIDATED_SAVE_COPIES = 2.0
CONSOLIDATED_OTHER_RANK_COPIES = 2.5
ZERO_STAGES = (1, 2, 3)
# ZeRO-1/2 pad each flat parameter group to a multiple of this many elements per rank of its group
# (`nccl_start_alignment_factor`: 4-byte aligned all-gathers of 16-bit partitions)
ZERO12_ALIGNMENT_FACTOR = 2
# `split_params_into_different_moe_groups_for_optimizer` cuts each expert group into chunks of at most this many
# elements (its default `max_group_size`), each chunk an optimizer group of its own
MOE_GROUP_MAX_NUMEL = 178_956_971


@dataclass(frozen=True)
class ZeroOptions:
    """The ZeRO settings that decide memory, DeepSpeed's defaults unless given (`from_deepspeed_config`); the
    `stage3_*` ones and `offload_param` only apply to stage 3."""

    offload_param: bool = False
    offload_optimizer: bool = False
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = sys.maxsize
    max_live_parameters: int = 1_000_000_000
    prefetch_bucket_size: int = 50_000_000
    reduce_bucket_size: int = 500_000_000
    grad_accum_dtype: str | None = None
    stage: int = 3
    overlap_comm: bool | None = None  # None: DeepSpeed's default, on at stage 3 only

    @property
    def overlaps_communication(self) -> bool:
        return self.stage == 3 if self.overlap_comm is None else self.overlap_comm

    @classmethod
    def from_deepspeed_config(cls, config: dict | str | Path, hidden_size: int | None = None, **overrides):
        """
        Read a DeepSpeed config (dict or JSON file). `"auto"` values take what transformers' `HfTrainerDeepSpeedConfig`
        fills in from the model's hidden size h: reduce bucket h*h, prefetch bucket 0.9*h*h, persistence 10*h.
        """
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        zero = config.get("zero_optimization", {})
        h = hidden_size or 0
        auto = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                "stage3_param_persistence_threshold": 10 * h}

        def value(key, default):
            found = zero.get(key, default)
            if found == "auto":
                if not h:
                    raise ValueError(f"`{key}` is 'auto': give the model's hidden size")
                return auto[key]
            return int(found)

        def offloads(key):
            # To the host; NVMe offload is not modelled (its states would count as on the GPU)
            return offload_device(zero.get(key)) == "cpu"

        defaults = cls()
        options = {
            "offload_param": offloads("offload_param"),
            "offload_optimizer": offloads("offload_optimizer"),
            "param_persistence_threshold": value("stage3_param_persistence_threshold",
                                              defaults.param_persistence_threshold),
            "model_persistence_threshold": value("stage3_model_persistence_threshold",
                                              defaults.model_persistence_threshold),
            "max_live_parameters": value("stage3_max_live_parameters", defaults.max_live_parameters),
            "prefetch_bucket_size": value("stage3_prefetch_bucket_size", defaults.prefetch_bucket_size),
            "reduce_bucket_size": value("reduce_bucket_size", defaults.reduce_bucket_size),
            "grad_accum_dtype": (config.get("data_types") or {}).get("grad_accum_dtype"),
            # DeepSpeed's default is 0 (no ZeRO), which `plan_memory` refuses
            "stage": int(zero.get("stage", 0)),
            "overlap_comm": zero.get("overlap_comm"),
        }
        options.update(overrides)
        return cls(**options)


@dataclass
class ParameterInfo:
    name: str
    module: str
    numel: int  # on this rank before partitioning: the whole tensor, for experts this rank's E/P experts
    is_expert: bool  # expert parallel: E/P experts per rank, partitioned over the expert-data-parallel group
    holds_experts: bool  # placed by the EP plan's expert styles (with or without EP)
    layer: str | None  # the decoder layer it belongs to, for the per-layer working sets
    # Elements the loader's conversion of it holds at its peak on one rank without EP (`conversion_working_numel`;
    # 0: loaded as stored)
    load_working_numel: int = 0


def _dtype(name: str):
    if isinstance(name, torch.dtype):
        return name
    try:
        return getattr(torch, DTYPES[str(name).lower()])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of {sorted(DTYPES)}") from None


def _element_size(dtype) -> int:
    return torch.tensor([], dtype=_dtype(dtype)).element_size()


def _load_config(config_or_path):
    from ..configuration_utils import PreTrainedConfig

    if isinstance(config_or_path, PreTrainedConfig):
        return config_or_path
    from ..models.auto import AutoConfig

    return AutoConfig.from_pretrained(config_or_path)


def _meta_model(config, dtype):
    """The model of `config` on the meta device: shapes only, nothing allocated, no weights read."""
    from ..models.auto import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))
        except ValueError:
            from ..models.auto import AutoModel

            return AutoModel.from_config(config, dtype=_dtype(dtype))


def _layer_of(name: str) -> str | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return None


def model_parameters(model, ep_size: int, world_size: int = 1) -> list[ParameterInfo]:
    """Every parameter with the elements a rank holds before ZeRO-3 partitions it (experts: E/P of them)."""
    from ..distributed.parallel_utils import _get_parameter_plan
    from .deepspeed_expert_parallel import _EXPERT_PARALLEL_STYLES, conversion_working_numel, expert_load_conversions

    plan = model.ep_plan
    if ep_size > 1 and not plan:
        raise ValueError(f"`ep_size={ep_size}` was requested, but {type(model).__name__} has no `ep_plan`")
    conversions = expert_load_conversions(model)
    infos = []
    for name, param in model.named_parameters():
        style = _get_parameter_plan(parameter_name=name, plan=plan, is_weight=True) if plan else None
        holds_experts = style in _EXPERT_PARALLEL_STYLES
        is_expert = holds_experts and ep_size > 1
        if is_expert and param.shape[0] % ep_size:
            raise ValueError(f"Cannot evenly shard {param.shape[0]} experts of `{name}` across {ep_size} EP ranks")
        numel = param.numel() // ep_size if is_expert else param.numel()
        working = (
            conversion_working_numel(conversions[name], param.shape[0], param.numel(), world_size)
            if name in conversions else 0
        )
        infos.append(ParameterInfo(name, name.rpartition(".")[0], numel, is_expert, holds_experts, _layer_of(name),
                                   working))
    return infos


@dataclass
class Bytes:
    """Bytes of one kind of state, dense parameters and experts apart, and where they live."""

    dense: int = 0
    experts: int = 0
    device: str = "gpu"

    @property
    def total(self) -> int:
        return self.dense + self.experts


@dataclass
class MemoryPlan:
    """The per-rank memory of one EP + ZeRO configuration, in bytes (see `plan_memory`)."""

    model: str
    world_size: int
    ep_size: int
    dtype: str
    optimizer: str
    zero: ZeroOptions
    ranks_per_node: int
    num_parameters: int
    num_expert_parameters: int
    # ZeRO-3: the partitions; ZeRO-1/2: the whole parameters (flat groups, padded)
    parameters: Bytes
    persistent_parameters: Bytes
    # ZeRO-3: the gradient partitions; ZeRO-1/2: the gradient partition buffer (`grads_in_partition`)
    gradients: Bytes
    offloaded_fp32_gradients: Bytes
    fp32_master: Bytes
    optimizer_state: Bytes
    reduce_bucket: int
    gathered_parameters: int
    prefetch_bucket: int
    # None where not modelled (ZeRO-1/2: the save, and the load without EP)
    load_share: int | None
    load_working_set: int | None
    # The part of the share that stays mapped from the checkpoint during the load (page cache: reclaimable)
    load_file_backed: int | None
    # With EP every rank writes (its working set is the writer's and the other ranks'), unless the nodes have a disk
    # each: rank 0 then writes alone (`save_single_writer_working_set`)
    save_writer_working_set: int | None
    save_other_working_set: int | None
    save_single_writer_working_set: int | None
    activation_inputs: dict = field(default_factory=dict)
    # ZeRO-1/2 only
    optimizer_class: str = "DeepSpeedZeroOptimizer_Stage3"
    # (experts?, ranks it is partitioned over, elements, partition elements) per optimizer group
    optimizer_groups: list = field(default_factory=list)
    whole_gradients: Bytes = field(default_factory=Bytes)
    offload_16bit_buffers: Bytes = field(default_factory=lambda: Bytes(device="host"))
    offload_staging_host: Bytes = field(default_factory=lambda: Bytes(device="host"))
    offload_staging_device: Bytes = field(default_factory=Bytes)
    # The largest fp32 gradient of a group's partition the step makes and frees (`step_transient_bytes`)
    step_transient: int = 0
    # `deepspeed.initialize` flattens one group at a time: a copy of the largest, on the device if it has room
    initialize_working_set: int = 0
    # The rank the gradient partition buffer is given for (the largest one's unless asked), and its range over ranks
    rank: int | None = None
    gradient_buffer_range: tuple = (0, 0)
    # What the buffer would be if it held the partitions only (the gradient state's ideal size, (D + X)/W elements)
    gradient_partitions: int = 0
    notes: list = field(default_factory=list)

    def states(self) -> dict[str, Bytes]:
        if self.zero.stage == 3:
            return {
                "parameter partitions": self.parameters,
                "persistent parameters (whole)": self.persistent_parameters,
                "gradient partitions": self.gradients,
                "fp32 gradients (offload)": self.offloaded_fp32_gradients,
                "fp32 master partitions": self.fp32_master,
                "optimizer state": self.optimizer_state,
            }
        states = {"parameters (whole)": self.parameters}
        if self.zero.stage == 1:
            states["gradients (whole, until the step)"] = self.whole_gradients
        states["gradient partition buffer"] = self.gradients
        if self.zero.offload_optimizer:
            states["fp32 gradients (offload)"] = self.offloaded_fp32_gradients
        states.update({"fp32 master partitions": self.fp32_master, "optimizer state": self.optimizer_state})
        if self.zero.offload_optimizer:
            states.update({
                "16-bit partitions (offload)": self.offload_16bit_buffers,
                "gradient staging (offload)": self.offload_staging_host,
                "gradient staging, device (offload)": self.offload_staging_device,
            })
        return states

    @property
    def state(self) -> int:
        """Everything ZeRO keeps per rank between steps (no working buffers); at stage 1 with the whole gradients."""
        return sum(state.total for state in self.states().values())

    @property
    def zero3_state(self) -> int:
        """`state`, by its name from when the planner covered ZeRO-3 only."""
        return self.state

    def working_buffers(self, device: str) -> int:
        """
        ZeRO-3: the reduce bucket and the gathered parameters. ZeRO-1/2: the reduce bucket(s) during the backward, or
        the fp32 gradient of one group's partition at the step, whichever is larger (the buckets are freed in between).
        """
        if self.zero.stage == 3:
            return self.reduce_bucket + self.gathered_parameters if device == "gpu" else 0
        bucket = self.reduce_bucket if device == "gpu" else 0
        at_step = self.step_transient if self.fp32_master.device == device else 0
        return max(bucket, at_step)

    def per_device(self, device: str) -> int:
        """ZeRO state plus working buffers on `device` ("gpu" or "host")."""
        state = sum(s.total for s in self.states().values() if s.device == device)
        return state + self.working_buffers(device)

    @property
    def load_peak(self) -> int | None:
        """Host memory of the rank at the peak of `from_pretrained`, mapped checkpoint pages included."""
        return None if self.load_share is None else self.load_share + self.load_working_set

    @property
    def load_peak_anonymous(self) -> int | None:
        """The part of `load_peak` that cannot be reclaimed (not the checkpoint's mapped pages)."""
        return None if self.load_peak is None else self.load_peak - self.load_file_backed

    @property
    def save_writer_peak(self) -> int | None:
        """The writing rank's peak during `save_pretrained`: its ZeRO state plus the save's working set."""
        return None if self.save_writer_working_set is None else self.state + self.save_writer_working_set

    def per_node(self, device: str) -> int:
        return self.per_device(device) * self.ranks_per_node

    def fits(self, gpu_memory: float) -> bool:
        """Whether the GPU figure (before activations) is within `gpu_memory` bytes."""
        return self.per_device("gpu") <= gpu_memory

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(state=self.state, zero3_state=self.state, load_peak=self.load_peak,
                   load_peak_anonymous=self.load_peak_anonymous, save_writer_peak=self.save_writer_peak,
                   gpu_per_rank=self.per_device("gpu"), host_per_rank=self.per_device("host"))
        return out

    def _unit(self) -> tuple[str, int]:
        # GiB, or MiB for small models (the tests' tiny ones)
        largest = max(self.state, self.load_peak or 0, self.save_writer_peak or 0)
        return ("GiB", GIB) if largest >= GIB else ("MiB", 2**20)

    def format(self) -> str:
        unit, scale = self._unit()

        def gib(value):
            return f"{value / scale:10.2f}"

        zero = self.zero
        offload = [what for what, on in (("param", zero.offload_param), ("optimizer", zero.offload_optimizer)) if on]
        stage_line = f"ZeRO-{zero.stage} ({self.optimizer_class}), offload: {', '.join(offload) or 'none'}"
        if zero.stage == 3:
            stage_line += f", persistence threshold {zero.param_persistence_threshold}"
        lines = [
            (f"{self.model}: {self.num_parameters / 1e9:.2f} B parameters "
             f"({self.num_expert_parameters / 1e9:.2f} B in "
            f"experts), {self.dtype}, {self.optimizer}"),
            (f"world size {self.world_size}, EP {self.ep_size} "
            f"(expert-data-parallel {self.world_size // self.ep_size}), {stage_line}"),
        ]
        if zero.stage != 3:
            lines += self._format_groups(scale, unit)
        lines += ["", f"per rank, {unit}                                dense    experts      total   where"]
        for label, state in self.states().items():
            lines.append(f"{label:40s}{gib(state.dense)} {gib(state.experts)} {gib(state.total)}   {state.device}")
        lines.append(f"{f'ZeRO-{zero.stage} state':40s}{'':22s}{gib(self.state)}")
        lines += self._format_working_buffers(gib, scale)
        lines += [
            "",
            f"{'GPU per rank':40s}{'':22s}{gib(self.per_device('gpu'))}   + activations (not modelled)",
            f"{'host per rank (training)':40s}{'':22s}{gib(self.per_device('host'))}",
        ]
        lines += self._format_load_and_save(gib, scale)
        lines += [
            "",
            f"per node ({self.ranks_per_node} ranks): GPU {self.per_node('gpu') / scale:.2f} {unit}, host (training) "
            f"{self.per_node('host') / scale:.2f} {unit}"
            + (f", host at load {self.load_peak * self.ranks_per_node / scale:.2f} {unit}" if self.load_peak else ""),
            *self.notes,
            "activations are not modelled; inputs: "
            + ", ".join(f"{k}={v}" for k, v in self.activation_inputs.items()),
        ]
        return "\n".join(lines)

    def _format_groups(self, scale, unit) -> list[str]:
        dense = [group for group in self.optimizer_groups if not group[0]]
        experts = [group for group in self.optimizer_groups if group[0]]
        line = "optimizer groups: "
        if dense:
            line += f"dense ({dense[0][2] / 1e6:.1f} M elements) over {dense[0][1]} ranks"
        if experts:
            line += (f"{', ' if dense else ''}experts in {len(experts)} chunk(s) of up to "
                     f"{max(group[2] for group in experts) / 1e6:.1f} M elements over {experts[0][1]} ranks each")
        low, high = self.gradient_buffer_range
        if self.gradients.total == 0:
            buffer = "gradient partition buffer: none (" + (
                "offload: the gradients go to the host's fp32 partitions)" if self.zero.offload_optimizer
                else "BF16_Optimizer: fp32 gradients of the whole flat groups)")
        elif low == high == self.gradient_partitions:
            buffer = "gradient partition buffer: one fp32 partition per group (fp32 accumulation)"
        else:
            buffer = (f"gradient partition buffer: rank {self.rank}'s; over the ranks {low / scale:.2f}-"
                      f"{high / scale:.2f} {unit}, the partitions alone {self.gradient_partitions / scale:.2f} (it "
                      "holds the parameters that overlap the rank's partitions whole)")
        return [line, buffer]

    def _format_working_buffers(self, gib, scale) -> list[str]:
        zero = self.zero
        buckets = " (x 2, overlap_comm)" if zero.overlaps_communication and zero.stage != 3 else ""
        lines = [f"{'reduce bucket' + buckets:40s}{'':22s}{gib(self.reduce_bucket)}   gpu"]
        if zero.stage == 3:
            lines.append(f"{'gathered parameters (up to)':40s}{'':22s}{gib(self.gathered_parameters)}   gpu"
                         f"   (prefetch bucket {self.prefetch_bucket / scale:.2f})")
            return lines
        lines += [
            (f"{'step: fp32 gradient of a partition':40s}{'':22s}{gib(self.step_transient)}   "
            f"{self.fp32_master.device}   (the largest group's; the working buffer is the larger of the two)"),
            (f"{'initialize: flat copy of a group':40s}{'':22s}{gib(self.initialize_working_set)}   "
            f"gpu if free, else host (DeepSpeed checks)"),
        ]
        return lines

    def _format_load_and_save(self, gib, scale) -> list[str]:
        if self.load_peak is None:
            not_modelled = f"not modelled at ZeRO-{self.zero.stage} without EP"
            lines = [f"{'load peak per rank':40s}{'':22s}{'-':>10s}   {not_modelled}"]
        else:
            lines = [
                (f"{'load peak per rank':40s}{'':22s}{gib(self.load_peak)}   rank's share "
                f"{self.load_share / scale:.2f}"
                f" + working set {self.load_working_set / scale:.2f}; not reclaimable "
                f"{self.load_peak_anonymous / scale:.2f} (the rest: checkpoint pages mapped, page cache)")
            ]
        if self.save_writer_peak is None:
            lines.append(f"{'save peak, writing rank':40s}{'':22s}{'-':>10s}   not modelled at ZeRO-{self.zero.stage}")
        else:
            lines.append(
                f"{'save peak, writing rank':40s}{'':22s}{gib(self.save_writer_peak)}   state + working set "
                f"{self.save_writer_working_set / scale:.2f} (other ranks + "
                f"{self.save_other_working_set / scale:.2f}; "
                f"one writer, nodes with a disk each: + {self.save_single_writer_working_set / scale:.2f})"
            )
        return lines


def _persistent(infos: list[ParameterInfo], zero: ZeroOptions) -> set[str]:
    """The parameters ZeRO-3 keeps whole on the device (`mark_persistent_parameters`, in `named_parameters` order)."""
    persistent, total = set(), 0
    for info in infos:
        if info.numel + total > zero.model_persistence_threshold:
            continue
        if info.numel <= zero.param_persistence_threshold:
            persistent.add(info.name)
            total += info.numel
    return persistent


def partition_numel(info: ParameterInfo, world_size: int, ep_size: int) -> int:
    """Elements of a rank's ZeRO-3 partition: padded to the group size, dense over W ranks, experts over W/P."""
    group = world_size // ep_size if info.is_expert else world_size
    return math.ceil(info.numel / group)


@dataclass
class OptimizerGroup:
    """
    One parameter group of DeepSpeed's ZeRO-1/2 optimizer: its parameters flattened in order (the rank's elements of
    each: for experts its E/P experts), padded to a multiple of `ZERO12_ALIGNMENT_FACTOR` x `ranks` elements, and split
    in `ranks` equal partitions, one per rank of the group it is partitioned over.
    """

    params: list[ParameterInfo]
    ranks: int  # all W ranks for the dense group, the W/P ranks of an expert-data-parallel group for experts
    is_expert: bool

    @property
    def numel(self) -> int:
        return sum(info.numel for info in self.params)

    @property
    def padded_numel(self) -> int:
        alignment = ZERO12_ALIGNMENT_FACTOR * self.ranks
        return math.ceil(self.numel / alignment) * alignment

    @property
    def partition_numel(self) -> int:
        return self.padded_numel // self.ranks

    @property
    def largest_numel(self) -> int:
        return max(info.numel for info in self.params)

    def overlapping_numel(self, partition_id: int) -> int:
        """
        Elements of the parameters whose range in the flat group overlaps partition `partition_id`, each counted whole
        (DeepSpeed's `params_in_partition`): what the rank's gradient buffer `grads_in_partition` holds of the group.
        """
        first, last = self._overlapping(partition_id)
        if first > last:
            return 0
        ends = self.parameter_ends
        return ends[last] - (ends[first - 1] if first else 0)

    def step_gradient_pieces(self, partition_id: int) -> int:
        """
        How many tensors the step flattens into the fp32 gradient of partition `partition_id`: the pieces of the
        parameters it overlaps, and zeros where it reaches into the padding. One piece is a view, not a copy.
        """
        first, last = self._overlapping(partition_id)
        padding = (partition_id + 1) * self.partition_numel > self.numel
        return max(last - first + 1, 0) + padding

    def _overlapping(self, partition_id: int) -> tuple[int, int]:
        ends = self.parameter_ends
        start = partition_id * self.partition_numel
        first = bisect.bisect_right(ends, start)  # the first parameter ending after the partition's start
        last = min(bisect.bisect_left(ends, start + self.partition_numel), len(ends) - 1)  # the last starting before
        return first, last

    @functools.cached_property
    def parameter_ends(self) -> list[int]:
        # Offsets in the flat group, for a bisection per partition (thousands of parameters, thousands of ranks)
        return list(itertools.accumulate(info.numel for info in self.params))


def zero12_optimizer_groups(infos: list[ParameterInfo], world_size: int, ep_size: int) -> list[OptimizerGroup]:
    """
    The parameter groups of DeepSpeed's ZeRO-1/2 optimizer for a client optimizer of one group (`model.parameters()`),
    as the fork's hand-over splits it with DeepSpeed's `split_params_into_different_moe_groups_for_optimizer`: the
    dense parameters first, over all W ranks, then the experts in `named_parameters` order, cut into chunks of at most
    `MOE_GROUP_MAX_NUMEL` elements, each over the W/P ranks of the expert-data-parallel group. Without EP, one group.
    Several client groups (the Trainer's weight decay ones) only move partition boundaries: a few elements of padding.
    """
    dense = [info for info in infos if not info.is_expert]
    groups = [OptimizerGroup(dense, world_size, is_expert=False)] if dense else []
    chunk, chunk_numel = [], 0
    for info in (info for info in infos if info.is_expert):
        if chunk and chunk_numel + info.numel > MOE_GROUP_MAX_NUMEL:
            groups.append(OptimizerGroup(chunk, world_size // ep_size, is_expert=True))
            chunk, chunk_numel = [], 0
        chunk.append(info)
        chunk_numel += info.numel
    if chunk:
        groups.append(OptimizerGroup(chunk, world_size // ep_size, is_expert=True))
    return groups


def partition_id(group: OptimizerGroup, rank: int, ep_size: int) -> int:
    """
    The partition of global rank `rank` in `group`: its rank in the data-parallel group (all ranks) for dense groups,
    in its expert-data-parallel group for experts, whose ranks DeepSpeed strides by P
    (`_create_expert_and_data_parallel`: {i, i + P, i + 2P, ...}), so rank // P.
    """
    return rank // ep_size if group.is_expert else rank


def gradient_buffer_numel(groups: list[OptimizerGroup], rank: int, ep_size: int) -> tuple[int, int]:
    """(dense, experts) elements of `grads_in_partition` on global rank `rank`."""
    dense = experts = 0
    for group in groups:
        numel = group.overlapping_numel(partition_id(group, rank, ep_size))
        if group.is_expert:
            experts += numel
        else:
            dense += numel
    return dense, experts


def step_transient_bytes(groups: list[OptimizerGroup], rank: int, ep_size: int, element_size: int) -> int:
    """
    The largest fp32 gradient of a partition the step makes on global rank `rank`, one group at a time: the gradients
    of the partition flattened (a copy in the model dtype, unless a single piece: a view), then made fp32 (the same
    tensor for fp32 models).
    """
    largest = 0
    for group in groups:
        copies = group.step_gradient_pieces(partition_id(group, rank, ep_size)) > 1
        per_element = (4 if copies else 0) if element_size == 4 else 4 + (element_size if copies else 0)
        largest = max(largest, group.partition_numel * per_element)
    return largest


def zero12_optimizer_class(dtype, grad_dtype, zero: ZeroOptions) -> str:
    """
    The optimizer DeepSpeed wraps the client optimizer in at stage 1 or 2 (`_do_optimizer_sanity_check`): bf16 weights
    with fp32 gradient accumulation at stage 1 without optimizer offload take `BF16_Optimizer`, a code path of its own.
    """
    bf16_with_fp32_accumulation = _dtype(dtype) == torch.bfloat16 and _dtype(grad_dtype) == torch.float32
    if zero.stage == 1 and bf16_with_fp32_accumulation and not zero.offload_optimizer:
        return "BF16_Optimizer"
    return "DeepSpeedZeroOptimizer"


def load_working_set(infos: list[ParameterInfo], world_size: int, ep_size: int, element_size: int) -> tuple[int, int]:
    """
    (share, working set) in bytes of a rank during `from_pretrained`, as the loader keeps it (docs/ep_deepspeed.md,
    "Memory at load"; `zero3_load_peak_bytes` in integrations/deepspeed_expert_parallel.py computes the same from a
    model). With EP the rank holds its whole dense weights and its E/P experts until `deepspeed.initialize` partitions
    them, and the working set is its largest expert parameter (one layer's fused `gate_up_proj`: the gate and up stacks
    exist until they are concatenated into it). Without EP (shard-on-read) it holds its ZeRO-3 partitions, and the
    working set is the largest conversion: `load_working_numel`, its copies x the rows (experts) it converts for the
    rank (those its partition spans) x a row (a fused `gate_up_proj`: its two stacks and the concatenated tensor, out
    of which the partition is copied), 0 when nothing is converted.
    """
    if ep_size > 1:
        share = sum(info.numel for info in infos)
        working = max((info.numel for info in infos if info.is_expert), default=0)
    else:
        share = sum(partition_numel(info, world_size, 1) for info in infos)
        working = max((info.load_working_numel for info in infos), default=0)
    return share * element_size, working * element_size


def save_working_set(
    infos: list[ParameterInfo], world_size: int, ep_size: int, element_size: int
) -> tuple[int, int, int]:
    """
    (every rank or the writing rank, the other ranks, the writing rank when it writes alone) bytes above the ZeRO-3
    state during `save_pretrained`, decided by the largest full tensor (all E experts of one layer's largest expert
    parameter). With EP (`deepspeed_expert_parallel_save`) every rank writes where every rank sees the directory: the
    first two are alike; on nodes with a disk each, rank 0 writes alone, tensors gathered one at a time (the third).
    Without EP, the documented ZeRO-3 save (accelerate's `get_state_dict`, the engine's consolidated 16-bit state dict)
    holds the whole model on the writing rank.
    """
    largest = max(info.numel * (ep_size if info.is_expert else 1) for info in infos) * element_size
    if ep_size > 1:
        copies = PARALLEL_SAVE_COPIES if world_size == ep_size else PARALLEL_SAVE_GATHERED_COPIES
        every_rank = int(copies / ep_size * largest)
        return every_rank, every_rank, int((SAVE_WRITER_COPIES + 1 / ep_size) * largest)
    whole = sum(info.numel for info in infos) * element_size
    writer = whole + int(CONSOLIDATED_SAVE_COPIES * largest)
    return writer, int(CONSOLIDATED_OTHER_RANK_COPIES * largest), writer


def activation_inputs(config, micro_batch: int | None = None, sequence_length: int | None = None) -> dict:
    """What an activation estimate needs (not modelled here: it depends on kernels, checkpointing and routing)."""
    text = getattr(config, "get_text_config", lambda: config)()
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "moe_intermediate_size",
             "intermediate_size", "num_experts_per_tok")
    inputs = {name: getattr(text, name) for name in names if getattr(text, name, None) is not None}
    inputs.update(micro_batch=micro_batch or "b", sequence_length=sequence_length or "s")
    return inputs


def _check_inputs(world_size: int, ep_size: int, optimizer: str, zero: ZeroOptions, rank: int | None):
    if world_size < 1 or ep_size < 1 or world_size % ep_size:
        raise ValueError(f"`ep_size` ({ep_size}) must divide the world size ({world_size})")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {sorted(OPTIMIZER_STATES)}")
    if zero.stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage {zero.stage} is not modelled: use one of {ZERO_STAGES}")
    if rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"`rank` {rank} is not one of the {world_size} ranks")


def plan_memory(
    config_or_path,
    world_size: int,
    ep_size: int = 1,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    zero: ZeroOptions | None = None,
    ranks_per_node: int | None = None,
    micro_batch: int | None = None,
    sequence_length: int | None = None,
    cpu_only: bool = False,
    rank: int | None = None,
) -> MemoryPlan:
    """
    The per-rank memory of training the model of `config_or_path` (a config, a directory or a config JSON file, a
    model id) with EP size `ep_size` under DeepSpeed ZeRO (`zero.stage`, 3 unless given) on `world_size` ranks.
    Nothing is loaded: the model is built on the meta device. See the module's docstring for the rules,
    `MemoryPlan.format` for a report. `cpu_only`: DeepSpeed's CPU accelerator (the tests), where the device is the
    host. `rank`: at stages 1 and 2 the gradient partition buffer differs by rank (parameters cut by a partition
    boundary count whole); the plan is for this rank, by default the one with the largest buffer.
    """
    zero = zero or ZeroOptions()
    _check_inputs(world_size, ep_size, optimizer, zero, rank)
    config = _load_config(config_or_path)
    infos = model_parameters(_meta_model(config, dtype), ep_size, world_size)
    return _plan(config_or_path, config, infos, world_size, ep_size, dtype, optimizer, zero, ranks_per_node,
                 micro_batch, sequence_length, cpu_only, rank)


def compare_stages(
    config_or_path,
    world_size: int,
    ep_size: int = 1,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    zero: ZeroOptions | None = None,
    stages: tuple[int, ...] = ZERO_STAGES,
    **kwargs,
) -> dict[int, MemoryPlan]:
    """`plan_memory` at each of `stages`, the other ZeRO options as given (the model is built once)."""
    zero = zero or ZeroOptions()
    for stage in stages:
        _check_inputs(world_size, ep_size, optimizer, dataclasses.replace(zero, stage=stage), kwargs.get("rank"))
    config = _load_config(config_or_path)
    infos = model_parameters(_meta_model(config, dtype), ep_size, world_size)
    options = {"ranks_per_node": None, "micro_batch": None, "sequence_length": None, "cpu_only": False, "rank": None}
    options.update(kwargs)
    return {
        stage: _plan(config_or_path, config, infos, world_size, ep_size, dtype, optimizer,
                     dataclasses.replace(zero, stage=stage), **options)
        for stage in stages
    }


def _plan(config_or_path, config, infos, world_size, ep_size, dtype, optimizer, zero, ranks_per_node, micro_batch,
          sequence_length, cpu_only, rank) -> MemoryPlan:
    low = _element_size(dtype)
    if zero.stage == 3:
        fields = _zero3_fields(infos, world_size, ep_size, dtype, optimizer, zero, cpu_only)
        load = load_working_set(infos, world_size, ep_size, low)
        save = save_working_set(infos, world_size, ep_size, low)
    else:
        fields = _zero12_fields(infos, world_size, ep_size, dtype, optimizer, zero, cpu_only, rank)
        # With EP the load is ZeRO-3's (the same shard-on-read path and hand-over); the save is not modelled
        load = load_working_set(infos, world_size, ep_size, low) if ep_size > 1 else (None, None)
        save = (None, None, None)
    # With EP the dense weights stay views of the mapped checkpoint until `deepspeed.initialize` partitions them
    file_backed = sum(info.numel for info in infos if not info.is_expert) * low if ep_size > 1 else 0
    name = (str(config_or_path) if isinstance(config_or_path, (str, Path))
            else str(getattr(config, "_name_or_path", "") or config.model_type))
    return MemoryPlan(
        model=name, world_size=world_size, ep_size=ep_size, dtype=str(dtype), optimizer=optimizer, zero=zero,
        ranks_per_node=ranks_per_node or min(world_size, 8),
        num_parameters=sum(info.numel * (ep_size if info.is_expert else 1) for info in infos),
        num_expert_parameters=sum(info.numel * ep_size for info in infos if info.is_expert),
        load_share=load[0], load_working_set=load[1], load_file_backed=file_backed if load[0] is not None else None,
        save_writer_working_set=save[0], save_other_working_set=save[1], save_single_writer_working_set=save[2],
        activation_inputs=activation_inputs(config, micro_batch, sequence_length),
        **fields,
    )


class _StateSums:
    """Bytes per kind of state, dense and experts apart."""

    def __init__(self, devices: dict[str, str]):
        self.states = {key: Bytes(device=where) for key, where in devices.items()}

    def add(self, key: str, is_expert: bool, value: int):
        state = self.states[key]
        if is_expert:
            state.experts += value
        else:
            state.dense += value


def _zero3_fields(infos, world_size, ep_size, dtype, optimizer, zero, cpu_only) -> dict:
    low = _element_size(dtype)
    grad = _element_size(zero.grad_accum_dtype or dtype)
    fp32 = 4
    persistent = _persistent(infos, zero)
    params_on = "host" if zero.offload_param or cpu_only else "gpu"
    optimizer_on = "host" if zero.offload_optimizer or cpu_only else "gpu"
    sums = _StateSums({"parameters": params_on, "persistent": "host" if cpu_only else "gpu",
                       "gradients": optimizer_on, "fp32_gradients": optimizer_on, "master": optimizer_on,
                       "optimizer": optimizer_on})
    for info in infos:
        part = partition_numel(info, world_size, ep_size)
        sums.add("parameters", info.is_expert, part * low)
        if info.name in persistent:
            sums.add("persistent", info.is_expert, info.numel * low)
        sums.add("gradients", info.is_expert, part * grad)
        if zero.offload_optimizer:
            sums.add("fp32_gradients", info.is_expert, part * fp32)
        sums.add("master", info.is_expert, part * fp32)
        sums.add("optimizer", info.is_expert, part * fp32 * OPTIMIZER_STATES[optimizer])

    gathered_by_module = {}
    for info in infos:
        if info.name not in persistent:
            gathered_by_module[info.module] = gathered_by_module.get(info.module, 0) + info.numel
    largest_module = max(gathered_by_module.values(), default=0)
    gathered = max(largest_module, min(zero.max_live_parameters, sum(gathered_by_module.values())))
    states = sums.states
    return {
        "parameters": states["parameters"], "persistent_parameters": states["persistent"],
        "gradients": states["gradients"],
        "offloaded_fp32_gradients": states["fp32_gradients"], "fp32_master": states["master"],
        "optimizer_state": states["optimizer"],
        "reduce_bucket": zero.reduce_bucket_size * grad,
        "gathered_parameters": gathered * low,
        "prefetch_bucket": min(zero.prefetch_bucket_size, zero.max_live_parameters) * low,
    }


def _zero12_fields(infos, world_size, ep_size, dtype, optimizer, zero, cpu_only, rank) -> dict:
    """The per-rank state of DeepSpeed's ZeRO-1/2 optimizer (or `BF16_Optimizer`), group by group."""
    low = _element_size(dtype)
    grad_dtype = zero.grad_accum_dtype or dtype
    grad = _element_size(grad_dtype)
    fp32 = 4
    groups = zero12_optimizer_groups(infos, world_size, ep_size)
    optimizer_class = zero12_optimizer_class(dtype, grad_dtype, zero)
    bf16_optimizer = optimizer_class == "BF16_Optimizer"
    offload = zero.offload_optimizer
    # fp32 accumulation of a 16-bit model: one fp32 buffer of exactly the partition per group, which is the step's
    # gradient too (`_use_compact_grad_partition_buffer`)
    compact = not bf16_optimizer and _dtype(grad_dtype) == torch.float32 and _dtype(dtype) != torch.float32
    device = "host" if cpu_only else "gpu"
    optimizer_on = "host" if offload or cpu_only else "gpu"
    sums = _StateSums({"parameters": device, "whole_gradients": device, "gradients": device,
                       "fp32_gradients": optimizer_on, "master": optimizer_on, "optimizer": optimizer_on,
                       "offload_16bit": "host", "staging_host": "host", "staging_device": device})
    for group in groups:
        partition, kind = group.partition_numel, group.is_expert
        sums.add("parameters", kind, group.padded_numel * low)
        sums.add("master", kind, partition * fp32)
        sums.add("optimizer", kind, partition * fp32 * OPTIMIZER_STATES[optimizer])
        if zero.stage == 1:
            # `BF16_Optimizer` keeps an fp32 gradient of the whole flat group; ZeRO-1 the autograd gradients
            sums.add("whole_gradients", kind, group.padded_numel * fp32 if bf16_optimizer else group.numel * grad)
        if compact:
            sums.add("gradients", kind, partition * fp32)
        if offload:
            sums.add("fp32_gradients", kind, partition * fp32)
            sums.add("offload_16bit", kind, partition * low)

    states = sums.states
    # Without offload, the ZeRO optimizer copies the gradients of the parameters it updates whole into one buffer
    per_parameter = not (bf16_optimizer or compact or offload)
    rank, buffer_range = _gradient_partition_buffer(states["gradients"], groups, world_size, ep_size, low, rank,
                                                    per_parameter)
    partitions = sum(group.partition_numel for group in groups) * low if per_parameter else states["gradients"].total
    if offload:
        # The largest parameter's gradient staged on its way to the host, a buffer on each side
        largest = max(groups, key=lambda group: group.largest_numel)
        sums.add("staging_host", largest.is_expert, largest.largest_numel * low)
        sums.add("staging_device", largest.is_expert, largest.largest_numel * low)
    # None with offload (the fp32 gradient partitions are kept), compact buffers (they are the fp32 gradients) or
    # `BF16_Optimizer` (views of its fp32 gradients)
    step_transient = 0 if (offload or compact or bf16_optimizer) else step_transient_bytes(groups, rank, ep_size, low)
    # Stage 1 stages its reduction in the accumulation dtype when it differs (`use_grad_accum_attribute`)
    bucket_bytes = grad if zero.stage == 1 and grad != low else low
    buckets = 2 if zero.overlaps_communication else 1
    return {
        "parameters": states["parameters"], "persistent_parameters": Bytes(device=device),
        "gradients": states["gradients"], "offloaded_fp32_gradients": states["fp32_gradients"],
        "fp32_master": states["master"], "optimizer_state": states["optimizer"],
        "reduce_bucket": zero.reduce_bucket_size * bucket_bytes * buckets,
        "gathered_parameters": 0, "prefetch_bucket": 0,
        "optimizer_class": optimizer_class,
        "optimizer_groups": [(group.is_expert, group.ranks, group.numel, group.partition_numel) for group in groups],
        "whole_gradients": states["whole_gradients"], "offload_16bit_buffers": states["offload_16bit"],
        "offload_staging_host": states["staging_host"], "offload_staging_device": states["staging_device"],
        "step_transient": step_transient,
        "initialize_working_set": max(group.padded_numel for group in groups) * low,
        "rank": rank, "gradient_buffer_range": buffer_range,
        "gradient_partitions": partitions,
        "notes": _zero12_notes(zero, optimizer_class),
    }


def _gradient_partition_buffer(state: Bytes, groups, world_size, ep_size, element_size, rank, per_parameter):
    """
    Fills `state` with `grads_in_partition` of `rank` (by default the rank where it is largest) when the buffer holds
    whole parameters (`per_parameter`); returns the rank and the buffer's (smallest, largest) bytes over the ranks.
    """
    if not per_parameter:
        return rank or 0, (state.total, state.total)
    per_rank = {r: gradient_buffer_numel(groups, r, ep_size) for r in range(world_size)}
    if rank is None:
        rank = max(per_rank, key=lambda r: sum(per_rank[r]))
    dense, experts = per_rank[rank]
    state.dense, state.experts = dense * element_size, experts * element_size
    totals = [sum(numels) * element_size for numels in per_rank.values()]
    return rank, (min(totals), max(totals))


def _zero12_notes(zero: ZeroOptions, optimizer_class: str) -> list[str]:
    notes = []
    if optimizer_class == "BF16_Optimizer":
        notes.append("bf16 with fp32 gradient accumulation at stage 1 without offload: DeepSpeed takes BF16_Optimizer "
                     "(fp32 gradients of the whole local model kept all along; not measured)")
    if zero.stage == 1 and optimizer_class != "BF16_Optimizer":
        notes.append("stage 1: the whole gradients are the peak before the step's reduction, which moves them into "
                     "the reduce bucket and the partition buffer")
    if zero.offload_optimizer:
        notes.append("offload_optimizer with gradient accumulation > 1: the owned gradients also accumulate on the "
                     "host (`accumulated_grads_in_cpu`, not modelled)")
    if zero.offload_param:
        notes.append("offload_param applies to ZeRO-3 only: not counted at stages 1 and 2")
    return notes


def format_stage_comparison(plans: dict[int, MemoryPlan], gpu_memory: float | None = None) -> str:
    """
    The stages side by side, per rank: ZeRO state, GPU (state + working buffers, before activations) and host
    figures, and which stages fit `gpu_memory` bytes per device when given.
    """
    any_plan = next(iter(plans.values()))
    unit, scale = max((plan._unit() for plan in plans.values()), key=lambda found: found[1])
    header = f"{f'stages side by side, per rank, {unit}':39s}{'state':>10s}{'GPU':>10s}{'host':>10s}"
    if gpu_memory is not None:
        header += f"   within {gpu_memory / scale:.1f} {unit} per GPU (before activations)"
    lines = [f"{any_plan.model}, world size {any_plan.world_size}, EP {any_plan.ep_size}", header]
    for stage, plan in sorted(plans.items()):
        line = (f"  ZeRO-{stage} {plan.optimizer_class:30s}{plan.state / scale:10.2f}"
                f"{plan.per_device('gpu') / scale:10.2f}"
                f"{plan.per_device('host') / scale:10.2f}")
        if gpu_memory is not None:
            room = gpu_memory - plan.per_device("gpu")
            line += (f"   fits, {room / scale:.2f} left for activations" if room >= 0
                     else f"   does not fit ({-room / scale:.2f} over)")
        lines.append(line)
    if gpu_memory is not None:
        fitting = [stage for stage, plan in sorted(plans.items()) if plan.fits(gpu_memory)]
        lines.append("fit: " + (", ".join(f"ZeRO-{stage}" for stage in fitting) if fitting else "none"))
    return "\n".join(lines)


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m transformers.integrations.deepspeed_expert_parallel_memory",
        description="Per-rank memory of an expert-parallel model under DeepSpeed ZeRO stages 1, 2 and 3, from its "
                    "config alone, and which stages fit.",
    )
    parser.add_argument("model", help="model id, directory, or config JSON file")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZER_STATES))
    parser.add_argument("--ranks-per-node", type=int, default=None, help="default: min(world size, 8)")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config JSON to read the ZeRO options from")
    parser.add_argument("--stage", type=int, default=None, choices=ZERO_STAGES,
                        help="the ZeRO stage planned in detail (default: the --deepspeed config's, else 3)")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GiB per GPU: say which stages fit (before activations)")
    parser.add_argument("--rank", type=int, default=None,
                        help="stages 1 and 2: the rank to plan (default: the one with the largest gradient buffer)")
    parser.add_argument("--offload-param", action="store_true", default=None)
    parser.add_argument("--offload-optimizer", action="store_true", default=None)
    parser.add_argument("--param-persistence-threshold", type=int, default=None)
    parser.add_argument("--model-persistence-threshold", type=int, default=None)
    parser.add_argument("--max-live-parameters", type=int, default=None)
    parser.add_argument("--prefetch-bucket-size", type=int, default=None)
    parser.add_argument("--reduce-bucket-size", type=int, default=None)
    parser.add_argument("--overlap-comm", action=argparse.BooleanOptionalAction, default=None,
                        help="default: DeepSpeed's (on at stage 3 only)")
    parser.add_argument("--grad-accum-dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--micro-batch", type=int, default=None, help="for the activation inputs line only")
    parser.add_argument("--sequence-length", type=int, default=None, help="for the activation inputs line only")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> MemoryPlan:
    args = _parse_args(argv)
    config = _load_config(args.model)
    overrides = {
        key: getattr(args, key)
        for key in ("offload_param", "offload_optimizer", "param_persistence_threshold", "model_persistence_threshold",
                    "max_live_parameters", "prefetch_bucket_size", "reduce_bucket_size", "overlap_comm",
                    "grad_accum_dtype", "stage")
        if getattr(args, key) is not None
    }
    hidden_size = getattr(config.get_text_config(), "hidden_size", None)
    zero = (ZeroOptions.from_deepspeed_config(args.deepspeed, hidden_size, **overrides) if args.deepspeed
            else ZeroOptions(**overrides))
    plans = compare_stages(config, args.world_size, args.ep_size, args.dtype, args.optimizer, zero,
                           stages=tuple(sorted({*ZERO_STAGES, zero.stage})), ranks_per_node=args.ranks_per_node,
                           micro_batch=args.micro_batch, sequence_length=args.sequence_length, rank=args.rank)
    for plan in plans.values():
        plan.model = args.model
    plan = plans[zero.stage]
    gpu_memory = args.gpu_memory * GIB if args.gpu_memory is not None else None
    if args.json:
        out = plan.to_dict()
        out["stages"] = {
            stage: {"state": other.state, "gpu_per_rank": other.per_device("gpu"),
                    "host_per_rank": other.per_device("host"),
                    **({"fits": other.fits(gpu_memory)} if gpu_memory is not None else {})}
            for stage, other in plans.items()
        }
        print(json.dumps(out, indent=1, default=str))
    else:
        print(plan.format() + "\n\n" + format_stage_comparison(plans, gpu_memory))
    return plan


if __name__ == "__main__":
    main()
