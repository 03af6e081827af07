"""Rank side of the Universal Checkpoint tests: a tiny MoE under DeepSpeed ZeRO-3 with
`"checkpoint": {"load_universal": true}`, with or without EP, tries to load Universal Checkpoints (folders
`ds_to_universal` wrote, found through the `latest_universal` file beside them), then resumes from one and trains on.

``--try LOADER DIR`` (repeatable, before the resume): load DIR with LOADER and record what it raised:
``load_checkpoint`` (`engine.load_checkpoint`, the fork's wrap of it once an expert-parallel model was handed over to
DeepSpeed), ``trainer`` (the Trainer's resume, `deepspeed_load_checkpoint_on_any_topology`) or ``deepspeed_only``
(DeepSpeed's own `load_checkpoint`, unwrapped: what happens without the fork's checks). ``--install-fork-wrap`` wraps
`engine.load_checkpoint` in a process without an expert-parallel model too. ``--resume-from DIR``: then
`engine.load_checkpoint(DIR)` and ``--steps`` steps of ep_reshard.py's batches (step s's global batch whatever the
number of ranks). Reported per rank: what each try raised; after a resume, the losses, the parameters and Adam moments
right after the load and at the end (dense whole, experts this rank's EP slice) and the rank's EP rank. Nothing is
asserted here.
"""

import argparse
import traceback

import torch
import torch.distributed as dist

from tests.deepspeed.scripts.ep_reshard import deepspeed_config, snapshot, train_steps
from tests.fork_utils.worker import init_process_group, rank, run_rank


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ep-size", type=int, required=True, help="1: no expert parallelism (plain ZeRO-3)")
    parser.add_argument("--try", dest="tries", nargs=2, action="append", default=[], metavar=("LOADER", "DIR"))
    parser.add_argument("--install-fork-wrap", action="store_true")
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--first-step", type=int, default=0)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    return parser.parse_args()


def loader(name):
    from deepspeed.runtime.engine import DeepSpeedEngine

    from transformers.integrations.deepspeed_expert_parallel_reshard import deepspeed_load_checkpoint_on_any_topology

    if name == "trainer":
        return deepspeed_load_checkpoint_on_any_topology
    load = DeepSpeedEngine.load_checkpoint
    return getattr(load, "__wrapped__", load) if name == "deepspeed_only" else load


def main():
    import deepspeed

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed_expert_parallel_reshard import reshard_in_deepspeed_load_checkpoint

    args = parse_args()
    # ep_reshard's config: fp32, without offload, DeepSpeed's default for the 16-bit gather
    args.offload, args.bf16, args.zero3_save_16bit = [], False, None
    init_process_group()
    config = {**deepspeed_config(args), "checkpoint": {"load_universal": True}}
    registered = HfDeepSpeedConfig(config)  # noqa: F841 (transformers holds it weakly)
    distributed_config = DistributedConfig(ep_size=args.ep_size) if args.ep_size > 1 else None
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, distributed_config=distributed_config, dtype=torch.float32
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if args.install_fork_wrap:
        reshard_in_deepspeed_load_checkpoint()

    record = {"rank": rank(), "load_universal": engine.load_universal_checkpoint(), "tries": []}
    for name, load_dir in args.tries:
        try:
            loader(name)(engine, load_dir)
            error = None
        except Exception as e:
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"
        record["tries"].append((name, load_dir, error))
    if args.resume_from is None:
        return record

    loader("load_checkpoint")(engine, args.resume_from)
    record["loaded"] = snapshot(engine.module)
    record["global_steps_after_load"] = engine.global_steps
    record["losses"] = []
    train_steps(args, engine, model.config.vocab_size, record["losses"])
    record["final"] = snapshot(engine.module)
    mesh_manager = getattr(model, "_mesh_manager", None)
    record["ep_rank"] = mesh_manager.get_mesh("ep").get_local_rank() if args.ep_size > 1 else 0
    dist.barrier()
    return record


if __name__ == "__main__":
    run_rank(main)
