"""Rank side of the expert load metrics tests: train a tiny MoE under DeepSpeed ZeRO-3 (with EP, or plain ZeRO-3 with
`--ep-size 1`) with the metrics on, and report each rank's rows and the figures it logged.

Entry points: ``trainer`` (torchrun; `add_expert_load_metrics(trainer)`, logging every step; rank 0 also calls
`Trainer.log` on its own, which must not wait for the other ranks) and ``accelerate`` (accelerate launch;
`track_expert_load(engine)` and `tracker.collect(step)` every step). Nothing is asserted here: the test compares the
figures with a single-process count on the same global batch.
"""

import argparse

import torch
import torch.distributed as dist

from tests.deepspeed.scripts.ep_train import dataset_rows, make_optimizer, register_deepspeed
from tests.fork_utils.worker import rank, run_rank, world_size


PREFIX = "expert_load"


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--entry", choices=["accelerate", "trainer"], required=True)
    parser.add_argument("--ep-size", type=int, required=True, help="1: no EP, plain ZeRO-3 (no distributed_config)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2)
    # Routing, not training, is compared: with lr 0 every step routes the same weights, so the single-process count is
    # exact (after real updates a token near a tie can flip between two experts, as float sums differ)
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--dead-window", type=int, default=2)
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], default=3, help="the ZeRO stage (1, 2: issue 24)")
    parser.add_argument("--no-reduce", action="store_true",
                        help="negative control: collect without the all-reduce (each rank logs its own rows' counts)")
    args = parser.parse_args()
    # what ep_train's helpers read
    args.optimizer, args.seed, args.first_step, args.offload = "sgd", 0, 0, []
    args.output_dir, args.save_steps, args.save_only_model = None, None, False
    args.save_on_each_node, args.record_collectives, args.marker_at_step = False, False, None
    return args


def expert_load_logs(logs: dict) -> dict:
    return {key: value for key, value in logs.items() if key.startswith(PREFIX)}


def train_trainer(args, training_args, model, data, record):
    from transformers import Trainer
    from transformers.integrations.expert_load_metrics import add_expert_load_metrics

    class RecordingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            record["inputs"].append(inputs["input_ids"].detach().clone())
            if rank() == 0 and len(record["inputs"]) == 2:
                # a log on one rank only, as `if trainer.is_world_process_zero(): trainer.log(...)` does
                self.log({"rank0_only": 1.0})
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    rows = [{"input_ids": row, "labels": row} for row in data]
    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=rows)
    callback = add_expert_load_metrics(trainer, per_expert=True, dead_window=args.dead_window)
    record["callback_order"] = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    trainer.train()
    record["logs"] = [expert_load_logs(entry) for entry in trainer.state.log_history if "loss" in entry]
    record["hooks_removed"] = callback.tracker is None


def train_accelerate(args, accelerator, model, data, record):
    from torch.utils.data import DataLoader

    from transformers.integrations.expert_load_metrics import track_expert_load

    rows = [{"input_ids": row, "labels": row} for row in data]
    loader = DataLoader(rows, batch_size=args.micro_batch, shuffle=False)
    engine, optimizer, loader = accelerator.prepare(model, make_optimizer(args, model.parameters()), loader)
    tracker = track_expert_load(engine, per_expert=True, dead_window=args.dead_window)
    for step, batch in enumerate(loader, start=1):
        loss = engine(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        record["inputs"].append(batch["input_ids"].clone())
        logs = tracker.collect(step)
        accelerator.log(logs, step=step)
        record["logs"].append(expert_load_logs(logs))


def main():
    args = parse_args()
    if args.no_reduce:
        import transformers.integrations.expert_load_metrics as expert_load_metrics

        expert_load_metrics._sum_over_ranks = lambda payload, group: None
    registered = register_deepspeed(args)

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kwargs = {"distributed_config": DistributedConfig(ep_size=args.ep_size)} if args.ep_size > 1 else {}
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, **kwargs)
    model.train()
    data = dataset_rows(args, model.config.vocab_size)
    record = {"inputs": [], "logs": []}
    if args.entry == "trainer":
        train_trainer(args, registered, model, data, record)
    else:
        train_accelerate(args, registered, model, data, record)
    record.update(rank=rank(), world_size=world_size(), inputs=torch.stack(record["inputs"]))
    dist.barrier()
    return record


if __name__ == "__main__":
    run_rank(main)
