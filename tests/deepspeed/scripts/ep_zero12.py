"""Rank side of EP under ZeRO stages 1 and 2 (issue 24, test_ep_zero12.py): load a tiny MoE with
``DistributedConfig(ep_size)`` under a ZeRO ``--stage`` 1 or 2 config (``HfDeepSpeedConfig`` registered first),
``deepspeed.initialize`` with a torch AdamW of one
parameter group (the fork's hand-over has ``deepspeed.initialize`` split it for the experts), train ``--steps`` steps
on this rank's rows of each step's global batch (ep_reshard's batches), report losses, gradient norms, weights and Adam
moments (experts: this rank's EP slice; moments DeepSpeed cannot gather are listed in ``moment_errors``).

``--untag`` (negative control): the expert tags (``allreduce``, ``group_name``) and the DeepSpeed MoE marker are
removed before ``deepspeed.initialize``, so DeepSpeed takes the experts for dense parameters.
``--ds-optimizer``: the DeepSpeed config's AdamW (``torch_adam``) instead of a client optimizer, which the engine
splits itself for MoE models. Nothing is asserted here.
"""

import argparse

import torch
import torch.distributed as dist

from tests.fork_utils.worker import init_process_group, rank, run_rank, world_size


SEQ_LEN = 12
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ep-size", type=int, required=True)
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--untag", action="store_true", help="negative control: expert tags removed")
    parser.add_argument("--gas", type=int, default=1, help="gradient accumulation steps (micro batches per step)")
    parser.add_argument("--save-pretrained", default=None, help="`save_pretrained` on every rank here after training")
    parser.add_argument("--save-16bit", default=None, help="`engine.save_16bit_model` here after training")
    parser.add_argument("--generate", action="store_true",
                        help="after training: greedy `generate` on every rank, out of step (`generate_out_of_step`)")
    parser.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 (fp32 master weights)")
    parser.add_argument("--offload", action="store_true",
                        help="offload_optimizer to the CPU, the torch optimizer as given")
    parser.add_argument("--entry", choices=["deepspeed", "trainer"], default="deepspeed",
                        help="trainer: `Trainer`, `TrainingArguments(deepspeed=...)`, adamw_torch, ep_reshard's rows")
    parser.add_argument("--ds-optimizer", action="store_true", help="the config's AdamW, not a client one")
    parser.add_argument("--cpu-adam", action="store_true",
                        help="the config's AdamW with the optimizer offloaded: DeepSpeed's CPU Adam (a compiled op)")
    parser.add_argument("--scheduler-before-initialize", action="store_true",
                        help="an LR scheduler built on the optimizer before `deepspeed.initialize` (refused)")
    return parser.parse_args()


def global_batch(args, step: int, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1_000 + step)
    return torch.randint(0, vocab_size, (args.global_batch, SEQ_LEN), generator=generator)


def deepspeed_config(args) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": args.global_batch // world_size() // args.gas,
        "gradient_accumulation_steps": args.gas,
        "zero_optimization": {"stage": args.stage},
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if args.bf16:
        config["bf16"] = {"enabled": True}
    if args.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    if args.ds_optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0, "torch_adam": True}}
    if args.cpu_adam:  # as DeepSpeed's and the Trainer's default configs with ZeRO-Offload pick it
        config["optimizer"] = {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}}
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return config


def untag(model):
    """Negative control: DeepSpeed sees the experts as dense parameters."""
    for module in model.modules():
        if "set_deepspeed_parallelism" in type(module).__dict__:  # marked by `mark_experts_as_deepspeed_moe`
            module.__class__ = type(module).__mro__[1]
    for param in model.parameters():
        for attr in ("allreduce", "group_name"):
            if hasattr(param, attr):
                delattr(param, attr)


def optimizer_groups(engine) -> list[tuple[str, bool]]:
    """The name and MoE flag of each group of the optimizer the ZeRO-1/2 optimizer wraps."""
    return [(group.get("name"), bool(group.get("moe", False))) for group in engine.optimizer.optimizer.param_groups]


def snapshot(engine) -> dict[str, dict[str, torch.Tensor]]:
    from deepspeed.utils import safe_get_full_optimizer_state

    state = {"param": {}, **{key: {} for key in MOMENT_KEYS}}
    for name, param in engine.module.named_parameters():
        state["param"][name] = param.data.detach().clone()
        for key in MOMENT_KEYS:
            try:
                state[key][name] = safe_get_full_optimizer_state(param, key).detach().clone().view_as(param)
            except ValueError as e:  # recorded: which parameters DeepSpeed cannot gather the moments of
                state.setdefault("moment_errors", {})[f"{name}/{key}"] = str(e)
    return state


