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
Memory planner for expert parallelism (EP) under DeepSpeed ZeRO-3: "will it fit?", from a config alone.

    python -m transformers.integrations.deepspeed_expert_parallel_memory Qwen/Qwen3-30B-A3B --world-size 16 \
        --ep-size 8 --dtype bf16 --optimizer adamw --ranks-per-node 8 [--offload-optimizer] [--deepspeed ds.json]

`plan_memory(config_or_path, world_size, ep_size, ...)` builds the model on the meta device (nothing is read or
allocated), splits its parameters into experts (the parameters the model's EP plan places with an expert style) and
dense ones, and applies the partitioning rules of DeepSpeed 0.19.8's ZeRO-3 (`runtime/zero/partition_parameters.py`,
`stage3.py`, `parameter_offload.py`), as the fork hands the model over (`deepspeed_expert_parallel`):

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

Load and save peaks follow the fork's loader and streamed save (`load_working_set`, `save_working_set`: one small
function each, measured by tests/deepspeed/test_ep_zero3_memory_plan.py). Activations, the CUDA context, allocator
fragmentation and communication buffers are not modelled: `activation_inputs` lists what an activation estimate needs.
"""

from __future__ import annotations

import argparse
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


@dataclass(frozen=True)
class ZeroOptions:
    """The ZeRO-3 settings that decide memory, DeepSpeed's defaults unless given (`from_deepspeed_config`)."""

    offload_param: bool = False
    offload_optimizer: bool = False
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = sys.maxsize
    max_live_parameters: int = 1_000_000_000
    prefetch_bucket_size: int = 50_000_000
    reduce_bucket_size: int = 500_000_000
    grad_accum_dtype: str | None = None

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
        options = dict(
            offload_param=offloads("offload_param"),
            offload_optimizer=offloads("offload_optimizer"),
            param_persistence_threshold=value("stage3_param_persistence_threshold",
                                              defaults.param_persistence_threshold),
            model_persistence_threshold=value("stage3_model_persistence_threshold",
                                              defaults.model_persistence_threshold),
            max_live_parameters=value("stage3_max_live_parameters", defaults.max_live_parameters),
            prefetch_bucket_size=value("stage3_prefetch_bucket_size", defaults.prefetch_bucket_size),
            reduce_bucket_size=value("reduce_bucket_size", defaults.reduce_bucket_size),
            grad_accum_dtype=(config.get("data_types") or {}).get("grad_accum_dtype"),
        )
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
    """The per-rank memory of one EP + ZeRO-3 configuration, in bytes (see `plan_memory`)."""

    model: str
    world_size: int
    ep_size: int
    dtype: str
    optimizer: str
    zero: ZeroOptions
    ranks_per_node: int
    num_parameters: int
    num_expert_parameters: int
    parameters: Bytes
    persistent_parameters: Bytes
    gradients: Bytes
    offloaded_fp32_gradients: Bytes
    fp32_master: Bytes
    optimizer_state: Bytes
    reduce_bucket: int
    gathered_parameters: int
    prefetch_bucket: int
    load_share: int
    load_working_set: int
    # The part of the share that stays mapped from the checkpoint during the load (page cache: reclaimable)
    load_file_backed: int
    # With EP every rank writes (its working set is the writer's and the other ranks'), unless the nodes have a disk
    # each: rank 0 then writes alone (`save_single_writer_working_set`)
    save_writer_working_set: int
    save_other_working_set: int
    save_single_writer_working_set: int
    activation_inputs: dict = field(default_factory=dict)

    def states(self) -> dict[str, Bytes]:
        return {
            "parameter partitions": self.parameters,
            "persistent parameters (whole)": self.persistent_parameters,
            "gradient partitions": self.gradients,
            "fp32 gradients (offload)": self.offloaded_fp32_gradients,
            "fp32 master partitions": self.fp32_master,
            "optimizer state": self.optimizer_state,
        }

    @property
    def zero3_state(self) -> int:
        """Everything ZeRO-3 keeps per rank between steps (no working buffers)."""
        return sum(state.total for state in self.states().values())

    def per_device(self, device: str) -> int:
        """ZeRO-3 state plus working buffers on `device` ("gpu" or "host")."""
        state = sum(s.total for s in self.states().values() if s.device == device)
        if device == "gpu":
            state += self.reduce_bucket + self.gathered_parameters
        return state

    @property
    def load_peak(self) -> int:
        """Host memory of the rank at the peak of `from_pretrained`, mapped checkpoint pages included."""
        return self.load_share + self.load_working_set

    @property
    def load_peak_anonymous(self) -> int:
        """The part of `load_peak` that cannot be reclaimed (not the checkpoint's mapped pages)."""
        return self.load_peak - self.load_file_backed

    @property
    def save_writer_peak(self) -> int:
        """The writing rank's peak during `save_pretrained`: its ZeRO-3 state plus the save's working set."""
        return self.zero3_state + self.save_writer_working_set

    def per_node(self, device: str) -> int:
        return self.per_device(device) * self.ranks_per_node

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(zero3_state=self.zero3_state, load_peak=self.load_peak, load_peak_anonymous=self.load_peak_anonymous,
                   save_writer_peak=self.save_writer_peak,
                   gpu_per_rank=self.per_device("gpu"), host_per_rank=self.per_device("host"))
        return out

    def format(self) -> str:
        # GiB, or MiB for small models (the tests' tiny ones)
        unit, scale = ("GiB", GIB) if max(self.load_peak, self.save_writer_peak) >= GIB else ("MiB", 2**20)

        def gib(value):
            return f"{value / scale:10.2f}"

        zero = self.zero
        offload = [what for what, on in (("param", zero.offload_param), ("optimizer", zero.offload_optimizer)) if on]
        lines = [
            f"{self.model}: {self.num_parameters / 1e9:.2f} B parameters ({self.num_expert_parameters / 1e9:.2f} B in "
            f"experts), {self.dtype}, {self.optimizer}",
            f"world size {self.world_size}, EP {self.ep_size} "
            f"(expert-data-parallel {self.world_size // self.ep_size}), "
            f"offload: {', '.join(offload) or 'none'}, persistence threshold {zero.param_persistence_threshold}",
            "",
            f"per rank, {unit}                        dense    experts      total   where",
        ]
        for label, state in self.states().items():
            lines.append(f"{label:32s}{gib(state.dense)} {gib(state.experts)} {gib(state.total)}   {state.device}")
        lines += [
            f"{'ZeRO-3 state':32s}{'':22s}{gib(self.zero3_state)}",
            f"{'reduce bucket':32s}{'':22s}{gib(self.reduce_bucket)}   gpu",
            f"{'gathered parameters (up to)':32s}{'':22s}{gib(self.gathered_parameters)}   gpu"
            f"   (prefetch bucket {self.prefetch_bucket / scale:.2f})",
            "",
            f"{'GPU per rank':32s}{'':22s}{gib(self.per_device('gpu'))}   + activations (not modelled)",
            f"{'host per rank (training)':32s}{'':22s}{gib(self.per_device('host'))}",
            f"{'load peak per rank':32s}{'':22s}{gib(self.load_peak)}   rank's share {self.load_share / scale:.2f}"
            f" + working set {self.load_working_set / scale:.2f}; not reclaimable {self.load_peak_anonymous / scale:.2f}"
            f" (the rest: checkpoint pages mapped, page cache)",
            f"{'save peak, writing rank':32s}{'':22s}{gib(self.save_writer_peak)}   state + working set "
            f"{self.save_writer_working_set / scale:.2f} (other ranks + {self.save_other_working_set / scale:.2f}; "
            f"one writer, nodes with a disk each: + {self.save_single_writer_working_set / scale:.2f})",
            "",
            f"per node ({self.ranks_per_node} ranks): GPU {self.per_node('gpu') / scale:.2f} {unit}, host (training) "
            f"{self.per_node('host') / scale:.2f} {unit}, "
            f"host at load {self.load_peak * self.ranks_per_node / scale:.2f} {unit}",
            "activations are not modelled; inputs: "
            + ", ".join(f"{k}={v}" for k, v in self.activation_inputs.items()),
        ]
        return "\n".join(lines)


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
) -> MemoryPlan:
    """
    The per-rank memory of training the model of `config_or_path` (a config, a directory or a config JSON file, a
    model id) with EP size `ep_size` under DeepSpeed ZeRO-3 on `world_size` ranks. Nothing is loaded: the model is
    built on the meta device. See the module's docstring for the rules, `MemoryPlan.format` for a report.
    `cpu_only`: DeepSpeed's CPU accelerator (the tests), where the device is the host.
    """
    if world_size < 1 or ep_size < 1 or world_size % ep_size:
        raise ValueError(f"`ep_size` ({ep_size}) must divide the world size ({world_size})")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {sorted(OPTIMIZER_STATES)}")
    zero = zero or ZeroOptions()
    config = _load_config(config_or_path)
    infos = model_parameters(_meta_model(config, dtype), ep_size, world_size)
    low = _element_size(dtype)
    grad = _element_size(zero.grad_accum_dtype or dtype)
    fp32 = 4
    persistent = _persistent(infos, zero)
    params_on = "host" if zero.offload_param or cpu_only else "gpu"
    optimizer_on = "host" if zero.offload_optimizer or cpu_only else "gpu"

    states = {key: Bytes(device=where) for key, where in (
        ("parameters", params_on), ("persistent", "host" if cpu_only else "gpu"), ("gradients", optimizer_on),
        ("fp32_gradients", optimizer_on), ("master", optimizer_on), ("optimizer", optimizer_on))}

    def add(key, info, value):
        state = states[key]
        if info.is_expert:
            state.experts += value
        else:
            state.dense += value

    for info in infos:
        part = partition_numel(info, world_size, ep_size)
        add("parameters", info, part * low)
        if info.name in persistent:
            add("persistent", info, info.numel * low)
        add("gradients", info, part * grad)
        if zero.offload_optimizer:
            add("fp32_gradients", info, part * fp32)
        add("master", info, part * fp32)
        add("optimizer", info, part * fp32 * OPTIMIZER_STATES[optimizer])

    gathered_by_module = {}
    for info in infos:
        if info.name not in persistent:
            gathered_by_module[info.module] = gathered_by_module.get(info.module, 0) + info.numel
    largest_module = max(gathered_by_module.values(), default=0)
    gathered = max(largest_module, min(zero.max_live_parameters, sum(gathered_by_module.values())))
    share, load_set = load_working_set(infos, world_size, ep_size, low)
    # With EP the dense weights stay views of the mapped checkpoint until `deepspeed.initialize` partitions them
    file_backed = sum(info.numel for info in infos if not info.is_expert) * low if ep_size > 1 else 0
    save_writer, save_other, save_single_writer = save_working_set(infos, world_size, ep_size, low)
    num_parameters = sum(info.numel * (ep_size if info.is_expert else 1) for info in infos)
    return MemoryPlan(
        model=str(getattr(config, "_name_or_path", "") or config.model_type) if not isinstance(
            config_or_path, (str, Path)) else str(config_or_path),
        world_size=world_size, ep_size=ep_size, dtype=str(dtype), optimizer=optimizer, zero=zero,
        ranks_per_node=ranks_per_node or min(world_size, 8),
        num_parameters=num_parameters,
        num_expert_parameters=sum(info.numel * ep_size for info in infos if info.is_expert),
        parameters=states["parameters"], persistent_parameters=states["persistent"], gradients=states["gradients"],
        offloaded_fp32_gradients=states["fp32_gradients"], fp32_master=states["master"],
        optimizer_state=states["optimizer"],
        reduce_bucket=zero.reduce_bucket_size * grad,
        gathered_parameters=gathered * low,
        prefetch_bucket=min(zero.prefetch_bucket_size, zero.max_live_parameters) * low,
        load_share=share, load_working_set=load_set, load_file_backed=file_backed,
        save_writer_working_set=save_writer, save_other_working_set=save_other,
        save_single_writer_working_set=save_single_writer,
        activation_inputs=activation_inputs(config, micro_batch, sequence_length),
    )


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m transformers.integrations.deepspeed_expert_parallel_memory",
        description="Per-rank memory of an expert-parallel model under DeepSpeed ZeRO-3, from its config alone.",
    )
    parser.add_argument("model", help="model id, directory, or config JSON file")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZER_STATES))
    parser.add_argument("--ranks-per-node", type=int, default=None, help="default: min(world size, 8)")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config JSON to read the ZeRO-3 options from")
    parser.add_argument("--offload-param", action="store_true", default=None)
    parser.add_argument("--offload-optimizer", action="store_true", default=None)
    parser.add_argument("--param-persistence-threshold", type=int, default=None)
    parser.add_argument("--model-persistence-threshold", type=int, default=None)
    parser.add_argument("--max-live-parameters", type=int, default=None)
    parser.add_argument("--prefetch-bucket-size", type=int, default=None)
    parser.add_argument("--reduce-bucket-size", type=int, default=None)
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
                    "max_live_parameters", "prefetch_bucket_size", "reduce_bucket_size", "grad_accum_dtype")
        if getattr(args, key) is not None
    }
    hidden_size = getattr(config.get_text_config(), "hidden_size", None)
    zero = (ZeroOptions.from_deepspeed_config(args.deepspeed, hidden_size, **overrides) if args.deepspeed
            else ZeroOptions(**overrides))
    plan = plan_memory(config, args.world_size, args.ep_size, args.dtype, args.optimizer, zero, args.ranks_per_node,
                       args.micro_batch, args.sequence_length)
    plan.model = args.model
    print(json.dumps(plan.to_dict(), indent=1, default=str) if args.json else plan.format())
    return plan


if __name__ == "__main__":
    main()
