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
Saving a model with expert parallelism under DeepSpeed ZeRO-3 as one standard checkpoint, every expert included.

Each rank holds only its experts (see `deepspeed_expert_parallel`), and DeepSpeed partitions them over the ranks that
hold the same experts: every save path of upstream and of the ecosystem saw one rank's experts as the whole tensor.

- `save_expert_parallel_model_under_zero3` is `save_pretrained` for such a model, on every rank, before or after
  `deepspeed.initialize`. Where every rank sees the target directory, every rank writes its part of each planned
  shard file at its planned offsets (`assign_writers`, `write_planned_checkpoint_in_parallel`): a tensor whose
  original keys are contiguous ranges of it (dense tensors, experts stored one tensor per expert without a copy, or
  fused as gpt-oss stores them) by every rank, the elements of its own ZeRO-3 partition, nothing gathered
  (`_contiguous_key_offsets`, `elements_held`); the other keys of the experts by a rank holding them, gathered over
  their ZeRO-3 partitions only; other dense tensors each gathered onto one writer. The files are those one writer
  would write, byte for byte. Otherwise (nodes with a disk each, `save_on_each_node`, a conversion needing several
  tensors at once) the tensors are gathered one at a time (`_gather_expert_parallel_tensor`: over their ZeRO-3
  partitions, then experts across the expert-parallel group) and streamed by global rank 0 (or the main rank of each
  node, with the Trainer's `save_on_each_node`) into safetensors shards whose headers are planned up front
  (`_StreamedSafetensorsFile`, `_plan_streamed_shard`), the weight conversion reverted tensor by tensor, the freed
  memory handed back after each large tensor (`_release_freed_memory`). Given the whole `state_dict` (accelerate's
  ZeRO-3 save), rank 0 writes it through the same writer.
- Writes are atomic: staged in a hidden directory inside the target, `config.json` last, synced, then moved in file by
  file (`_commit_staged_checkpoint`); the next save removes what a killed one staged (`_remove_killed_saves`). Each step
  that writes ends with an exchange of every rank's error.
- DeepSpeed's 16-bit consolidation (`engine._zero3_consolidated_16bit_state_dict`, behind `accelerator.get_state_dict`,
  `accelerator.save_model`, `engine.save_16bit_model` and the Trainer's save of adapters) gathers the experts of such
  models too (`gather_experts_in_deepspeed_consolidation`).
"""

import bisect
import collections
import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import socket
import struct
import threading
import uuid
from collections.abc import Callable
from functools import wraps
from typing import NamedTuple

from ..utils import is_torch_available, logging
from .deepspeed_expert_parallel import _raise_on_every_rank_if_any_failed, expert_parallel_layout


if is_torch_available():
    import torch
    from torch import nn


logger = logging.get_logger(__name__)


def _gather_expert_parallel_tensor(tensor, layout, ep_group, writers=(0,)):
    """
    The full value of one parameter or buffer of an expert-parallel model under ZeRO-3, on CPU on each of the global
    ranks `writers`, `None` on the other ranks. A collective: every rank calls it for the same tensor, in the same order.

    ZeRO-3 partitions dense parameters over all ranks and expert parameters over their expert-data-parallel group;
    `GatheredParameters` assembles each over its own group (a no-op for buffers, and before `deepspeed.initialize`). An
    expert parameter then holds this rank's experts only (see `ExpertShardLayout`): each expert-parallel group with a
    writer in it assembles the full tensor there, gathered onto its one writer, or onto all its ranks when it has
    several (a save on each node with expert parallelism across nodes). Every expert-parallel group holds all experts.
    """
    import deepspeed

    rank = torch.distributed.get_rank()
    is_writer = rank in writers
    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
        local = tensor.data
        if layout is None:
            return local.to("cpu", copy=True) if is_writer else None
        group_writers = [r for r in torch.distributed.get_process_group_ranks(ep_group) if r in writers]
        if not group_writers:
            return None
        full = parts = None
        if is_writer or len(group_writers) > 1:
            full = torch.empty(layout.global_shape, dtype=local.dtype, device=local.device)
            # Gathered into views of `full`, in expert-parallel rank order: no second copy of the parameter.
            parts = list(full.chunk(layout.ep_size, dim=layout.shard_dim))
        if len(group_writers) > 1:
            torch.distributed.all_gather(parts, local.contiguous(), group=ep_group)
        else:
            torch.distributed.gather(local.contiguous(), parts, dst=group_writers[0], group=ep_group)
        return full.to("cpu") if is_writer else None


def _expert_parallel_models_in(module):
    """
    The expert-parallel models under ZeRO-3 that `module` is or wraps (e.g. a PEFT model around one). Their own
    attribute, not `getattr`: wrappers such as PEFT's forward attribute look-ups to the model they wrap.
    """
    return [m for m in module.modules() if vars(m).get("_expert_parallel_handed_over", False)]


def gather_expert_parallel_state_dict_under_zero3(module, exclude_frozen_parameters=False):
    """
    DeepSpeed's ZeRO-3 16-bit consolidation (`engine._zero3_consolidated_16bit_state_dict`, behind
    `accelerator.get_state_dict`, `accelerator.save_model`, `engine.save_16bit_model` and the Trainer's save of
    adapters) for a module that is or wraps an expert-parallel model under ZeRO-3: on global rank 0 the whole state
    dict, keys and shapes as `module.state_dict()` of the same model on a single process, every expert included; `None`
    on the other ranks. A collective: every rank must call it.

    DeepSpeed's own consolidation gathers each parameter over its ZeRO group only, which for experts is the
    expert-data-parallel group: it would return rank 0's experts as if they were all of them. Here each tensor goes
    through `_gather_expert_parallel_tensor`, one at a time, tied tensors once.
    """
    (model,) = _expert_parallel_models_in(module)
    # By the parameters themselves: wrappers may rename them (PEFT's `base_layer`)
    layouts = {id(param): getattr(param, "expert_shard_layout", None) for param in model.parameters()}
    ep_group = model._mesh_manager.get_mesh("ep").get_group()
    is_writer = torch.distributed.get_rank() == 0
    state_dict, gathered = collections.OrderedDict(), {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if exclude_frozen_parameters and isinstance(tensor, nn.Parameter) and not tensor.requires_grad:
            continue
        if id(tensor) not in gathered:
            layout = layouts.get(id(tensor))
            gathered[id(tensor)] = _gather_expert_parallel_tensor(tensor, layout, ep_group)
        if is_writer:
            state_dict[name] = gathered[id(tensor)]
    if not exclude_frozen_parameters:
        # Read by the `save_pretrained` call that follows on the ranks without it (`_state_dict_sent_to_rank_0`)
        model._whole_state_dict_sent_to_rank_0 = True
    return state_dict if is_writer else None


def _state_dict_sent_to_rank_0(model):
    """
    Whether the last save-related collective on `model` gathered its whole state dict onto rank 0 (and forget it).
    accelerate's ZeRO-3 save, `save_pretrained(dir, state_dict=accelerator.get_state_dict(model),
    is_main_process=...)` on every rank, calls `save_pretrained` without a state dict on the other ranks, exactly as the
    Trainer and users call it for the gathering save on every rank: this record tells the two apart.
    """
    sent = getattr(model, "_whole_state_dict_sent_to_rank_0", False)
    model._whole_state_dict_sent_to_rank_0 = False
    return sent


def _writing_ranks(calls):
    """
    The ranks that write in a gathering save, from each rank's `(is_main_process, hostname)`: on each host, the first
    rank that passed `is_main_process=True`. So rank 0 alone when only the main process passes it (accelerate's
    `accelerator.is_main_process`, the Trainer) or on a single host; the main rank of each node with the Trainer's
    `save_on_each_node` (`accelerator.is_local_main_process`), each node then holding the whole checkpoint on its own
    disk. `save_pretrained` writes on every rank that passes `True`, its default: one rank per host does it here,
    writing the same files, staged apart and committed atomically, where a file system is shared.
    """
    writers, hosts = [], set()
    for rank, (is_main_process, host) in enumerate(calls):
        if is_main_process and host not in hosts:
            writers.append(rank)
            hosts.add(host)
    return writers


def _consolidate_expert_parallel_models_too(engine_class):
    """
    Make `engine_class._zero3_consolidated_16bit_state_dict` gather the experts of expert-parallel models across their
    expert-parallel group (`gather_expert_parallel_state_dict_under_zero3`); other models keep DeepSpeed's own. Done
    once, when the first such model is handed over to DeepSpeed: accelerate, the Trainer and users call this engine
    method, which DeepSpeed builds after the model, so the model cannot bring its own.
    """
    consolidate = engine_class._zero3_consolidated_16bit_state_dict
    if getattr(consolidate, "gathers_expert_parallel_models", False):
        return

    @wraps(consolidate)
    def consolidate_with_experts(engine, exclude_frozen_parameters=False):
        if not _expert_parallel_models_in(engine.module):
            return consolidate(engine, exclude_frozen_parameters=exclude_frozen_parameters)
        # What DeepSpeed's consolidation does around its gathers, e.g. for NVMe-offloaded optimizer states
        if engine._optimizer_has_ckpt_event_prologue():
            engine.optimizer.checkpoint_event_prologue()
        state_dict = gather_expert_parallel_state_dict_under_zero3(engine.module, exclude_frozen_parameters)
        if engine._optimizer_has_ckpt_event_epilogue():
            engine.optimizer.checkpoint_event_epilogue()
        return state_dict

    consolidate_with_experts.gathers_expert_parallel_models = True
    engine_class._zero3_consolidated_16bit_state_dict = consolidate_with_experts


def gather_experts_in_deepspeed_consolidation():
    """
    Called when a model is handed over to DeepSpeed (`prepare_expert_parallel_model_for_deepspeed`): from then on,
    DeepSpeed's 16-bit consolidation gathers the experts of expert-parallel models across their expert-parallel group
    (`_consolidate_expert_parallel_models_too`).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    _consolidate_expert_parallel_models_too(DeepSpeedEngine)


def check_expert_parallel_state_dict_is_whole(model, state_dict):
    """
    `save_pretrained(state_dict=...)` of an expert-parallel model under ZeRO-3 writes the tensors it is given: refuse a
    state dict that holds one rank's experts or ZeRO-3 partitions (e.g. `model.state_dict()`) instead of the whole
    model, which would make a checkpoint that fails at reload.
    """
    layout = expert_parallel_layout(model)
    for name, param in model.named_parameters():
        tensor = state_dict.get(name)
        expected = layout[name].global_shape if name in layout else tuple(getattr(param, "ds_shape", param.shape))
        if tensor is not None and tuple(tensor.shape) != tuple(expected):
            raise ValueError(
                f"`state_dict[{name!r}]` has the shape {tuple(tensor.shape)}, not the model's {tuple(expected)}: it "
                "holds this rank's share of an expert-parallel model under DeepSpeed ZeRO-3, not the whole tensor. "
                "Pass `accelerator.get_state_dict(model)` (or the DeepSpeed engine's "
                "`_zero3_consolidated_16bit_state_dict()`), or call `save_pretrained` on every rank without "
                "`state_dict`: both gather every expert."
            )


class _StreamedSafetensorsFile:
    """
    A safetensors file written one tensor at a time, in the standard format: its header (names, dtypes, shapes,
    offsets) is written first, from meta tensors, so the writer never holds more than the tensor being written.
    """

    _DTYPES = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }

    def __init__(self, path, meta_tensors, metadata, write_header=True):
        self.entries, position = {}, 0
        for name, meta in meta_tensors.items():
            size = meta.numel() * meta.element_size()
            offsets = [position, position + size]
            self.entries[name] = {"dtype": self._DTYPES[meta.dtype], "shape": list(meta.shape), "data_offsets": offsets}
            position += size
        header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        self.data_start = 8 + len(header)
        self.written, self.bytes_written = set(), 0
        # Several processes may write parts of one file (`_write_shard_in_parallel`): created if needed, never truncated
        self.file = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), "wb")
        if write_header:
            self.file.write(struct.pack("<Q", len(header)) + header)

    def write(self, name, tensor):
        entry = self.entries[name]
        if list(tensor.shape) != entry["shape"] or self._DTYPES[tensor.dtype] != entry["dtype"]:
            raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, planned {entry}")
        position = self.data_start + entry["data_offsets"][0]
        self.file.seek(position)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
        self.file.write(data)
        self.file.flush()
        _start_writeback(self.file.fileno(), position, data.nbytes)
        self.written.add(name)
        self.bytes_written += data.nbytes

    # The bytes `write_elements` copies from an accelerator at a time
    _COPY_CHUNK_BYTES = 64 << 20

    def write_elements(self, name, first, values):
        """
        Write the flat 1-D `values` as the elements of the tensor `name` from its `first` element on, at their offset
        in the file (`os.pwrite`: several processes write parts of one tensor). Copied to the CPU in chunks of at most
        `_COPY_CHUNK_BYTES`; CPU tensors are written without a copy.
        """
        entry, size = self.entries[name], values.element_size()
        if self._DTYPES[values.dtype] != entry["dtype"] or values.dim() != 1:
            raise ValueError(f"{name}: got {values.dtype} {list(values.shape)} to write as part of {entry}")
        start, end = entry["data_offsets"]
        position = self.data_start + start + first * size
        if position + values.numel() * size > self.data_start + end:
            raise ValueError(f"{name}: elements {first} to {first + values.numel()} are past its end ({entry})")
        self.file.flush()  # the header, written through the buffer, goes before
        step = max(1, self._COPY_CHUNK_BYTES // size)
        for chunk in values.detach().split(step):
            data = chunk.to("cpu").contiguous().view(torch.uint8).numpy().data
            while data:
                count = os.pwrite(self.file.fileno(), data, position)
                _start_writeback(self.file.fileno(), position, count)
                data, position = data[count:], position + count
                self.bytes_written += count

    def numel(self, name):
        """The number of elements of the tensor `name`."""
        return math.prod(self.entries[name]["shape"])

    def finish(self, expected=None, expected_bytes=None):
        """Close the file once the tensors `expected` (all of them by default) and `expected_bytes` are written."""
        if missing := set(self.entries if expected is None else expected) - self.written:
            raise RuntimeError(f"Tensors planned but not written: {sorted(missing)}")
        if expected_bytes is not None and self.bytes_written != expected_bytes:
            raise RuntimeError(f"Wrote {self.bytes_written} bytes of tensor data, planned {expected_bytes}")
        self.file.close()

    def close_after_failure(self):
        """Close the file of a write that failed, whose error is reported already: closing flushes what the buffer
        holds, which fails again on a full disk; raised here, that error would skip the collective reporting the
        first one, and the other ranks would wait for it."""
        with contextlib.suppress(OSError):
            self.file.close()


_sync_file_range = None
# sync_file_range(2)'s SYNC_FILE_RANGE_WRITE: start writing the range back, without waiting
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(descriptor, position, count):
    """
    Have the kernel start writing `count` bytes at `position` of the file to disk now (Linux), so that the sync before
    the commit finds most of the checkpoint written already instead of all of it at once.
    """
    global _sync_file_range
    if _sync_file_range is None:
        try:
            _sync_file_range = ctypes.CDLL("libc.so.6", use_errno=True).sync_file_range
            _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(descriptor, position, count, _SYNC_FILE_RANGE_WRITE)


_malloc_trim = None


def _release_freed_memory():
    """
    Hand the memory of freed tensors back to the OS (glibc only). Gathering one full tensor after another, each freed
    before the next, still made resident memory grow by about the model's size over a save: glibc keeps such freed
    blocks mapped once its mmap threshold has grown to their size.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def _plan_streamed_shard(revert, meta_state_dict, names, whole):
    """
    The tensors (keys in the original layout, meta tensors, in file order) of one shard whose every tensor can be
    converted back on its own, as it is gathered; `whole` is the shard's meta tensors converted together. `None` when
    a conversion needs several tensors at once: the shard is then collected and converted whole.
    """
    metas = {}
    for name in names:
        try:
            converted = revert({name: meta_state_dict[name]})
        except Exception:
            return None
        for key, meta in converted.items():
            if key in metas or key not in whole or whole[key].shape != meta.shape or whole[key].dtype != meta.dtype:
                return None
            metas[key] = meta
    return metas if len(metas) == len(whole) else None


_STAGING_PREFIX = ".save-in-progress-"


def _staging_directory_name():
    """
    A save stages its files in a hidden directory inside the target, named after the host and process, so that a later
    save on the same host can tell the leftovers of a killed one (`_remove_killed_saves`).
    """
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
    return f"{_STAGING_PREFIX}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_killed_saves(directory):
    """
    Remove the staging directories in `directory` that saves on this host left when they were killed midway (their
    process is gone). They never load (`config.json` is staged last), but they take disk space.
    """
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
    pattern = re.compile(re.escape(f"{_STAGING_PREFIX}{host}-") + r"(\d+)-[0-9a-f]{8}")
    for entry in os.scandir(directory):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # a save in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        logger.info(f"Removing {entry.path}, left by a save into {directory} that was interrupted")
        shutil.rmtree(entry.path, ignore_errors=True)


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Inside a committed save's staging directory: the previous checkpoint's files it replaced, removed in the background
_PREVIOUS_FILES = "previous"


def _commit_staged_checkpoint(staging, directory, is_previous_weights):
    """
    Move the complete checkpoint staged in `staging` (a directory inside `directory`, so on the same file system) into
    `directory`, file by file with atomic renames: this works where the directory itself cannot be replaced, e.g. the
    root of a mounted volume, or a directory whose parent is not writable. Files of `directory` that the save does not
    write (tokenizer, training state) stay, as with `save_pretrained`; the previous weights (`is_previous_weights`)
    that the new ones do not replace are removed.

    A checkpoint is complete when its `config.json` is there: the previous one loses it first, the new one gets it
    last, so a save killed while moving files leaves a directory that does not load, never a mix that does. The
    previous files are moved aside into `staging` (renames: freeing a large file's disk blocks and cached pages takes
    a while), which is then removed in the background (`_remove_in_the_background`).
    """
    staged = set(os.listdir(staging))
    previous = os.path.join(staging, _PREVIOUS_FILES)
    os.mkdir(previous)

    def move_aside(name):
        with contextlib.suppress(FileNotFoundError):
            os.replace(os.path.join(directory, name), os.path.join(previous, name))

    move_aside("config.json")
    for name in sorted(e for e in os.listdir(directory) if is_previous_weights(e) and e not in staged):
        move_aside(name)
    _fsync(directory)
    # Weights first, then the index and other files, `config.json` last
    for name in sorted(staged, key=lambda name: (name == "config.json", not name.endswith(".safetensors"), name)):
        move_aside(name)
        os.replace(os.path.join(staging, name), os.path.join(directory, name))
    _fsync(directory)
    _remove_in_the_background(staging)


def _remove_in_the_background(path):
    """
    Remove `path` (a committed save's staging directory, holding the previous files) in a thread, so the save returns
    without waiting for it; not a daemon thread, so the process finishes it before it exits. What a killed process
    left, the next save into the directory removes (`_remove_killed_saves`).
    """
    threading.Thread(
        target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, name="remove-previous-checkpoint"
    ).start()


def _refuse_unsupported_save_options(model, push_to_hub, distributed_checkpoint):
    """Raised alike on every rank, before any collective; each message says what to do instead."""
    instead = {
        "`push_to_hub`": "save, then upload the directory (`huggingface_hub.upload_folder`, or the Trainer's "
        "`push_to_hub`)",
        "`distributed_checkpoint`": "use the DeepSpeed engine's `save_checkpoint` to checkpoint training",
        "transformers adapters": "use PEFT (`get_peft_model`) and the Trainer, or save the adapter state dict "
        "gathered by `accelerator.get_state_dict(model)`",
        "quantization": "save the model before quantizing it",
    }
    used = {
        "`push_to_hub`": push_to_hub,
        "`distributed_checkpoint`": distributed_checkpoint,
        "transformers adapters": getattr(model, "_hf_peft_config_loaded", False),
        "quantization": getattr(model, "hf_quantizer", None) is not None,
    }
    if any(used.values()):
        raise NotImplementedError(
            "Saving a model with expert parallelism under DeepSpeed ZeRO-3 does not support "
            + "; ".join(f"{name} ({instead[name]})" for name, on in used.items() if on)
            + "."
        )


def _meta_state_dict(model, tensors, full_shape):
    """The tensors to save as meta tensors of their full shape (`full_shape(name, tensor)`), tied copies removed."""
    from ..modeling_utils import remove_tied_weights_from_state_dict

    meta = {name: torch.empty(full_shape(name, t), dtype=t.dtype, device="meta") for name, t in tensors.items()}
    return remove_tied_weights_from_state_dict(meta, model)


class CheckpointPlan(NamedTuple):
    """
    What a save writes, decided from shapes and dtypes alone before anything is gathered or written, the same on
    every rank (`plan_checkpoint`).
    """

    # The tensors to save under the model's names, as meta tensors of their full shape, tied copies removed
    meta_state_dict: dict
    # Shard file name -> the names of the tensors it holds (huggingface_hub's split)
    shards: dict
    # Per shard, in the order of `shards`: its meta tensors converted back to the original key layout
    converted_shards: list
    # The reverse weight conversion, a state dict to a state dict (the identity with `save_original_format=False`)
    revert: Callable
    weights_name: str
    index_name: str
    is_sharded: bool
    # The index's metadata (total size)
    metadata: dict


def plan_checkpoint(model, meta_state_dict, max_shard_size, variant=None, save_original_format=True) -> CheckpointPlan:
    """
    1. The plan: the shards from the full shapes and dtypes (`meta_state_dict`), then the reverse weight conversion
    (`revert_weight_conversion`) shard by shard, checked up front to give the keys and shapes converting the whole
    state dict at once gives: a conversion needing tensors of two shards would fail, or silently lose keys, on one
    shard alone.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    from ..core_model_loading import revert_weight_conversion
    from ..modeling_utils import _add_variant
    from ..utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    weights_name = _add_variant(SAFE_WEIGHTS_NAME, variant)
    split = split_torch_state_dict_into_shards(
        meta_state_dict,
        filename_pattern=weights_name.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )

    def revert(shard_state_dict):
        return revert_weight_conversion(model, shard_state_dict) if save_original_format else shard_state_dict

    whole = revert(dict(meta_state_dict))
    try:
        converted_shards = [
            revert({name: meta_state_dict[name] for name in names}) for names in split.filename_to_tensors.values()
        ]
        conversion_error = None
    except Exception as e:
        converted_shards, conversion_error = [], e
    if (
        conversion_error is not None
        or sorted(key for converted in converted_shards for key in converted) != sorted(whole)
        or any(converted[key].shape != whole[key].shape for converted in converted_shards for key in converted)
    ):
        raise RuntimeError(
            "Some weights are converted back to the original checkpoint format from several weights that fall in "
            "different shard files. Try another `max_shard_size`, or set `save_original_format=False`."
        ) from conversion_error
    return CheckpointPlan(
        meta_state_dict=meta_state_dict,
        shards={file_name: list(names) for file_name, names in split.filename_to_tensors.items()},
        converted_shards=converted_shards,
        revert=revert,
        weights_name=weights_name,
        index_name=_add_variant(SAFE_WEIGHTS_INDEX_NAME, variant),
        is_sharded=split.is_sharded,
        metadata=split.metadata,
    )


def _create_staging_directory(save_directory):
    """The target directory (created if needed, the leftovers of killed saves removed) and a new staging one in it."""
    directory = os.path.realpath(save_directory)
    if os.path.isfile(directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    os.makedirs(directory, exist_ok=True)
    _remove_killed_saves(directory)
    staging = os.path.join(directory, _staging_directory_name())
    os.mkdir(staging)
    return staging


def _write_shard(plan, staging, shard_file, names, converted, fetch, is_writer, release_memory):
    """
    3. One shard: `fetch(name)` (on every rank: in a collective save each fetch is a gather) gives each tensor whole,
    which the writer converts back to the original layout and streams into the shard file as soon as it has it
    (`_StreamedSafetensorsFile`), unless a conversion needs several tensors of the shard: it then collects the shard
    and converts it whole. Returns the keys written and the writer's error (`None` when it succeeded): a writer that
    failed still fetches every tensor, as the other ranks do.
    """
    from safetensors.torch import save_file

    shard, streamed, streamed_keys, error = {}, None, None, None
    if is_writer:
        try:
            streamed_keys = _plan_streamed_shard(plan.revert, plan.meta_state_dict, names, converted)
            if streamed_keys is not None:
                streamed = _StreamedSafetensorsFile(
                    os.path.join(staging, shard_file), streamed_keys, metadata={"format": "pt"}
                )
        except Exception as e:
            error = e
    written = []
    try:
        for name in names:
            tensor = fetch(name)
            if is_writer and error is None:
                try:
                    if streamed is None:
                        shard[name] = tensor
                    else:
                        for key, value in plan.revert({name: tensor}).items():
                            streamed.write(key, value)
                except Exception as e:
                    error = e
            del tensor
            if release_memory and plan.meta_state_dict[name].nbytes >= 1 << 20:
                _release_freed_memory()
        if is_writer and error is None:
            try:
                if streamed is not None:
                    streamed.finish()
                    written = list(streamed_keys)
                else:
                    shard = plan.revert(shard)
                    save_file(
                        {key: value.contiguous() for key, value in shard.items()},
                        os.path.join(staging, shard_file),
                        metadata={"format": "pt"},
                    )
                    written = list(shard)
            except Exception as e:
                error = e
    finally:
        if streamed is not None:
            streamed.close_after_failure()
    return written, error


def _write_index_and_configs(model, staging, plan, weight_map):
    """The index of a sharded checkpoint, the remote code, the generation config, and `config.json` last."""
    from ..dynamic_module_utils import custom_object_save

    if plan.is_sharded:
        parameter_names = {name for name, _ in model.named_parameters()}
        total_parameters = sum(t.numel() for name, t in plan.meta_state_dict.items() if name in parameter_names)
        index = {"metadata": {"total_parameters": total_parameters, **plan.metadata}, "weight_map": weight_map}
        with open(os.path.join(staging, plan.index_name), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if model.is_remote_code():
        custom_object_save(model, staging, config=model.config)
    if model.can_generate():
        model.generation_config.save_pretrained(staging)
    # Last: a directory without `config.json` does not load.
    model.config.save_pretrained(staging)


def _unless_failed(error, step, *args):
    """
    `(error, step(*args))`, or `(the error step raised, None)`, not raised; `step` is skipped after an `error`. In a
    collective save a rank that failed must go on with the collectives, until every rank learns of its error.
    """
    if error is not None:
        return error, None
    try:
        return None, step(*args)
    except Exception as e:
        return e, None


def write_planned_checkpoint(model, save_directory, plan, fetch, is_writer, exchange_errors, release_memory=False):
    """
    Write the checkpoint `plan` describes into `save_directory`, each tensor whole from `fetch(name)` (called on every
    rank, in the plan's order): the writer (`is_writer`) stages it in a hidden directory inside `save_directory`
    (2.), writes the shards one tensor at a time (3., `_write_shard`), the index and the configs, `config.json` last,
    syncs them, then moves them in file by file (4., `_commit_staged_checkpoint`): a save that fails or is killed
    leaves the previous checkpoint as it was, and no incomplete checkpoint loads. Each step that writes ends with
    `exchange_errors(error, action)`, which raises the writer's error (on every rank, in a collective save) instead of
    letting the other ranks wait in the next gather. `release_memory`: hand the memory of each large tensor back to
    the OS once written (`_release_freed_memory`).
    """
    directory = os.path.realpath(save_directory)
    staging = error = None
    try:
        if is_writer:
            error, staging = _unless_failed(None, _create_staging_directory, save_directory)
        exchange_errors(error, f"Saving the model (creating a directory in {save_directory})")

        weight_map = {}
        for (shard_file, names), converted in zip(plan.shards.items(), plan.converted_shards):
            written, error = _write_shard(plan, staging, shard_file, names, converted, fetch, is_writer, release_memory)
            weight_map.update(dict.fromkeys(written, shard_file))
            exchange_errors(error, f"Saving the model (writing {shard_file})")

        if is_writer:
            error, _ = _unless_failed(None, _commit_checkpoint, model, staging, directory, plan, weight_map)
            if error is None:
                staging = None  # committed: removed in the background
        exchange_errors(error, f"Saving the model (moving it into {save_directory})")
    finally:
        if staging is not None and os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


# Whether a collective save may have every rank write its part (`_assign_writers_if_parallel`); tests turn it off to
# compare with the checkpoint global rank 0 writes alone.
PARALLEL_WRITE = True
# The bytes of tensor data this process wrote in its last save (tests and `make bench-save` report them).
last_save_bytes_written = 0


class WriterAssignment(NamedTuple):
    """Which rank writes what in a save where every rank writes (`assign_writers`), the same on every rank."""

    # Per shard, in the order of the plan's shards: its tensors in the original key layout (meta tensors), in file order
    shard_keys: list
    # Original key -> the global rank that writes it (keys written whole by one rank)
    key_writers: dict
    # Model tensor -> the global rank it is gathered onto whole (dense tensors)
    tensor_writers: dict
    # Model tensor -> its original keys, for experts stored one tensor per expert: each is written by a rank holding it
    expert_keys: dict
    # The bytes of tensor data each global rank writes
    bytes_per_rank: list
    # Model tensor -> {original key: its first element in the tensor}, for tensors each of whose keys is a contiguous
    # range of it: every rank writes the elements it holds (`elements_held`), nothing is gathered
    key_offsets: dict
    # Model tensor in `key_offsets` -> per global rank, the elements `(start, end)` it holds and writes
    element_ranges: dict
    # Global rank -> its index in its expert-data-parallel group (ZeRO-3's partition of its experts)
    edp_ranks: tuple


def _contiguous_key_offsets(revert, name, meta):
    """
    For the model tensor `name` (`meta`, of its full shape, not a view): {original key: its first element} when the
    conversion back to the original layout gives each key as a contiguous range of the tensor's elements, unconverted
    (a rename, a slice along the first dimensions: experts stored one tensor per expert, or fused as gpt-oss stores
    them), seen on meta tensors as views of it. `None` otherwise (a copy, a transpose, a dtype cast, keys built from
    several tensors): the tensor is then gathered whole for its writer.
    """
    try:
        converted = revert({name: meta})
    except _PROBE_ERRORS:
        return None
    offsets = {}
    for key, value in converted.items():
        is_view = value is meta or (value._is_view() and value._base is meta)
        if not is_view or not value.is_contiguous() or value.dtype != meta.dtype or value.numel() == 0:
            return None
        offsets[key] = value.storage_offset()
    return offsets


def elements_held(numel, layout, rank, ep_ranks, edp_ranks):
    """
    The elements `[start, end)` of a tensor of `numel` elements (flattened, full shape) that global `rank` holds as
    ZeRO-3 partitions it, and writes when its keys are contiguous ranges (`_contiguous_key_offsets`): a dense tensor
    is partitioned over all ranks, an expert tensor is this rank's experts (`layout`, sharded on the first dimension)
    partitioned over its expert-data-parallel group, each part `ceil(n / parts)` elements as DeepSpeed pads them, in
    the order of the ranks in the group (`ep_ranks` / `edp_ranks`: each global rank's index in its expert-parallel /
    expert-data-parallel group).
    """
    if layout is None:
        count, parts, index, base = numel, len(ep_ranks), rank, 0
    else:
        count = numel // layout.ep_size
        parts, index, base = len(ep_ranks) // layout.ep_size, edp_ranks[rank], ep_ranks[rank] * count
    size = -(-count // parts)
    start = min(index * size, count)
    return base + start, base + min(start + size, count)


# The size `_expert_rank_of_keys` cuts the probe's dimensions other than the experts' to: divisible by 2 to 6
_PROBE_SIZE = 60


def _expert_probe(layout, experts, first):
    """
    A probe of `experts` experts whose values are their expert index, from `first`: a view of an `arange` (no memory
    of its shape), its other dimensions cut to at most `_PROBE_SIZE` (conversions split and copy along them: a probe
    of the full shape would cost the model's size at every save). Returns the `arange` and the probe.
    """
    index = torch.arange(first, first + experts, dtype=torch.float64)
    shape = [1] * len(layout.global_shape)
    shape[layout.shard_dim] = experts
    reduced = [
        experts if dim == layout.shard_dim else min(size, _PROBE_SIZE) for dim, size in enumerate(layout.global_shape)
    ]
    return index, index.view(shape).expand(reduced)


def _expert_range(value, index):
    """The lowest and highest expert index in `value`, converted from a probe over `index` (`_expert_probe`): read
    from its offset and strides where it is a view of the probe, from its values where the conversion copied it."""
    if value.untyped_storage().data_ptr() == index.untyped_storage().data_ptr():
        extents = [(size - 1) * stride for size, stride in zip(value.shape, value.stride())]
        low = value.storage_offset() + sum(min(0, extent) for extent in extents)
        high = value.storage_offset() + sum(max(0, extent) for extent in extents)
        return int(index[low].item()), int(index[high].item())
    return int(value.min().item()), int(value.max().item())


_PROBE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError)


def _expert_rank_of_keys(revert, name, layout):
    """
    The expert-parallel rank holding each original key of the expert parameter `name` (`revert` splits it per
    expert, as Mixtral and Qwen3-MoE store their experts), or `None` when some key spans experts of several ranks
    (fused experts, as gpt-oss stores them). Found by reverting a probe of all the experts (`_expert_probe`), which
    must give the keys the meta tensor of the full shape gives.
    """
    experts = layout.global_shape[layout.shard_dim]
    if experts % layout.ep_size:
        return None
    index, probe = _expert_probe(layout, experts, 0)
    try:
        converted = revert({name: probe})
        expected = revert({name: torch.empty(layout.global_shape, dtype=torch.float64, device="meta")})
    except _PROBE_ERRORS:
        return None
    if sorted(converted) != sorted(expected) or any(value.numel() == 0 for value in converted.values()):
        return None
    owners, per_rank = {}, experts // layout.ep_size
    for key, value in converted.items():
        low, high = _expert_range(value, index)
        if low // per_rank != high // per_rank:
            return None
        owners[key] = low // per_rank
    return owners


def _local_expert_keys(revert, name, layout):
    """
    What the conversion gives for this rank's experts alone (a tensor of its `num_experts // ep_size` experts, the
    keys numbered from 0), as keys of the whole model: local key -> key, matched by expert, in the order the
    conversion gives them, from probes (`_expert_probe`). `None` where it does not split them alike (a key holding
    several experts, a conversion reading the number of experts elsewhere): the experts are then converted in a tensor
    of the full shape.
    """
    experts = layout.global_shape[layout.shard_dim]
    local = experts // layout.ep_size
    first = layout.ep_rank * local

    def keys_by_expert(count, start):
        index, probe = _expert_probe(layout, count, start)
        by_expert = {}
        for key, value in revert({name: probe}).items():
            low, high = _expert_range(value, index) if value.numel() else (None, -1)
            if low != high:
                return None
            by_expert.setdefault(low, []).append(key)
        return by_expert

    try:
        whole, part = keys_by_expert(experts, 0), keys_by_expert(local, first)
    except _PROBE_ERRORS:
        return None
    if whole is None or part is None or sorted(part) != list(range(first, first + local)):
        return None
    if any(len(keys) != len(whole.get(expert, ())) for expert, keys in part.items()):
        return None
    return {key: whole_key for expert, keys in part.items() for key, whole_key in zip(keys, whole[expert])}


def _default_edp_ranks(ep_ranks):
    """Each global rank's index among the ranks holding the same experts, in rank order (the expert mesh's order)."""
    seen = collections.Counter()
    indices = []
    for ep_rank in ep_ranks:
        indices.append(seen[ep_rank])
        seen[ep_rank] += 1
    return tuple(indices)


def _elements_of_spans_in(spans, start, end):
    """
    How many elements of `spans` (sorted, non-overlapping `(first, last)` ranges: a tensor's keys) lie in `[start,
    end)`. Bisected to the span holding `start`: each rank visits only the keys its range meets, not every key of the
    tensor (ranks x experts per save at thousands of ranks).
    """
    count = 0
    # The span starting at or before `start` may reach into the range: begin with it
    for first, last in spans[max(0, bisect.bisect_right(spans, (start, math.inf)) - 1) :]:
        if first >= end:
            break
        count += max(0, min(end, last) - max(start, first))
    return count


def _reverting_each_meta_tensor_once(revert):
    """`revert`, remembering what it gave for each meta tensor alone (the plan converts each tensor several times)."""
    converted = {}

    def revert_once(state_dict):
        if len(state_dict) != 1 or next(iter(state_dict.values())).device.type != "meta":
            return revert(state_dict)
        ((name, tensor),) = state_dict.items()
        if (name, id(tensor)) not in converted:
            converted[name, id(tensor)] = tensor, revert(state_dict)  # the tensor kept: its id stays its own
        return converted[name, id(tensor)][1]

    return revert_once


def assign_writers(plan, layouts, ep_ranks, edp_ranks=None, by_element=True):
    """
    Every rank writes (`ep_ranks` / `edp_ranks`: each global rank's index in its expert-parallel / expert-data-parallel
    group). A tensor whose every original key is a contiguous range of it (`_contiguous_key_offsets`; with
    `by_element`) is written by every rank, each the elements it holds as ZeRO-3 partitions them (`elements_held`):
    nothing gathered, each byte written once. Then each original key of an expert stored one tensor per expert goes to
    the least loaded rank holding that expert (no gather across the expert-parallel group), then each other dense
    tensor, largest first, whole to the least loaded rank. From the plan alone, so the same on every rank. `None` when
    a shard cannot be streamed tensor by tensor (a conversion needing several tensors at once), or experts stored fused
    (a key spanning the experts of several ranks) need a conversion: the save is then written by one rank.
    """
    edp_ranks = _default_edp_ranks(ep_ranks) if edp_ranks is None else tuple(edp_ranks)
    revert = _reverting_each_meta_tensor_once(plan.revert)
    shard_keys = []
    for names, converted in zip(plan.shards.values(), plan.converted_shards):
        keys = _plan_streamed_shard(revert, plan.meta_state_dict, names, converted)
        if keys is None:
            return None
        shard_keys.append(keys)
    sizes = {key: meta.numel() * meta.element_size() for keys in shard_keys for key, meta in keys.items()}
    metas = {key: meta for keys in shard_keys for key, meta in keys.items()}
    loads = [0] * len(ep_ranks)

    def give(keys, candidates):
        writer = min(candidates, key=lambda rank: (loads[rank], rank))
        for key in keys:
            key_writers[key] = writer
            loads[writer] += sizes[key]
        return writer

    key_writers, tensor_writers, expert_keys, key_offsets, element_ranges, whole = {}, {}, {}, {}, {}, []
    for names in plan.shards.values():
        for name in names:
            layout, meta = layouts.get(name), plan.meta_state_dict[name]
            offsets = _contiguous_key_offsets(revert, name, meta) if by_element else None
            if offsets is not None and (layout is None or layout.shard_dim == 0):
                key_offsets[name] = offsets
                element_ranges[name] = [
                    elements_held(meta.numel(), layout, rank, ep_ranks, edp_ranks) for rank in range(len(ep_ranks))
                ]
                spans = sorted((first, first + metas[key].numel()) for key, first in offsets.items())
                for rank, (start, end) in enumerate(element_ranges[name]):
                    loads[rank] += _elements_of_spans_in(spans, start, end) * meta.element_size()
                continue
            owners = None if layout is None else _expert_rank_of_keys(plan.revert, name, layout)
            keys = list(revert({name: meta}))
            if layout is None:
                whole.append((name, keys))
                continue
            if owners is None or sorted(owners) != sorted(keys):
                # Experts stored fused and converted (a key spanning ranks, not a range of the tensor): one writer
                return None
            expert_keys[name] = keys
            for key, ep_rank in owners.items():
                give([key], [rank for rank, held in enumerate(ep_ranks) if held == ep_rank])
    for name, keys in sorted(whole, key=lambda item: -sum(sizes[key] for key in item[1])):
        tensor_writers[name] = give(keys, range(len(ep_ranks)))
    return WriterAssignment(
        shard_keys, key_writers, tensor_writers, expert_keys, loads, key_offsets, element_ranges, edp_ranks
    )


def _assign_writers_if_parallel(plan, layouts, calls, writers):
    """
    The writers of a collective save where every rank writes (`assign_writers`), from each rank's `(is_main_process,
    hostname, ep_rank, edp_rank, partitions_readable)`; `None` where global rank 0 writes alone (or the main rank of
    each node, saving on each node), or where a tensor does not convert back on its own. Whether every rank sees the
    directory is checked as the write starts (`_every_rank_sees_the_staging_directory`). Ranks write the elements
    they hold in place only where every rank can read its ZeRO-3 partitions (`_partitions_readable`).
    """
    if not PARALLEL_WRITE or writers != [0]:
        return None
    ep_ranks, edp_ranks = [call[2] for call in calls], [call[3] for call in calls]
    return assign_writers(plan, layouts, ep_ranks, edp_ranks, by_element=all(call[4] for call in calls))


def _partitions_readable(tensors, layouts):
    """
    Whether this rank can read every ZeRO-3 partition it holds, each where `elements_held` places it: not where
    DeepSpeed swaps parameters to NVMe or quantized frozen ones (ZeRO++), nor where it partitions a tensor over other
    ranks than all of them (dense) or its expert-data-parallel group (experts; MiCS shards within smaller groups).
    Such saves gather every tensor instead.
    """
    world_size = torch.distributed.get_world_size()
    for name, tensor in tensors.items():
        partition = getattr(tensor, "ds_tensor", None)
        if partition is None:
            continue
        if getattr(partition, "final_location", None) == "nvme" or hasattr(partition, "ds_quant_scale"):
            return False
        layout = layouts.get(name)
        planned = world_size if layout is None else world_size // layout.ep_size
        if torch.distributed.get_world_size(group=tensor.ds_process_group) != planned:
            return False
    return True


def _elements_to_write(name, tensor, layout, assignment):
    """
    The elements this rank holds of the model tensor `name` (`assignment.element_ranges`, flattened, as one 1-D
    tensor, without a copy) and the first one's index: its ZeRO-3 partition (`ds_tensor`, checked to be the partition
    planned), or the same range of the whole local tensor before DeepSpeed partitioned it.
    """
    rank = torch.distributed.get_rank()
    start, end = assignment.element_ranges[name][rank]
    partition = getattr(tensor, "ds_tensor", None)
    if partition is None:
        local_start = start if layout is None else start - layout.ep_rank * tensor.numel()  # after its EP slices
        return start, tensor.data.reshape(-1)[local_start : local_start + end - start]
    group_rank = torch.distributed.get_rank(group=tensor.ds_process_group)
    planned = rank if layout is None else assignment.edp_ranks[rank]
    if group_rank != planned or partition.ds_numel < end - start:
        raise RuntimeError(
            f"{name}: DeepSpeed holds partition {group_rank} ({partition.ds_numel} elements) on rank {rank}, the save "
            f"planned partition {planned} (elements {start} to {end})."
        )
    return start, partition.reshape(-1)[: end - start]


def _write_elements_held(shard, name, tensor, layout, assignment):
    """3. (every rank writing) This rank's elements of each original key of `name` (`_elements_to_write`), in place."""
    start, values = _elements_to_write(name, tensor, layout, assignment)
    end = start + values.numel()
    for key, first in assignment.key_offsets[name].items():
        low, high = max(start, first), min(end, first + shard.numel(key))
        if low < high:
            shard.write_elements(key, low - first, values[low - start : high - start])


def _bytes_planned(assignment, keys, rank):
    """The bytes of tensor data `rank` writes into the shard of `keys` (original key -> meta tensor)."""
    total = sum(meta.nbytes for key, meta in keys.items() if assignment.key_writers.get(key) == rank)
    for name, offsets in assignment.key_offsets.items():
        start, end = assignment.element_ranges[name][rank]
        for key, first in offsets.items():
            if key in keys:
                overlap = min(end, first + keys[key].numel()) - max(start, first)
                total += max(0, overlap) * keys[key].element_size()
    return total


def _gather_keys_to_write(name, tensor, layout, ep_group, revert, assignment):
    """
    2. (every rank writing) The original keys of the model tensor `name` that this rank writes, with their values
    (often none). A collective, as `_gather_expert_parallel_tensor`, through which tensors written whole reach their
    one writer. Experts stored one tensor per expert are gathered over their ZeRO-3 partitions only (the
    expert-data-parallel group) and converted alone, their keys renamed as the whole model's (`_local_expert_keys`);
    where the conversion cannot take them alone, placed at their position in a tensor of the full shape, left
    unfilled elsewhere, which the conversion splits per expert.
    """
    rank = torch.distributed.get_rank()
    if name in assignment.tensor_writers:
        writer = assignment.tensor_writers[name]
        full = _gather_expert_parallel_tensor(tensor, layout, ep_group, writers=(writer,))
        return {} if full is None else revert({name: full})
    mine = {key for key in assignment.expert_keys[name] if assignment.key_writers[key] == rank}
    local_keys = _local_expert_keys(revert, name, layout) if mine else None
    with _gathered_over_partitions(tensor) as local:
        if not mine:
            return {}
        if local_keys is not None:
            # Converted while gathered; the keys that are views of it copied out (the gathered memory is freed below)
            converted = {local_keys[key]: value for key, value in revert({name: local}).items()}
            return {key: _copied_out_of(value, local) for key, value in converted.items() if key in mine}
        experts = torch.empty(layout.global_shape, dtype=local.dtype, device="cpu")
        size = local.shape[layout.shard_dim]
        experts.narrow(layout.shard_dim, layout.ep_rank * size, size).copy_(local)
    converted = revert({name: experts})
    return {key: value for key, value in converted.items() if key in mine}


@contextlib.contextmanager
def _gathered_over_partitions(tensor):
    """
    The data of `tensor` whole over its ZeRO-3 partitions (`GatheredParameters`, a collective of the ranks that
    partition it), read in place where one rank holds it all (an expert-data-parallel group of one rank).
    """
    import deepspeed

    group = getattr(tensor, "ds_process_group", None)
    partition = getattr(tensor, "ds_tensor", None)
    if partition is not None and group is not None and torch.distributed.get_world_size(group=group) == 1:
        yield partition.reshape(-1)[: tensor.ds_numel].view(tensor.ds_shape)
        return
    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
        yield tensor.data


def _copied_out_of(value, source):
    """`value` on the CPU, copied when it shares the memory of `source`."""
    if value.device.type == "cpu" and value.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return value.clone()
    return value.to("cpu")


def _write_shard_in_parallel(
    staging, shard_file, names, keys, assignment, fetch, write_held, release_memory, meta_state_dict
):
    """
    3. (every rank writing) This rank's part of one shard: global rank 0 writes the header, each rank its part at the
    planned offsets in the same file (`_StreamedSafetensorsFile`, created by whichever opens it first, never
    truncated). Tensors whose keys are ranges of them (`assignment.key_offsets`): `write_held(shard, name)` writes the
    elements this rank holds, no collective. The others: `fetch(name)` (on every rank, a collective) gives this rank's
    keys of the tensor, written whole. Returns the bytes written and this rank's error (`None` when it succeeded).
    """
    rank = torch.distributed.get_rank()
    path = os.path.join(staging, shard_file)
    mine = [key for key in keys if assignment.key_writers.get(key) == rank]
    planned = _bytes_planned(assignment, keys, rank)
    shard, error = None, None
    if planned or rank == 0:
        error, shard = _unless_failed(None, _StreamedSafetensorsFile, path, keys, {"format": "pt"}, rank == 0)

    def write(values):
        for key, value in values.items():
            shard.write(key, value)

    def finish():
        # Synced once every rank has written, before the commit (`_commit_checkpoint`): the ranks write one file
        shard.finish(mine, planned)
        return shard.bytes_written

    try:
        for name in names:
            if name in assignment.key_offsets:
                if shard is not None:
                    error, _ = _unless_failed(error, write_held, shard, name)
                continue
            # After its collectives, a conversion may fail: reported like a failed write
            fetch_error, values = _unless_failed(None, fetch, name)
            error = error or fetch_error
            if shard is not None:
                error, _ = _unless_failed(error, write, values)
            del values
            if release_memory and meta_state_dict[name].nbytes >= 1 << 20:
                _release_freed_memory()
        written = None
        if shard is not None:
            error, written = _unless_failed(error, finish)
    finally:
        if shard is not None:
            shard.close_after_failure()
    return written or 0, error


def write_planned_checkpoint_in_parallel(
    model, save_directory, plan, assignment, fetch, write_held, release_memory=False
):
    """
    `write_planned_checkpoint` with every rank writing its part (`assign_writers`), a collective: global rank 0 stages
    the checkpoint in a hidden directory inside `save_directory` and shares its name, every rank writes its part of
    each shard there (`_write_shard_in_parallel`), each shard ending with an exchange of every rank's error
    (`_raise_on_every_rank_if_any_failed`); once every rank has reported success, rank 0 writes the index and the
    configs, `config.json` last, and moves the checkpoint in (`_commit_staged_checkpoint`). Returns the bytes this rank
    wrote, or `None` before writing anything where some rank does not see the staging directory (a disk per node,
    `_every_rank_sees_the_staging_directory`): the caller then writes with one writer.
    """
    import torch.distributed as dist

    is_writer = dist.get_rank() == 0
    directory = os.path.realpath(save_directory)
    staging = error = None
    try:
        if is_writer:
            error, staging = _unless_failed(None, _create_staging_directory, save_directory)
        _raise_on_every_rank_if_any_failed(error, f"Saving the model (creating a directory in {save_directory})")
        shared_staging = _every_rank_sees_the_staging_directory(staging)
        if shared_staging is None:
            return None
        staging = shared_staging

        bytes_written = 0
        for (shard_file, names), keys in zip(plan.shards.items(), assignment.shard_keys):
            written, error = _write_shard_in_parallel(
                staging, shard_file, names, keys, assignment, fetch, write_held, release_memory, plan.meta_state_dict
            )
            bytes_written += written
            _raise_on_every_rank_if_any_failed(error, f"Saving the model (writing {shard_file})")

        if is_writer:
            shard_of = zip(plan.shards, assignment.shard_keys)
            weight_map = {key: shard_file for shard_file, keys in shard_of for key in keys}
            error, _ = _unless_failed(None, _commit_checkpoint, model, staging, directory, plan, weight_map)
            if error is None:
                staging = None  # committed: removed in the background
        _raise_on_every_rank_if_any_failed(error, f"Saving the model (moving it into {save_directory})")
        return bytes_written
    finally:
        if is_writer and staging is not None and os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


_SHARED_DIRECTORY_PROBE = ".every-rank-sees-this"


def _every_rank_sees_the_staging_directory(staging):
    """
    The staging directory global rank 0 created (`staging` there, `None` elsewhere) on every rank, or `None` where some
    rank does not see it: nodes with a disk each, where the path is another directory or none. Checked with a file of
    a random token that rank 0 writes there and every rank reads back, removed before anything else is written. A
    collective.
    """
    import torch.distributed as dist

    shared = [staging, uuid.uuid4().hex]
    dist.broadcast_object_list(shared, src=0)
    staging, token = shared
    probe = os.path.join(staging, _SHARED_DIRECTORY_PROBE)
    if dist.get_rank() == 0:
        # Unwritten, it is not seen: the single writer then reports the error
        with contextlib.suppress(OSError), open(probe, "w") as f:
            f.write(token)
    dist.barrier()
    try:
        with open(probe) as f:
            sees = f.read() == token
    except OSError:
        sees = False
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, sees)
    if dist.get_rank() == 0:
        with contextlib.suppress(OSError):
            os.remove(probe)
    if not all(seen):
        blind = [rank for rank, sees in enumerate(seen) if not sees]
        logger.info(f"Saving with one writer: ranks {blind} do not see {staging}, created by rank 0 (a disk per node)")
        return None
    return staging


def _commit_checkpoint(model, staging, directory, plan, weight_map):
    """
    4. The index and the configs (`config.json` last) staged, every staged file synced, then all moved into
    `directory` (`_commit_staged_checkpoint`), the previous weights that the new ones do not replace removed.
    """
    previous_weights = re.compile(
        re.escape(plan.weights_name).replace(r"\.safetensors", r"(-\d{5}-of-\d{5})?\.safetensors")
    )
    _write_index_and_configs(model, staging, plan, weight_map)
    # On disk before they are moved in, so that the moved-in checkpoint is complete after a crash too.
    for entry in os.scandir(staging):
        if entry.is_file():
            _fsync(entry.path)
    _commit_staged_checkpoint(
        staging, directory, lambda entry: entry == plan.index_name or previous_weights.fullmatch(entry)
    )


def _raise_here(error, action):
    """`exchange_errors` of a save written by one process alone: its own error is the only one."""
    if error is not None:
        raise error


def save_expert_parallel_model_under_zero3(
    model,
    save_directory,
    is_main_process=True,
    state_dict=None,
    push_to_hub=False,
    max_shard_size="50GB",
    variant=None,
    save_original_format=True,
    distributed_checkpoint=False,
):
    """
    `save_pretrained` for a model whose experts transformers sharded (expert parallelism) and DeepSpeed ZeRO-3
    partitions (see `prepare_expert_parallel_model_for_deepspeed`), before or after `deepspeed.initialize`. It writes
    one standard checkpoint, every expert in the original key layout, as `save_pretrained` does for the model loaded on
    a single process, in one of two ways:

    - without `state_dict`, on every rank (a collective): where every rank sees the directory, every rank writes its
      part of the planned shard files (`assign_writers`, `write_planned_checkpoint_in_parallel`): the elements of the
      tensors it holds as ZeRO-3 partitions them, or the experts' keys it was given, the same files as one writer
      would write. Otherwise, or with `PARALLEL_WRITE` off, the parameters are gathered one at a time
      (`_gather_expert_parallel_tensor`: dense ones over their ZeRO-3 partitions, experts across the expert-parallel
      group) and streamed into the safetensors shards by global rank 0, which holds one parameter at a time (one
      shard where a conversion needs several parameters at once), the other ranks at most one parameter. The
      distributed-config gather of `save_pretrained` cannot do this: it sees one rank's experts as the whole tensor.
    - with the whole `state_dict` (accelerate's ZeRO-3 save: `accelerator.get_state_dict(model)`, gathered on rank 0 by
      `gather_expert_parallel_state_dict_under_zero3`), on the main rank 0 alone, as `save_pretrained` writes a state
      dict. The other ranks, called without it, do nothing (`_state_dict_sent_to_rank_0`).

    Both go through the same phases: 1. the plan (`plan_checkpoint`, from the full shapes alone, the same on every
    rank), 2.-4. the gather and the staged, atomic write (`write_planned_checkpoint`), the gather being `fetch`. In the
    collective save, each step that writes ends by sharing its errors with every rank
    (`_raise_on_every_rank_if_any_failed`), which then all raise instead of waiting for rank 0 in the next gather.
    """
    import torch.distributed as dist

    _refuse_unsupported_save_options(model, push_to_hub, distributed_checkpoint)
    sent_to_rank_0 = _state_dict_sent_to_rank_0(model)
    collective = state_dict is None
    if not collective and not (is_main_process and dist.get_rank() == 0):
        return  # as `save_pretrained`: the main process, rank 0, writes a state dict passed in
    if collective and sent_to_rank_0 and not is_main_process:
        # A rank without the state dict in accelerate's ZeRO-3 save: rank 0 writes what it was sent
        return

    layout = expert_parallel_layout(model)
    ignored = set(model._keys_to_ignore_on_save or [])
    if collective:
        ep_group = model._mesh_manager.get_mesh("ep").get_group()
        tensors = {name: t for name, t in model.state_dict(keep_vars=True).items() if name not in ignored}
        # The partitioned shape of ZeRO-3 parameters is `ds_shape`, the full one of experts is in their layout.
        meta_state_dict = _meta_state_dict(
            model,
            tensors,
            lambda name, t: layout[name].global_shape if name in layout else getattr(t, "ds_shape", t.shape),
        )

        def fetch(name):
            return _gather_expert_parallel_tensor(tensors[name], layout.get(name), ep_group, writers)

        exchange_errors = _raise_on_every_rank_if_any_failed
    else:
        check_expert_parallel_state_dict_is_whole(model, state_dict)
        tensors = {name: t for name, t in state_dict.items() if name not in ignored}
        meta_state_dict = _meta_state_dict(model, tensors, lambda name, t: t.shape)
        fetch, exchange_errors = tensors.get, _raise_here

    plan = plan_checkpoint(model, meta_state_dict, max_shard_size, variant, save_original_format)

    # The dtype and architecture recorded in the config, as `save_pretrained` does.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__]

    global last_save_bytes_written
    last_save_bytes_written = 0
    if collective:
        calls = [None] * dist.get_world_size()
        mesh = model._mesh_manager
        ep_rank, edp_rank = mesh.get_mesh("ep").get_local_rank(), mesh.get_mesh("efsdp").get_local_rank()
        call = (bool(is_main_process), socket.gethostname(), ep_rank, edp_rank, _partitions_readable(tensors, layout))
        dist.all_gather_object(calls, call)
        writers = _writing_ranks([call[:2] for call in calls])
        if not writers:
            return
        assignment = _assign_writers_if_parallel(plan, layout, calls, writers)
        if assignment is not None:

            def fetch_keys_to_write(name):
                return _gather_keys_to_write(name, tensors[name], layout.get(name), ep_group, plan.revert, assignment)

            def write_held(shard, name):
                _write_elements_held(shard, name, tensors[name], layout.get(name), assignment)

            written = write_planned_checkpoint_in_parallel(
                model, save_directory, plan, assignment, fetch_keys_to_write, write_held, release_memory=True
            )
            if written is not None:
                last_save_bytes_written = written
                return
    else:
        writers = [0]
    write_planned_checkpoint(
        model, save_directory, plan, fetch, dist.get_rank() in writers, exchange_errors, release_memory=collective
    )
    if dist.get_rank() in writers:
        last_save_bytes_written = sum(meta.nbytes for meta in plan.meta_state_dict.values())
