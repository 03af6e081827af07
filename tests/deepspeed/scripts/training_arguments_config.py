"""The DeepSpeed config a `TrainingArguments(deepspeed=dict)` hands to DeepSpeed, for each dict of a JSON list.

Run in a process of its own (one rank): `TrainingArguments` with a DeepSpeed config starts a process group and
registers the config with transformers and accelerate, state a test process should not keep. Returns the configs as
`args.hf_deepspeed_config.config` holds them, the "auto" values filled in by the Trainer's rules.
"""

import argparse
import copy
import json
import os

from tests.fork_utils.launcher import free_port
from tests.fork_utils.worker import run_rank


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", required=True, help="a JSON file: a list of DeepSpeed configs (dicts)")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    from transformers import TrainingArguments

    PartialState(backend="gloo")
    with open(args.configs) as f:
        configs = json.load(f)
    filled = []
    for config in configs:
        training_args = TrainingArguments(output_dir=args.output_dir, deepspeed=config, report_to="none",
                                          per_device_train_batch_size=2)
        filled.append(copy.deepcopy(training_args.hf_deepspeed_config.config))
    return filled


if __name__ == "__main__":
    run_rank(main)
