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
A DeepSpeed ZeRO checkpoint exported to a normal Hugging Face checkpoint, offline: in one process, without GPUs and
without the training topology, streaming one tensor at a time.

    python -m transformers.integrations.deepspeed_expert_parallel_export <checkpoint> <output_dir> [--dtype bf16]

`zero_to_fp32.py` gives the fp32 master weights under the model's parameter names (the layout the model has in
memory, e.g. fused experts); `from_pretrained` of its output then needs the whole model in memory to `save_pretrained`
it again. This export writes what `save_pretrained` of the trained model writes: `config.json`, the generation config,
and safetensors shards in the checkpoint's original key layout (the weight conversion reverted, as `save_pretrained`
does), in fp32 or a 16-bit dtype. It holds a few tensors at a time, not the model: each tensor is read from the
memory-mapped ZeRO files, converted, written into its planned shard, and the file pages it read are handed back
(`_release_mapped_checkpoint_pages`), so a checkpoint larger than the machine's memory exports too. The writer is the
one of the fork's `save_pretrained` under ZeRO-3 (`deepspeed_expert_parallel_save.plan_checkpoint`,
`write_planned_checkpoint`): staged inside the target and moved in with `config.json` last, so an export that fails or
is killed leaves nothing that loads.

ZeRO-3 checkpoints, with expert parallelism or without, are read by the fork's reader
(`deepspeed_expert_parallel_reshard.SavedZero3Checkpoint`), stage-1/2 checkpoints of expert-parallel models by its
stage-1/2 reader (`deepspeed_expert_parallel_zero12_reader.SavedZero12Checkpoint`). Other checkpoints of ZeRO stages 1
and 2 are read whole by DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`, then written the same way (not
streamed).
"""

import argparse
import ctypes
import json
import os
import sys

from ..utils import is_torch_available, logging
from .deepspeed_expert_parallel_checkpoint import (
    Unread,
    _existing_tag_dir,
    _output_dtype,
    holds_expert_partitions,
    unread_state_dict,
)
from .deepspeed_expert_parallel_reshard import SavedZero3Checkpoint, _checkpoint_files
from .deepspeed_expert_parallel_zero12_reader import (
    SavedZero12Checkpoint,
    is_expert_parallel_zero12_checkpoint,
    unread_zero12_state_dict,
)


if is_torch_available():
    import torch


logger = logging.get_logger(__name__)

_MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def _zero_stage(tag_dir: str) -> int | None:
    """The ZeRO stage rank 0's optimizer states were saved with, `None` without them."""
    optim_files = _checkpoint_files(tag_dir, "optim")
    if 0 not in optim_files:
        return None
    return SavedZero3Checkpoint._load(optim_files[0])["optimizer_state_dict"].get("zero_stage")


class _MappedCheckpointPages:
    """
    Hands the pages of the memory-mapped checkpoint files that reading a tensor brought in back to the OS
    (`madvise(MADV_DONTNEED)` on their private, read-only mappings: clean file pages, read again from the file if
    needed), so that the export's resident memory stays a few tensors, not the checkpoint. Linux only; elsewhere, and
    for files that are not mapped, it does nothing.
    """

    def __init__(self, paths):
        self.paths = {os.path.realpath(path) for path in paths}
        try:
            self.madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
            self.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            self.madvise = None

    def _mappings(self):
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                # Only private mappings of the checkpoint's own files: nothing else is ever dropped
                if len(fields) == 6 and fields[1].endswith("p") and fields[5].strip() in self.paths:
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    yield start, end

    def release(self):
        if self.madvise is None or not os.path.exists("/proc/self/maps"):
            return
        for start, end in self._mappings():
            self.madvise(start, end - start, _MADV_DONTNEED)


def _model_on_meta_device(config, dtype, trust_remote_code: bool):
    """
    The model `config` describes, without memory (meta tensors): its class (`config.architectures`, else a causal LM),
    tied weights and weight conversions are what the export needs from it.
    """
    import transformers

    from ..models.auto import AutoModelForCausalLM

    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if model_class is not None:
            return model_class._from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def _check_same_tensors(model, checkpoint_names, checkpoint_dir):
    """The checkpoint holds the model's tensors, no more, no fewer: else `config` is not the model that was trained."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - checkpoint_names), sorted(checkpoint_names - expected)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint_dir} does not hold the tensors of the model the config describes "
            f"({type(model).__name__}): missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Pass the config of the model that was trained "
            "(`config=`, `--config`); a PEFT model's checkpoint holds the base model under other names."
        )


def _load_config(checkpoint_dir: str, config):
    """The config given (an object, or a folder / file to read it from), else the checkpoint folder's own."""
    from ..models.auto import AutoConfig

    if config is None:
        if not os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
            raise FileNotFoundError(
                f"No config.json in {checkpoint_dir} (a Trainer's checkpoint-N holds one; `engine.save_checkpoint` "
                "and `accelerator.save_state` do not): pass the model's config, or the folder it was loaded from, as "
                "`config=` (`--config`)."
            )
        config = checkpoint_dir
    if isinstance(config, (str, os.PathLike)):
        return AutoConfig.from_pretrained(config), str(config)
    return config, None


def _export_dtype(dtype, config) -> "torch.dtype":
    """`auto`: the dtype the config records (what `save_pretrained` of the trained model writes), else fp32."""
    if dtype != "auto":
        return _output_dtype(dtype)
    recorded = getattr(config, "dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    return recorded if recorded in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _read_as(value, dtype):
    tensor = value.read() if isinstance(value, Unread) else value
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _unread_checkpoint(tag_dir: str):
    """
    The checkpoint's tensors under the model's names, each read when it is written (`Unread`), and the files they are
    read from (memory-mapped). ZeRO stages 1 and 2 of expert-parallel models: the fork's reader of their MoE layout;
    of other models: DeepSpeed's reader, whole, in memory.
    """
    stage = _zero_stage(tag_dir)
    if stage == 3:
        saved = SavedZero3Checkpoint(tag_dir)
        files = [*_checkpoint_files(tag_dir, "model").values(), *_checkpoint_files(tag_dir, "optim").values()]
        expert_parallel = holds_expert_partitions(saved)
        unread = unread_state_dict(saved, exclude_frozen_parameters=False, expert_parallel=expert_parallel)
        return unread, files
    if is_expert_parallel_zero12_checkpoint(tag_dir):
        saved = SavedZero12Checkpoint(tag_dir)
        return unread_zero12_state_dict(saved, exclude_frozen_parameters=False), saved.files()
    from deepspeed.utils import zero_to_fp32

    logger.warning(
        f"{tag_dir} is a ZeRO stage {stage} checkpoint: read whole by DeepSpeed's reader (not streamed tensor by "
        "tensor)."
    )
    checkpoint_dir, tag = os.path.split(tag_dir)
    return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag), []


def export_zero_checkpoint_to_hf_checkpoint(
    checkpoint_dir: str,
    output_dir: str,
    config=None,
    dtype="auto",
    max_shard_size: int | str = "5GB",
    tag: str | None = None,
    save_original_format: bool = True,
    trust_remote_code: bool = False,
):
    """
    Write the weights of a DeepSpeed ZeRO checkpoint as the Hugging Face checkpoint `save_pretrained` writes, in one
    process, one tensor in memory at a time: `config.json`, `generation_config.json` (when the model generates) and
    safetensors shards (`model-0000k-of-0000N.safetensors` with `model.safetensors.index.json`, or one
    `model.safetensors`), keys in the checkpoint's original layout. `from_pretrained(output_dir)` loads it anywhere.

    Args:
        checkpoint_dir (`str`):
            The folder `engine.save_checkpoint` / `accelerator.save_state` wrote (holding `latest` and the tag's
            folder), or a Trainer's `checkpoint-N`. Checkpoints of expert-parallel models (every expert) and of models
            without expert parallelism alike.
        output_dir (`str`):
            Where the checkpoint goes (created if needed). Files of a previous checkpoint there are replaced
            atomically, other files (a tokenizer) stay.
        config (`PretrainedConfig`, `str` or `os.PathLike`, *optional*):
            The model's config, or the folder / model id it is read from. Defaults to the `config.json` in
            `checkpoint_dir` (a Trainer's checkpoints hold one).
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`):
            The dtype of the floating tensors written: `"auto"` the one the config records (the trained model's,
            as its `save_pretrained` would write), `float32` (the fp32 master weights as they are), `bfloat16` or
            `float16`.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`):
            The largest shard file, as for `save_pretrained`.
        tag (`str`, *optional*):
            The checkpoint's tag (e.g. `global_step14`): read from `checkpoint_dir/latest` when not given, or the only
            `global_step*` folder there.
        save_original_format (`bool`, *optional*, defaults to `True`):
            Revert the weight conversion of the model class (the keys of the checkpoint the model was first loaded
            from); `False` keeps the model's own parameter names, as `save_pretrained(save_original_format=False)`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            For a config whose model is defined on the Hub (`AutoModelForCausalLM.from_config`).
    """
    tag_dir = _existing_tag_dir(checkpoint_dir, tag)
    config, config_source = _load_config(checkpoint_dir, config)
    out_dtype = _export_dtype(dtype, config)
    unread, files = _unread_checkpoint(tag_dir)
    model = _model_on_meta_device(config, out_dtype, trust_remote_code)
    if config_source is not None and os.path.isfile(os.path.join(config_source, "generation_config.json")):
        from ..generation import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(config_source)
    _check_same_tensors(model, set(unread), tag_dir)
    return _write_export(model, unread, files, output_dir, out_dtype, max_shard_size, save_original_format, tag_dir)


def _write_export(model, unread, files, output_dir, dtype, max_shard_size, save_original_format, tag_dir):
    from .deepspeed_expert_parallel_save import (
        _meta_state_dict,
        _raise_here,
        plan_checkpoint,
        write_planned_checkpoint,
    )

    ignored = set(model._keys_to_ignore_on_save or [])
    # Tied names of the checkpoint share one value: the model's own tied weights decide which name is written
    meta_state_dict = _meta_state_dict(
        model,
        {name: value for name, value in unread.items() if name not in ignored},
        lambda name, value: value.shape,
    )
    for name, meta in meta_state_dict.items():
        if meta.is_floating_point():
            meta_state_dict[name] = meta.to(dtype)
    plan = plan_checkpoint(model, meta_state_dict, max_shard_size, save_original_format=save_original_format)
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__]
    pages = _MappedCheckpointPages(files)

    def fetch(name):
        tensor = _read_as(unread[name], dtype).contiguous()
        pages.release()  # the file pages reading it brought in; the writer hands back its own memory once written
        return tensor

    logger.info(
        f"Exporting {len(meta_state_dict)} tensors of {tag_dir} to {output_dir} ({dtype}, {len(plan.shards)} files)."
    )
    write_planned_checkpoint(
        model, output_dir, plan, fetch, is_writer=True, exchange_errors=_raise_here, release_memory=True
    )
    return output_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Export a DeepSpeed ZeRO checkpoint (of an expert-parallel model or not) to a Hugging Face "
        "checkpoint: config.json and safetensors shards in the original key layout, one tensor in memory at a time."
    )
    parser.add_argument("checkpoint_dir", help="the folder holding `latest` and global_step*/ (e.g. checkpoint-12)")
    parser.add_argument("output_dir", help="where the Hugging Face checkpoint goes")
    parser.add_argument("--config", default=None, help="the model's config.json, its folder, or a model id; defaults "
                        "to the config.json in checkpoint_dir")
    parser.add_argument("--dtype", default="auto", help="auto (the config's), fp32, bf16 or fp16")
    parser.add_argument("--max_shard_size", default="5GB", help="the largest shard file (default 5GB)")
    parser.add_argument("-t", "--tag", default=None, help="the checkpoint's tag, e.g. global_step12; default: latest")
    parser.add_argument("--keep_model_names", action="store_true",
                        help="write the model's parameter names instead of the original key layout")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.set_verbosity_info()
    export_zero_checkpoint_to_hf_checkpoint(
        args.checkpoint_dir,
        args.output_dir,
        config=args.config,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        tag=args.tag,
        save_original_format=not args.keep_model_names,
        trust_remote_code=args.trust_remote_code,
    )
    index = os.path.join(args.output_dir, "model.safetensors.index.json")
    files = 1
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = len(set(json.load(f)["weight_map"].values()))
    print(f"Wrote {args.output_dir} ({files} safetensors file{'s' if files > 1 else ''}).", file=sys.stderr)


if __name__ == "__main__":
    main()
