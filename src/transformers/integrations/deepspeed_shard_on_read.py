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
Shard-on-read loading of models without expert parallelism under DeepSpeed ZeRO-3.

The model is built under `deepspeed.zero.Init`, so every parameter is already partitioned: rank r of a parameter's
partition group holds `param.ds_tensor`, elements [r * n, (r + 1) * n) of the flattened parameter with
n = ceil(numel / world_size), zero-padded past the end. Each rank fills those elements straight from the safetensors
files, reading only their bytes (`pread` on a descriptor advised `POSIX_FADV_RANDOM`, so no read-ahead pulls in the
other ranks' bytes). Checkpoint keys go through the model's weight conversion mapping as in the standard loader:
renamings, and converters (e.g. per-expert tensors fused into one `gate_up_proj`), which are applied one target group
at a time; for pure layout converters a rank reads only the source tensors its partition is made of. Buffers are not
partitioned: every rank loads them whole. No rank holds more than one converted group, and no collective runs per
parameter: the keys are matched, and missing / unexpected keys computed, from the safetensors headers alike on every
rank; a single all-reduce at the end makes every rank raise if one of them failed. Since every parameter is then
written from the checkpoint, or initialised on rank 0 and broadcast (missing keys), `zero.Init` is told not to
broadcast rank 0's uninitialised parameters as it creates them (`zero3_init`), which was most of the load time.

What this does not cover (state dicts passed in, `.bin` or gguf checkpoints, quantized models, shape mismatches,
ZeRO++ hpZ secondary partitions, NVMe offload, quantized non-trainable weights, ...) goes through upstream's path,
`_load_state_dict_into_zero3_model`. A `logger.debug` line says which path ran and why; `last_load` keeps what the
last load did on this rank. `TRANSFORMERS_ZERO3_SHARD_ON_READ=0` selects upstream's path.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from dataclasses import dataclass, field

import torch

from ..utils import logging
from ..utils.sharded_read_advice import _release_freed_heap


logger = logging.get_logger(__name__)

SHARD_ON_READ_ENV = "TRANSFORMERS_ZERO3_SHARD_ON_READ"
# Converter operations that only move elements (each output element is one input element): a rank's slice of their
# output depends only on the source tensors it traces back to, so only those are read.
LAYOUT_OPERATIONS = ("MergeModulelist", "Concatenate", "Chunk", "Split", "Transpose")

# What the last load did on this rank (tests and benchmarks read it): "path" ("shard_on_read" or "upstream"),
# "reason" (why upstream's path ran), "bytes_read", "ranges" ([(file, start, end)] byte ranges read).
last_load: dict = {}


class ShardOnReadUnsupported(Exception):
    """This load is not covered by the shard-on-read path; upstream's ZeRO-3 path takes it."""


@dataclass(frozen=True)
class CheckpointTensor:
    """Where a tensor lies in a safetensors file: `offset` is the byte of its first element."""

    file: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class RangeReader:
    """Reads exact byte ranges of checkpoint files into tensors, and records them."""

    def __init__(self):
        self._descriptors: dict[str, int] = {}
        self.ranges: list[tuple[str, int, int]] = []  # tensor data read: (file, first byte, end)
        self.header_bytes = 0

    @property
    def bytes_read(self) -> int:
        return self.header_bytes + sum(end - start for _, start, end in self.ranges)

    def _descriptor(self, file: str) -> int:
        if file not in self._descriptors:
            fd = os.open(file, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                # Each rank reads part of the file: read-ahead past a range would pull in the other ranks' bytes
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._descriptors[file] = fd
        return self._descriptors[file]

    def read_into(self, file: str, offset: int, out: torch.Tensor, header: bool = False) -> None:
        """Fill the contiguous CPU tensor `out` with the bytes of `file` from `offset` on."""
        if out.numel() == 0:
            return
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        fd, done = self._descriptor(file), 0
        while done < len(view):
            if hasattr(os, "preadv"):
                count = os.preadv(fd, [view[done:]], offset + done)
            else:
                os.lseek(fd, offset + done, os.SEEK_SET)
                count = os.readv(fd, [view[done:]])
            if count == 0:
                raise OSError(f"{file}: unexpected end of file at byte {offset + done}")
            done += count
        if header:
            self.header_bytes += done
        else:
            self.ranges.append((file, offset, offset + done))

    def read_bytes(self, file: str, offset: int, count: int) -> bytes:
        """Header bytes (counted in `bytes_read`, not in `ranges`)."""
        out = torch.empty(count, dtype=torch.uint8)
        self.read_into(file, offset, out, header=True)
        return out.numpy().tobytes()

    def read(self, entry: CheckpointTensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor (all of it by default), as a new flat CPU tensor."""
        stop = entry.numel if stop is None else stop
        out = torch.empty(stop - start, dtype=entry.dtype)
        self.read_into(entry.file, entry.offset + start * entry.dtype.itemsize, out)
        return out

    def close(self) -> None:
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()


def read_safetensors_headers(checkpoint_files: list[str], reader: RangeReader) -> dict[str, CheckpointTensor]:
    """Every tensor of the checkpoint, from the files' headers only (8-byte length, JSON)."""
    from ..modeling_utils import str_to_torch_dtype

    index = {}
    for file in checkpoint_files:
        size = os.path.getsize(file)
        # Through the reader: a buffered read here would leave read-ahead marks that later reads of the first
        # tensors would trip, pulling in megabytes past this rank's partition
        (header_size,) = struct.unpack("<Q", reader.read_bytes(file, 0, 8))
        if 8 + header_size > size:
            raise ValueError(f"{file}: the safetensors header is longer than the file (corrupt checkpoint?)")
        header = json.loads(reader.read_bytes(file, 8, header_size))
        data_start = 8 + header_size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in str_to_torch_dtype:
                raise ShardOnReadUnsupported(f"{key} has the safetensors dtype {info['dtype']}")
            dtype, shape = str_to_torch_dtype[info["dtype"]], tuple(info["shape"])
            begin, end = info["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size:
                raise ValueError(f"{file}: the header entry of {key} does not match the file (corrupt checkpoint?)")
            if key in index:
                raise ShardOnReadUnsupported(f"{key} is in two checkpoint files")
            index[key] = CheckpointTensor(file, data_start + begin, dtype, shape)
    return index


def is_zero3_param(tensor) -> bool:
    return hasattr(tensor, "ds_id")


def partition_range(param) -> tuple[int, int, int]:
    """(start, stop, partition_numel): this rank's ZeRO-3 partition covers elements [start, stop) of the flattened
    parameter, and holds `partition_numel` elements (the last rank's tail is padding)."""
    import torch.distributed as dist

    partition_numel = param.ds_tensor.ds_numel
    start = dist.get_rank(group=param.ds_process_group) * partition_numel
    return start, min(start + partition_numel, param.ds_numel), partition_numel


def _check_partition_layout(name: str, param) -> None:
    """Raise `ShardOnReadUnsupported` unless `param.ds_tensor` is this rank's plain flat partition, to be written."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    ds_tensor = getattr(param, "ds_tensor", None)
    if ds_tensor is None or ds_tensor.numel() != getattr(ds_tensor, "ds_numel", -1) or not ds_tensor.is_contiguous():
        raise ShardOnReadUnsupported(f"{name} has no plain ZeRO-3 partition")
    if getattr(ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme:
        raise ShardOnReadUnsupported(f"{name} is offloaded to NVMe")
    if getattr(param, "ds_secondary_tensor", None) is not None or hasattr(ds_tensor, "ds_quant_scale"):
        raise ShardOnReadUnsupported(f"{name} has a secondary (hpZ) or quantized partition")


@dataclass
class LoadPlan:
    """Which checkpoint keys fill which model tensors, decided from headers alike on every rank."""

    direct: dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key (renamed at most)
    # first target key -> (converter template, [(source pattern, checkpoint key)] in loading order)
    groups: dict[str, tuple] = field(default_factory=dict)
    group_targets: dict[str, list[str]] = field(default_factory=dict)  # first target key -> model keys it fills
    unexpected: set[str] = field(default_factory=set)
    used_conversions: list = field(default_factory=list)


def _meta_state_dict(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        name: torch.empty(t.ds_shape if is_zero3_param(t) else t.shape, dtype=t.dtype, device="meta")
        for name, t in targets.items()
    }


def _convert_group(model, first_target, converter, sources, load_source, loading_info=None) -> dict:
    """Run one converter group (a fresh copy of `converter` fed `load_source(key)` per source) -> {key: tensor}."""
    mapping = deepcopy(converter)
    for pattern, key in sources:
        mapping.add_tensor(first_target, key, pattern, lambda key=key: load_source(key))
    converted = mapping.convert(first_target, model=model, config=model.config, loading_info=loading_info)
    return {name: value[0] if isinstance(value, list) else value for name, value in converted.items()}


def plan_load(model, index: dict[str, CheckpointTensor], targets: dict[str, torch.Tensor], weight_mapping) -> LoadPlan:
    """Match checkpoint keys to model keys as `convert_and_load_state_dict_in_model` does, shapes checked."""
    from ..core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    weight_mapping = weight_mapping or []
    renamings = [entry for entry in weight_mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in weight_mapping if isinstance(entry, WeightConverter)]
    pattern_to_converter = {pattern: c for c in converters for pattern in c.source_patterns}
    meta = _meta_state_dict(targets)
    prefix = model.base_model_prefix
    plan = LoadPlan()
    for key in sorted(index, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        if renamed in meta and pattern is None:
            if renamed in plan.direct:
                raise ShardOnReadUnsupported(f"{renamed} is in the checkpoint twice ({plan.direct[renamed]}, {key})")
            if index[key].shape != meta[renamed].shape:
                raise ShardOnReadUnsupported(f"size mismatch for {renamed}")
            plan.direct[renamed] = key
        elif renamed in meta:
            plan.groups.setdefault(renamed, (pattern_to_converter[pattern], []))[1].append((pattern, key))
        elif pattern is not None:
            converter = pattern_to_converter[pattern]
            plan.unexpected.update(renamed.replace(converter.target_patterns[0], t) for t in converter.target_patterns)
        else:
            plan.unexpected.add(renamed)

    # What each group makes, from a conversion on meta tensors (reads nothing)
    for first_target, (converter, sources) in plan.groups.items():
        try:
            outputs = _convert_group(
                model, first_target, converter, sources,
                lambda key: torch.empty(index[key].shape, dtype=index[key].dtype, device="meta"),
            )
        except Exception as e:
            raise ShardOnReadUnsupported(f"the conversion into {first_target} cannot be planned: {e!r}") from e
        plan.group_targets[first_target] = []
        for name, value in outputs.items():
            if name not in meta:
                plan.unexpected.add(name)
            elif name in plan.direct or any(name in made for made in plan.group_targets.values()):
                raise ShardOnReadUnsupported(f"{name} is made from the checkpoint twice")
            elif tuple(value.shape) != tuple(meta[name].shape):
                raise ShardOnReadUnsupported(f"size mismatch for {name} after conversion")
            else:
                plan.group_targets[first_target].append(name)
    plan.used_conversions = [conversion for conversion in weight_mapping if conversion.was_used()]
    return plan


def _write_partition(param, values: torch.Tensor | None, offset: int = 0) -> None:
    """Copy this rank's slice of the flattened `values` into `param.ds_tensor` (cast like `copy_`): `values` holds the
    parameter's elements from `offset` on (the full tensor, or the rows a windowed conversion made)."""
    start, stop, partition_numel = partition_range(param)
    count = max(stop - start, 0)
    if count:
        param.ds_tensor.narrow(0, 0, count).copy_(values.reshape(-1)[start - offset : stop - offset])
    param.ds_tensor.narrow(0, count, partition_numel - count).zero_()


def _load_direct(param_or_buffer, entry: CheckpointTensor, reader: RangeReader) -> None:
    if not is_zero3_param(param_or_buffer):  # a buffer: not partitioned, every rank loads it whole
        param_or_buffer.copy_(reader.read(entry).view(entry.shape))
        return
    start, stop, partition_numel = partition_range(param_or_buffer)
    partition, count = param_or_buffer.ds_tensor, max(stop - start, 0)
    if count and partition.dtype == entry.dtype and partition.device.type == "cpu":
        reader.read_into(entry.file, entry.offset + start * entry.dtype.itemsize, partition.narrow(0, 0, count))
    elif count:
        partition.narrow(0, 0, count).copy_(reader.read(entry, start, stop))
    partition.narrow(0, count, partition_numel - count).zero_()


def _load_all_direct(direct: dict[str, str], index, targets, reader: RangeReader) -> None:
    """The tensors loaded without conversion, a few at a time like the standard loader's thread pool (several reads
    in flight help a cold load; `HF_DEACTIVATE_ASYNC_LOAD` makes it sequential)."""
    from ..core_model_loading import GLOBAL_WORKERS
    from ..utils import is_env_variable_true

    if is_env_variable_true("HF_DEACTIVATE_ASYNC_LOAD") or GLOBAL_WORKERS < 2:
        for name, key in direct.items():
            _load_direct(targets[name], index[key], reader)
        return
    with ThreadPoolExecutor(max_workers=GLOBAL_WORKERS) as pool:
        for future in [pool.submit(_load_direct, targets[n], index[k], reader) for n, k in direct.items()]:
            future.result()


def _sources_needed(model, first_target, converter, sources, index, targets, made, offsets) -> set[str]:
    """The checkpoint keys of a group this rank's partitions are made of: all of them, unless the converter only moves
    elements, in which case its output is traced with the index of each source in place of the values (`offsets`:
    the first element of each target the conversion of `sources` makes, see `_row_window`)."""
    keys = [key for _, key in sources]
    if not all(type(op).__name__ in LAYOUT_OPERATIONS for op in converter.operations):
        return set(keys)
    if not all(is_zero3_param(targets[name]) for name in made):
        return set(keys)  # a buffer is loaded whole
    position = {key: i for i, key in enumerate(keys)}
    id_dtype = torch.int16 if len(keys) <= torch.iinfo(torch.int16).max else torch.int32
    traced = _convert_group(
        model, first_target, converter, sources,
        lambda key: torch.full((), position[key], dtype=id_dtype).expand(index[key].shape),
    )
    used = torch.zeros(len(keys), dtype=torch.bool)
    for name in made:
        start, stop, _ = partition_range(targets[name])
        start, stop = start - offsets[name], stop - offsets[name]
        if stop > start:  # bincount: linear in the slice, where unique() sorts it
            used |= torch.bincount(traced[name].reshape(-1)[start:stop], minlength=len(keys)) > 0
    return {keys[i] for i in used.nonzero().flatten().tolist()}


def _mark_loaded(name, target, loading_info) -> None:
    target._is_hf_initialized = True
    loading_info.missing_keys.discard(name)


def _row_window(converter, sources, made, targets) -> tuple[list, dict[str, int]] | None:
    """
    For a converter whose output row i (the expert) is made of the i-th source of each pattern alone
    (`converts_by_rows`): the sources of the rows this rank's partitions span and, per target, the element its
    conversion starts at. Converting those alone keeps the working set to the rank's experts instead of all of them
    in full. None when the group does not qualify (it is then converted in full).
    """
    from .deepspeed_expert_parallel import converts_by_rows

    if not converts_by_rows(converter) or not all(is_zero3_param(targets[name]) for name in made):
        return None
    rows_of = {}
    for pattern, _ in sources:
        rows_of[pattern] = rows_of.get(pattern, 0) + 1
    rows = set(rows_of.values())
    if len(rows) != 1 or any(targets[name].ds_shape[0] not in rows for name in made):
        return None
    rows = rows.pop()
    first, last = rows, -1
    for name in made:
        param = targets[name]
        start, stop, _ = partition_range(param)
        row = param.ds_numel // rows
        if stop > start:
            first, last = min(first, start // row), max(last, (stop - 1) // row)
    position, window = {}, []
    for pattern, key in sources:  # each pattern's sources in loading order: row 0, 1, ...
        position[pattern] = position.get(pattern, -1) + 1
        if first <= position[pattern] <= last:
            window.append((pattern, key))
    return window, {name: first * (targets[name].ds_numel // rows) for name in made}


def _load_group(model, first_target, converter, sources, made, index, targets, reader, loading_info) -> None:
    offsets = dict.fromkeys(made, 0)
    window = _row_window(converter, sources, made, targets)
    if window is not None:
        sources, offsets = window
    if not sources:  # no row of this group in the rank's partitions (a padding-only partition)
        for name in made:
            _write_partition(targets[name], None)
            _mark_loaded(name, targets[name], loading_info)
        return
    needed = _sources_needed(model, first_target, converter, sources, index, targets, made, offsets)

    def load_source(key):
        entry = index[key]
        if key in needed:
            return reader.read(entry).view(entry.shape)
        # Not part of this rank's partitions: a placeholder that reads and allocates nothing
        return torch.zeros((), dtype=entry.dtype).expand(entry.shape)

    from ..core_model_loading import SkipParameters

    try:
        converted = _convert_group(model, first_target, converter, sources, load_source, loading_info)
    except SkipParameters:  # as in the standard loader: `loading_info.conversion_errors` says why
        return
    for name in made:
        target = targets[name]
        if is_zero3_param(target):
            _write_partition(target, converted[name], offsets[name])
        else:
            target.copy_(converted[name])
        _mark_loaded(name, target, loading_info)
    del converted
    # The group's full-size intermediates are freed: give them back, so that the working set stays one group
    _release_freed_heap()


def shard_on_read_applies(state_dict, checkpoint_files, is_quantized: bool) -> bool:
    """Whether `from_pretrained` will take the shard-on-read path (checked again on the model once it exists)."""
    return not is_quantized and _unsupported_load(state_dict, checkpoint_files, None) is None


@functools.lru_cache(maxsize=1)
def _init_without_broadcast_class():
    import deepspeed

    class InitWithoutBroadcast(deepspeed.zero.Init):
        """`zero.Init` that partitions each new parameter without first broadcasting rank 0's copy of it."""

        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return InitWithoutBroadcast


def zero3_init(shard_on_read: bool, **init_kwargs):
    """
    The `deepspeed.zero.Init` context `from_pretrained` builds a ZeRO-3 model under.

    `zero.Init` broadcasts every parameter from rank 0 as it is created, so that all ranks start from the same values.
    Under `from_pretrained` those values are uninitialised memory (`no_init_weights`), and every parameter is written
    again afterwards: from the checkpoint, or, for missing keys, initialised on rank 0 and broadcast by
    `_initialize_missing_keys`. With `shard_on_read` (the checkpoint will be read by every rank), the broadcast is
    skipped: it was most of the load time (2 CPU ranks, a 477 MB Llama: 0.3 s against 1.6 s).
    """
    import deepspeed

    if not shard_on_read or not hasattr(deepspeed.zero.Init, "_zero_init_param"):
        return deepspeed.zero.Init(**init_kwargs)
    return _init_without_broadcast_class()(**init_kwargs)


def _fall_back(reason: str):
    logger.debug(
        f"DeepSpeed ZeRO-3 load: upstream path (rank 0 reads the checkpoint, gathered per parameter): {reason}"
    )
    last_load.clear()
    last_load.update(path="upstream", reason=reason)
    return None


def _unsupported_load(state_dict, checkpoint_files, load_config) -> str | None:
    if os.environ.get(SHARD_ON_READ_ENV, "1").lower() in ("0", "false", "no", "off"):
        return f"{SHARD_ON_READ_ENV} is off"
    if state_dict is not None:
        return "a state dict was passed"
    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return "the checkpoint is not in safetensors files"
    if load_config is not None and load_config.hf_quantizer is not None:
        return "the model is quantized"
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return "torch.distributed is not initialized"
    return None


def _agree(status: int) -> int:
    """The largest status of all ranks (0 loaded, 1 not covered, 2 failed): one all-reduce per load."""
    from deepspeed.accelerator import get_accelerator

    flag = torch.tensor([status], dtype=torch.int32, device=get_accelerator().current_device_name())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def load_zero3_partitions_on_read(model, state_dict, checkpoint_files, load_config):
    """
    Fill every rank's ZeRO-3 partitions of `model` (built under `zero.Init`) straight from safetensors files.

    Returns the `LoadStateDictInfo` (missing keys, unexpected keys), or `None` when this load is not covered, in
    which case nothing was read and upstream's path must run (decided alike on every rank).
    """
    from ..utils.loading_report import LoadStateDictInfo

    reason = _unsupported_load(state_dict, checkpoint_files, load_config)
    if reason is not None:
        return _fall_back(reason)

    targets = model.state_dict(keep_vars=True)
    loading_info = LoadStateDictInfo(
        missing_keys=set(targets), unexpected_keys=set(), mismatched_keys=set(), conversion_errors={},
        error_msgs=[], skipped_pp_keys=set(),
    )
    reader, status, error = RangeReader(), 0, None
    try:
        with torch.no_grad():
            for name, tensor in targets.items():
                if not isinstance(tensor, torch.Tensor):
                    raise ShardOnReadUnsupported(f"{name} is not a tensor")
                if isinstance(tensor, torch.nn.Parameter) and not is_zero3_param(tensor):
                    raise ShardOnReadUnsupported(f"the parameter {name} was not partitioned by zero.Init")
                if is_zero3_param(tensor):
                    _check_partition_layout(name, tensor)
            index = read_safetensors_headers(checkpoint_files, reader)
            plan = plan_load(model, index, targets, load_config.weight_mapping)
            _load_all_direct(plan.direct, index, targets, reader)
            for name in plan.direct:
                _mark_loaded(name, targets[name], loading_info)
            for first_target, (converter, sources) in plan.groups.items():
                _load_group(
                    model, first_target, converter, sources, plan.group_targets[first_target], index, targets,
                    reader, loading_info,
                )
    except ShardOnReadUnsupported as e:
        status, error = 1, e
    except Exception as e:
        status, error = 2, e
    finally:
        reader.close()

    agreed = _agree(status)
    rank = torch.distributed.get_rank()
    if agreed == 2:
        # Every rank gets here: each raises its own error, or one naming the ranks that failed and why.
        from .deepspeed_expert_parallel import _raise_on_every_rank_if_any_failed

        _raise_on_every_rank_if_any_failed(error if status == 2 else None, "DeepSpeed ZeRO-3 shard-on-read load")
    if agreed == 1:
        # Upstream's path overwrites whatever this rank already wrote
        return _fall_back(str(error) if status == 1 else "not covered on another rank")

    loading_info.unexpected_keys = plan.unexpected
    model._weight_conversions = plan.used_conversions
    last_load.clear()
    last_load.update(path="shard_on_read", reason=None, bytes_read=reader.bytes_read, ranges=reader.ranges)
    logger.debug(
        f"DeepSpeed ZeRO-3 load: shard-on-read, rank {rank} filled its partitions of {len(plan.direct)} tensors and "
        f"{len(plan.groups)} converted groups from {len(checkpoint_files)} files, reading "
        f"{reader.bytes_read / 1e6:.1f} MB"
    )
    return loading_info