def main_trainer(args):
    """The `Trainer` built as ep_reshard's (`train_with_trainer`), at stage 1 or 2."""
    import os
    import tempfile

    from accelerate import PartialState

    from tests.deepspeed.scripts.ep_reshard import train_with_trainer
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.distributed import DistributedConfig

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    config = deepspeed_config(args)
    config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", gradient_clipping="auto")
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), deepspeed=config, per_device_train_batch_size=args.global_batch // world_size(),
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, save_strategy="no", report_to="none", disable_tqdm=True,
        accelerator_config={"use_configured_state": True},
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, distributed_config=DistributedConfig(ep_size=args.ep_size), dtype=torch.float32
    )
    record = {"losses": []}
    args.first_step, args.resume_from = 0, None
    engine = train_with_trainer(args, training_args, model, record)
    record.update(
        final={"param": {n: p.detach().clone() for n, p in engine.module.named_parameters()}},
        rank=rank(),
        ep_rank=model._mesh_manager.get_mesh("ep").get_local_rank(),
        has_moe_layers=engine.has_moe_layers,
        optimizer_groups=optimizer_groups(engine),
    )
    dist.barrier()
    return record


def main():
    args = parse_args()
    if args.entry == "trainer":
        return main_trainer(args)
    init_process_group()
    import deepspeed
    from deepspeed.moe.utils import is_moe_param

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations import HfDeepSpeedConfig

    config = deepspeed_config(args)
    registered = HfDeepSpeedConfig(config)  # noqa: F841 (registered while it lives)
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, distributed_config=DistributedConfig(ep_size=args.ep_size), dtype=torch.float32
    )
    model.train()
    if args.untag:
        untag(model)
    loaded = {name: param.detach().clone() for name, param in model.named_parameters()}
    if args.ds_optimizer or args.cpu_adam:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    else:
        # One group, as users and the Trainer build it: `deepspeed.initialize` splits it for the experts (the fork)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        if args.scheduler_before_initialize:
            torch.optim.lr_scheduler.LinearLR(optimizer)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    unchanged_by_initialize = all(torch.equal(p, loaded[n]) for n, p in engine.module.named_parameters())

    losses, grad_norms, per_rank = [], [], args.global_batch // world_size()
    for step in range(args.steps):
        rows = global_batch(args, step, model.config.vocab_size)[rank() * per_rank : (rank() + 1) * per_rank]
        micro_losses = []
        for micro in rows.chunk(args.gas):  # DeepSpeed steps the optimizer at the last one
            loss = engine(input_ids=micro, labels=micro).loss
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.item())
        losses.append(sum(micro_losses) / len(micro_losses))
        grad_norms.append(float(engine.get_global_grad_norm()))  # before clipping, as DeepSpeed computes it
    record = {
        "basic_optimizer": type(engine.optimizer.optimizer).__name__,
        "optimizer_groups": optimizer_groups(engine),
        "losses": losses,
        "final": snapshot(engine),
        "rank": rank(),
        "ep_rank": model._mesh_manager.get_mesh("ep").get_local_rank(),
        "has_moe_layers": engine.has_moe_layers,
        "moe_params": sorted(n for n, p in engine.module.named_parameters() if is_moe_param(p)),
        "unchanged_by_initialize": unchanged_by_initialize,
        "grad_norms": grad_norms,
    }
    if args.save_pretrained:
        try:
            model.save_pretrained(args.save_pretrained)
            record["save_pretrained"] = "ok"
        except Exception as e:
            import traceback

            traceback.print_exc()
            record["save_pretrained"] = f"{type(e).__name__}: {e}"
    if args.save_16bit:
        engine.save_16bit_model(args.save_16bit)
    if args.generate:
        record["generated"] = generate_out_of_step(engine.module, args)
    dist.barrier()
    return record


def generate_out_of_step(model, args) -> dict:
    """Greedy `generate` on every rank from its own prompt, rank 0 stopping after one token (its first token is its
    end-of-sequence token) while the others generate 6 (`min_new_tokens`): the ranks must go on running the forward
    together (the experts' tokens are exchanged) after rank 0 is done. Returns the prompt, the `generate` arguments and
    the tokens, for the same call in one process."""
    model.eval()
    prompt = global_batch(args, 10_000 + rank(), model.config.vocab_size)[:1, :5]
    with torch.no_grad():
        first = model.generate(input_ids=prompt, max_new_tokens=1, do_sample=False)[0, -1].item()
        kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": first, "pad_token_id": first}
        if rank() != 0:
            kwargs["min_new_tokens"] = 6
        tokens = model.generate(input_ids=prompt, **kwargs)
    return {"prompt": prompt, "kwargs": kwargs, "tokens": tokens}


if __name__ == "__main__":
    run_rank(main)
