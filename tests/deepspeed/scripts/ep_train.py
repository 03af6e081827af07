"""Rank side of the training tests: load a tiny MoE with EP under DeepSpeed ZeRO-3, train K steps, report.

Entry points (``--entry``), the three ways users start DeepSpeed training:
- ``deepspeed``: ``deepspeed.initialize`` directly (launched with torchrun; ZeRO-3 registered with HfDeepSpeedConfig);
- ``accelerate``: ``accelerate launch`` with the DeepSpeed ZeRO-3 config file, then ``accelerator.prepare``;
- ``trainer``: ``Trainer`` with ``TrainingArguments(deepspeed=...)`` (launched with torchrun).

Every rank feeds its own rows of a global batch that the test process can rebuild (`global_batch`), so a single
process trained on the whole global batch is the reference. Nothing is asserted here: the test compares numbers.
"""

import argparse
import json

import torch
import torch.distributed as dist

from tests.fork_utils.worker import init_process_group, rank, run_rank, world_size


SEQ_LEN = 12


def global_batch(step: int, global_rows: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """The token ids of one optimizer step for all ranks together (rank r takes its rows in rank order)."""
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randint(0, vocab_size, (global_rows, SEQ_LEN), generator=generator)


def rank_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    rows = batch.shape[0] // world_size
    return batch[rank * rows : (rank + 1) * rows]


def deepspeed_config(args) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if args.extra_ds_config:
        config.update(json.loads(args.extra_ds_config))
    return config


def make_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--entry", choices=["deepspeed", "accelerate", "trainer"], required=True)
    parser.add_argument("--ep-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-ds-config", default=None, help="JSON merged into the DeepSpeed config")
    return parser.parse_args()


def gathered_state(engine_module) -> dict[str, torch.Tensor]:
    """Every parameter as this rank sees it gathered over its ZeRO-3 partition group: whole dense tensors, and this
    rank's EP slice of each expert tensor (experts are partitioned only within their expert-data-parallel group)."""
    import deepspeed

    state = {}
    for name, param in engine_module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            state[name] = param.data.detach().clone()
    return state


def train_with_deepspeed(args, model):
    import deepspeed

    optimizer = make_optimizer(args, model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(args))
    initial = gathered_state(engine.module)
    losses = []
    for step in range(args.steps):
        batch = global_batch(step, args.micro_batch * world_size(), model.config.vocab_size, args.seed)
        input_ids = rank_rows(batch, rank(), world_size())
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return engine.module, initial, losses


def main():
    args = parse_args()
    init_process_group()
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(deepspeed_config(args))  # noqa: F841  (transformers holds a weak reference)
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, distributed_config=DistributedConfig(ep_size=args.ep_size), dtype=torch.float32
    )
    model.train()
    module, initial, losses = train_with_deepspeed(args, model)
    final = gathered_state(module)
    dist.barrier()
    return {"rank": rank(), "world_size": world_size(), "initial": initial, "final": final, "losses": losses}


if __name__ == "__main__":
    run_rank(main)
