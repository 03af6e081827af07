"""Load a Mixture-of-Experts model with expert parallelism (EP) under DeepSpeed ZeRO-3, on every rank.

Launch (2 CPU processes; on GPUs drop nothing, the script picks NCCL when CUDA is there):

    accelerate launch --config_file docs/configs/accelerate_deepspeed_zero3.yaml --num_processes 2 \
        examples/ep_deepspeed/ep_zero3.py --model_path /path/to/moe_checkpoint --ep_size 2

Each rank loads only its experts: with E experts and `ep_size` P, rank r holds experts [r % P * E/P, ...). The script
prints, per rank, which experts it holds and, given `--reference` (the model's state dict saved with safetensors, as
the demo writes it), whether they equal the checkpoint's tensors.
"""

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from safetensors.torch import load_file

from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help="a local checkpoint saved with save_pretrained")
    parser.add_argument("--ep_size", type=int, default=None, help="expert-parallel size (default: all ranks)")
    parser.add_argument("--reference", default=None, help="safetensors file of the model's state dict, to compare")
    return parser.parse_args()


def local_value(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param.data


def report_experts(model, reference: dict | None, rank: int, ep_size: int) -> bool:
    """Print which experts this rank holds (layer 0) and compare every expert tensor with the reference's slice."""
    all_match = True
    for name, param in model.named_parameters():
        if ".experts." not in name:
            continue
        local = local_value(param)
        first, count = (rank % ep_size) * local.shape[0], local.shape[0]
        verdict = ""
        if reference is not None:
            matches = torch.equal(local, reference[name][first : first + count])
            all_match &= matches
            verdict = ", MATCH with the checkpoint" if matches else ", MISMATCH with the checkpoint"
        if ".layers.0." in f".{name}":
            print(f"[rank {rank}] {name}: holds experts {first}..{first + count - 1}{verdict}", flush=True)
    return all_match


def main():
    args = parse_args()
    # On CPU-only machines accelerate must be told to use gloo (on GPUs the default, NCCL, is right).
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend=backend)])
    rank, world_size = accelerator.process_index, accelerator.num_processes
    ep_size = args.ep_size or world_size

    # The Accelerator registered the DeepSpeed ZeRO-3 config: from_pretrained sees it, and with expert parallelism it
    # loads each rank's experts itself instead of partitioning everything through zero.Init.
    model = AutoModelForCausalLM.from_pretrained(
        args.model_path, distributed_config=DistributedConfig(ep_size=ep_size), dtype=torch.float32
    )
    reference = load_file(args.reference) if args.reference else None
    ok = report_experts(model, reference, rank, ep_size)
    verdict = "" if reference is None else f": experts {'equal' if ok else 'DIFFER FROM'} the checkpoint"
    print(f"[rank {rank}] loaded with EP {ep_size} under DeepSpeed ZeRO-3{verdict}", flush=True)
    accelerator.wait_for_everyone()
    if not ok:
        raise SystemExit(f"rank {rank}: expert tensors differ from the checkpoint")


if __name__ == "__main__":
    main()
