"""Load a Mixture-of-Experts model with expert parallelism (EP) under DeepSpeed ZeRO-3, then train it.

Launch (2 CPU processes; on GPUs drop nothing, the script picks NCCL when CUDA is there):

    accelerate launch --config_file docs/configs/accelerate_deepspeed_zero3.yaml --num_processes 2 \
        examples/ep_deepspeed/ep_zero3.py --model_path /path/to/moe_checkpoint --ep_size 2

The same script runs under ZeRO-1 and ZeRO-2 (`--config_file docs/configs/accelerate_deepspeed_zero2.yaml`).

Each rank loads only its experts: with E experts and `ep_size` P, rank r holds experts [r % P * E/P, ...). The script
prints, per rank, which experts it holds and, given `--reference` (the model's state dict saved with safetensors, as
the demo writes it), whether they equal the checkpoint's tensors. With `--train_steps N` it then trains N AdamW steps
through `accelerator.prepare` (DeepSpeed ZeRO-3 engine), each rank on its own batch, and prints the loss per step;
`--record FILE` writes the losses and each step's global batch (all ranks' rows) as JSON, for a reference run.
With `--save_dir DIR` every rank then calls `save_pretrained(DIR)`: one normal checkpoint with every expert.
"""

import argparse
import json

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
    parser.add_argument("--train_steps", type=int, default=0)
    parser.add_argument("--micro_batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--record", default=None, help="rank 0 writes the losses and global batches here (JSON)")
    parser.add_argument("--save_dir", default=None, help="save_pretrained here at the end (called on every rank)")
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


def train(args, accelerator, model):
    """AdamW steps through the DeepSpeed engine that `accelerator.prepare` builds; every rank feeds its own rows."""
    from torch.utils.data import DataLoader

    steps, rows = args.train_steps, args.micro_batch_size * accelerator.num_processes
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, model.config.vocab_size, (steps * rows, args.seq_len), generator=generator)
    loader = DataLoader([{"input_ids": row, "labels": row} for row in data], batch_size=args.micro_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    # "gradient_clipping": "auto" in the DeepSpeed config takes accelerate's value; the reference must clip alike.
    record = {"losses": [], "global_batches": [], "gradient_clipping": engine.gradient_clipping()}
    for step, batch in enumerate(loader):
        loss = engine(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        global_batch = accelerator.gather(batch["input_ids"])
        record["losses"].append(mean_loss)
        record["global_batches"].append(global_batch.tolist())
        if accelerator.is_main_process:
            print(f"[rank 0] step {step}: loss {mean_loss:.6f} (mean over {accelerator.num_processes} ranks)", flush=True)
    if args.record and accelerator.is_main_process:
        with open(args.record, "w") as f:
            json.dump(record, f)
    return engine


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
    stage = accelerator.state.deepspeed_plugin.zero_stage
    print(f"[rank {rank}] loaded with EP {ep_size} under DeepSpeed ZeRO-{stage}{verdict}", flush=True)
    if not ok:
        raise SystemExit(f"rank {rank}: expert tensors differ from the checkpoint")
    if args.train_steps:
        train(args, accelerator, model)
    if args.save_dir:
        # On every rank: experts are gathered across the expert-parallel group, one tensor at a time, and rank 0
        # writes a standard checkpoint (original key layout, no distributed_config), atomically.
        model.save_pretrained(args.save_dir)
        if accelerator.is_main_process:
            print(f"[rank 0] saved the trained model to {args.save_dir}", flush=True)
    accelerator.wait_for_everyone()
    # Tear the process groups down before exiting: a rank leaving with live gloo groups can abort in their destructors.
    accelerator.end_training()


if __name__ == "__main__":
    main()
