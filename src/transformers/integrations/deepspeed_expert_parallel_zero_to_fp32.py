#!/usr/bin/env python
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
The `zero_to_fp32.py` of DeepSpeed checkpoints written by expert-parallel models (transformers' EP + DeepSpeed ZeRO
fork), in place of DeepSpeed's: the fp32 weights of the checkpoint, every expert, in one process, without GPUs.

    python zero_to_fp32.py . output_dir/
    python zero_to_fp32.py . output_dir/ --safe_serialization

The command line and the files written are DeepSpeed's (`pytorch_model.bin`, or `model.safetensors`, sharded over
`--max_shard_size` with an index). DeepSpeed's script assumes every ZeRO-3 parameter was partitioned over all ranks,
which the experts were not (over their expert-data-parallel group): it stops with "consumed N numels out of M". Under
ZeRO stages 1 and 2 it takes the per-expert files of DeepSpeed's MoE layout for model states and stops with "is not a
model state checkpoint". This one runs the fork's reader
(`transformers.integrations.deepspeed_expert_parallel_checkpoint`), which hands checkpoints without expert parallelism
to DeepSpeed's own functions: their output is DeepSpeed's, byte for byte.

It needs the fork's transformers (and DeepSpeed, whose objects the checkpoint files hold); without them it says so.
DeepSpeed's `zero_to_torch.py` beside it imports it as `zero_to_fp32` (`--dtype bf16`, ...): the functions it calls are
here.

For a Hugging Face checkpoint (`config.json`, safetensors in the original key layout, loadable by `from_pretrained`
anywhere), streamed one tensor at a time:

    python -m transformers.integrations.deepspeed_expert_parallel_export . output_dir/ [--config <model>] [--dtype bf16]
"""

import argparse
import os
import sys


# Set by `-d` here, or by DeepSpeed's `zero_to_torch.py` before it converts.
debug = 0
# The output dtypes DeepSpeed's `zero_to_torch.py` offers (`--dtype`), which it reads from here.
OUTPUT_DTYPE_NAMES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32")

_MISSING = (
    "This checkpoint was written by an expert-parallel model under DeepSpeed ZeRO (the EP + DeepSpeed fork of "
    "transformers): its experts were partitioned over expert-data-parallel groups, which DeepSpeed's own zero_to_fp32 "
    "cannot read. Converting it needs that fork of transformers (a version ending in `+ep.N`) and deepspeed in this "
    "Python environment: install the fork as you did for training (e.g. `pip install <the fork's checkout or wheel>` "
    "and `pip install deepspeed`), then run this script again. ({error})"
)


def _reader():
    """
    The fork's checkpoint module; a clear exit when it cannot be imported. `debug` shows the conversion's steps (the
    fork's log at info level), not DeepSpeed's debug prints, which stop every ZeRO-3 conversion in DeepSpeed 0.19.8
    (`AttributeError: 'list' object has no attribute 'shape'`, also with DeepSpeed's own script).
    """
    try:
        import deepspeed  # noqa: F401  (the checkpoint files hold DeepSpeed's objects)

        from transformers.integrations import deepspeed_expert_parallel_checkpoint
    except ImportError as error:
        raise SystemExit(_MISSING.format(error=f"{type(error).__name__}: {error}")) from error
    if debug:
        from transformers.utils import logging

        logging.set_verbosity_info()
    return deepspeed_expert_parallel_checkpoint


def convert_zero_checkpoint_to_state_dict(checkpoint_dir, output_dir, **kwargs):
    """What DeepSpeed's `zero_to_torch.py` calls (`dtype`, `max_shard_size`, `safe_serialization`, `tag`,
    `exclude_frozen_parameters`)."""
    return _reader().convert_zero_checkpoint_to_state_dict(checkpoint_dir, output_dir, **kwargs)


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_dir, **kwargs):
    return _reader().convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_dir, **kwargs)


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, **kwargs):
    return _reader().get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, **kwargs)


def load_state_dict_from_zero_checkpoint(model, checkpoint_dir, tag=None):
    return _reader().load_state_dict_from_zero_checkpoint(model, checkpoint_dir, tag=tag)


def parse_args(argv=None):
    """DeepSpeed's `zero_to_fp32.py` command line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "checkpoint_dir", type=str, help="path to the desired checkpoint folder, e.g., path/checkpoint-12"
    )
    parser.add_argument(
        "output_dir", type=str,
        help="directory for the pytorch fp32 state_dict output files (e.g. path/checkpoint-12-output/)",
    )
    parser.add_argument(
        "--max_shard_size", type=str, default="5GB",
        help="the largest size of one output file before the weights are sharded, digits followed by a unit (`5MB`)",
    )
    parser.add_argument(
        "--safe_serialization", default=False, action="store_true",
        help="write safetensors files instead of pickled `torch.save` ones",
    )
    parser.add_argument(
        "-t", "--tag", type=str, default=None,
        help="checkpoint tag used as a unique identifier for checkpoint, e.g., global_step1 (default: `latest`)",
    )
    parser.add_argument("--exclude_frozen_parameters", action="store_true", help="exclude frozen parameters")
    parser.add_argument("-d", "--debug", action="store_true", help="enable debug")
    return parser.parse_args(argv)


def _not_from_own_folder():
    """
    Python puts a script's folder first on its path: the packages must not come from there. The fork's copy of this
    script sits beside transformers' `integrations/deepspeed.py`, which would be imported as DeepSpeed.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [path for path in sys.path if os.path.abspath(path or os.curdir) != here]


def main(argv=None):
    global debug
    _not_from_own_folder()
    args = parse_args(argv)
    debug = args.debug
    convert_zero_checkpoint_to_fp32_state_dict(
        args.checkpoint_dir,
        args.output_dir,
        max_shard_size=args.max_shard_size,
        safe_serialization=args.safe_serialization,
        tag=args.tag,
        exclude_frozen_parameters=args.exclude_frozen_parameters,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
