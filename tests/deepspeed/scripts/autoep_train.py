"""Rank side of the DeepSpeed AutoEP test: DeepSpeed's own expert parallelism (it replaces the HF MoE blocks with its
layer) under ZeRO-3 on a model loaded the plain way, every rank its own batch. Reports losses, aux losses, inputs."""

import argparse

import torch

from tests.fork_utils.worker import init_process_group, rank, run_rank, world_size


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--preset", required=True, help="AutoEP preset_model, e.g. qwen3_moe or mixtral")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--aux-loss", action="store_true", help="output_router_logits=True (router aux loss)")
    return parser.parse_args()


def main():
    args = parse_args()
    init_process_group()
    import deepspeed

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    model.config.output_router_logits = args.aux_loss
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "expert_parallel": {"enabled": True, "autoep_size": world_size(), "preset_model": args.preset},
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(7)
    data = torch.randint(0, model.config.vocab_size, (args.steps * world_size() * args.micro_batch, 12), generator=generator)
    record = {"losses": [], "aux_losses": [], "inputs": [], "has_moe_layers": engine.has_moe_layers}
    for step in range(args.steps):
        start = (step * world_size() + rank()) * args.micro_batch
        input_ids = data[start : start + args.micro_batch]
        output = engine(input_ids=input_ids, labels=input_ids)
        engine.backward(output.loss)
        engine.step()
        record["losses"].append(output.loss.item())
        record["aux_losses"].append(None if output.aux_loss is None else output.aux_loss.item())
        record["inputs"].append(input_ids)
    record["clip"] = engine.gradient_clipping()
    return record


if __name__ == "__main__":
    run_rank(main)
