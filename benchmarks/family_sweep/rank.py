"""Rank side of the family sweep (accelerate launch, DeepSpeed ZeRO-3 or `--stage` 2, 2 CPU ranks): load with EP 2,
report what this rank holds, `deepspeed.initialize` with SGD, train 2 steps on this rank's own rows, `save_pretrained`
on every rank. The record is saved after every phase, so a failing phase still reports what came before."""

import argparse
import traceback

import torch
import torch.distributed as dist

from tests.fork_utils.worker import rank, run_rank, save_result, start_accelerator, world_size


SEQ_LEN = 12
MICRO_BATCH = 2


def rows(vocab_size, step):
    generator = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, vocab_size, (world_size() * MICRO_BATCH, SEQ_LEN), generator=generator)
    return data[rank() * MICRO_BATCH : (rank() + 1) * MICRO_BATCH]


def ds_config(stage: int):
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default: off, so the 2 SGD steps move the weights more
        "steps_per_print": 10**9,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max-shard-size", default="50GB")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], default=3, help="the launch config's ZeRO stage")
    args = parser.parse_args()

    accelerator = start_accelerator()  # noqa: F841  (registers the DeepSpeed ZeRO-3 config: keep it alive)

    import deepspeed

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations.deepspeed_expert_parallel import expert_parallel_layout

    record = {"rank": rank(), "phase": "load", "inputs": [], "losses": []}

    def fail(phase):
        record["error"] = {"phase": phase, "traceback": traceback.format_exc()}
        save_result(record)
        raise

    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.checkpoint, distributed_config=DistributedConfig(ep_size=2), dtype=torch.float32
        )
        layout = expert_parallel_layout(model)
        record["layout"] = {k: tuple(v) for k, v in layout.items()}
        record["ep_rank"] = model._mesh_manager.get_mesh("ep").get_local_rank()
        record["loaded"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        record["loaded_buffers"] = {n: b.detach().clone() for n, b in model.named_buffers()}
        record["num_experts_modules"] = sorted(
            {getattr(m, "num_experts", None) for n, m in model.named_modules() if n.endswith("experts")}, key=str
        )
    except Exception:
        fail("load")
    save_result(record)

    record["phase"] = "train"
    try:
        model.train()
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr), config=ds_config(args.stage)
        )
        record["clip"] = engine.gradient_clipping()
        record["engine_config"] = {"clip": engine.gradient_clipping(), "mb": engine.train_micro_batch_size_per_gpu(),
                                   "gas": engine.gradient_accumulation_steps(), "dp": engine.dp_world_size,
                                   "predivide": engine.gradient_predivide_factor()}
        for step in range(args.steps):
            input_ids = rows(model.config.vocab_size, step)
            loss = engine(input_ids=input_ids, labels=input_ids).loss
            engine.backward(loss)
            engine.step()
            record["inputs"].append(input_ids)
            record["losses"].append(loss.item())
        final = {}
        for name, param in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                final[name] = param.data.detach().clone()
        record["final"] = final
    except Exception:
        fail("train")
    save_result(record)

    record["phase"] = "save"
    try:
        model.save_pretrained(args.save_dir, max_shard_size=args.max_shard_size)
    except Exception:
        fail("save")
    record["phase"] = "done"
    dist.barrier()
    return record


if __name__ == "__main__":
    run_rank(main)
