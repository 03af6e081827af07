"""Rank side of the topology-change tests: train a tiny MoE under DeepSpeed ZeRO-3, with or without EP, resume from a
DeepSpeed checkpoint written on another topology, save one. ``--stage 1`` / ``2``: the same under ZeRO stage 1 or 2
(test_ep_zero12.py: resumed on the same topology).

Every step has the same global batch whatever the number of ranks (``--global-batch`` rows, step s's drawn from seed
s): rank r of W trains on rows [r * G/W, (r + 1) * G/W). So a run on 2 ranks followed by a resumed run on 4 ranks
trains on the global batches of one uninterrupted run, which the test trains in one process as the reference.

``--ep-size 1`` loads the model without a ``DistributedConfig``: a plain ZeRO-3 model (experts partitioned over all
ranks like every other parameter), which is what EP size 1 means under DeepSpeed in this fork.
``--resume-with``: ``reshard`` (``load_checkpoint_on_new_topology``), ``deepspeed`` (``engine.load_checkpoint``),
``accelerate`` (``accelerator.load_state`` under ``accelerate launch``); ``--entry trainer`` trains with the
``Trainer`` instead (rows in order, a checkpoint every ``--save-steps`` into ``--output-dir``), resuming with its
``resume_from_checkpoint``; ``--zero-moments`` zeroes Adam's moments after
the load (negative control); ``--freeze REGEX`` leaves the parameters it matches untrained (both entries).
``--save-state DIR`` also saves with ``accelerator.save_state`` (under ``accelerate launch``), beside
``--save-checkpoint``'s ``engine.save_checkpoint``; ``--bf16`` trains in bf16 (DeepSpeed's fp32 master weights);
``--zero3-save-16bit false`` writes ``stage3_gather_16bit_weights_on_model_save: false`` into the DeepSpeed config.
Reported per rank: losses, the parameters and Adam moments right after the load and at the end (dense whole, experts
this rank's EP slice; under bf16 also the fp32 master weights, ``master``), the rank's EP rank. Nothing is asserted
here.
"""

import argparse
import re
import traceback

import torch
import torch.distributed as dist

from tests.fork_utils.worker import init_process_group, rank, run_rank, start_accelerator, world_size


SEQ_LEN = 12
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ep-size", type=int, required=True, help="1: no expert parallelism (plain ZeRO-3)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--first-step", type=int, default=0)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--resume-from", default=None, help="DeepSpeed checkpoint directory (save_checkpoint's)")
    parser.add_argument("--resume-with", choices=["reshard", "deepspeed", "accelerate"], default="reshard")
    parser.add_argument("--zero-moments", action="store_true", help="negative control: Adam's moments lost")
    parser.add_argument("--save-checkpoint", default=None)
    parser.add_argument("--entry", choices=["deepspeed", "trainer"], default="deepspeed")
    parser.add_argument("--output-dir", default=None, help="Trainer: where its checkpoints go")
    parser.add_argument("--save-steps", type=int, default=None, help="Trainer: checkpoint every N steps")
    parser.add_argument("--offload", choices=["optimizer", "param"], nargs="*", default=[],
                        help="ZeRO-3 offload of the optimizer state and/or the parameters to the CPU")
    parser.add_argument("--freeze", default=None,
                        help="a regular expression: the parameters whose names it matches are not trained")
    parser.add_argument("--save-state", default=None,
                        help="under accelerate launch: also `accelerator.save_state` into this directory")
    parser.add_argument("--bf16", action="store_true",
                        help="DeepSpeed bf16 training, fp32 master weights (with --launch-config: the yaml decides)")
    parser.add_argument("--zero3-save-16bit", choices=["true", "false"], default=None,
                        help="stage3_gather_16bit_weights_on_model_save in the DeepSpeed config (unset: not written)")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], default=3, help="the ZeRO stage (1 and 2: issue 24)")
    parser.add_argument("--launch-config", action="store_true",
                        help="under accelerate launch: keep the DeepSpeed config accelerate built from the launch's "
                             "yaml (e.g. the one `accelerate config` writes), filling in only the micro batch size")
    return parser.parse_args()


def global_batch(args, step: int, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1_000 + step)
    return torch.randint(0, vocab_size, (args.global_batch, SEQ_LEN), generator=generator)


def deepspeed_config(args) -> dict:
    stage = getattr(args, "stage", 3)  # other scripts build this config from their own arguments
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
    for what in args.offload:
        zero[f"offload_{what}"] = {"device": "cpu"}
    if args.zero3_save_16bit is not None:
        zero["stage3_gather_16bit_weights_on_model_save"] = args.zero3_save_16bit == "true"
    precision = {"bf16": {"enabled": True}} if args.bf16 else {}
    return {
        **precision,
        "train_micro_batch_size_per_gpu": args.global_batch // world_size(),
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        # the torch optimizer as given, not DeepSpeed's CPU Adam (a compiled op), with optimizer offload
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def train_steps(args, engine, vocab_size: int, losses: list):
    """The steps `--first-step` .. + `--steps`, each on this rank's rows of the step's global batch; each loss
    appended to `losses`."""
    per_rank = args.global_batch // world_size()
    for step in range(args.first_step, args.first_step + args.steps):
        rows = global_batch(args, step, vocab_size)[rank() * per_rank : (rank() + 1) * per_rank]
        loss = engine(input_ids=rows, labels=rows).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())


def offloaded(engine) -> list[str]:
    """What the engine offloads, read as the fork reads it (the device, `none` for a `{device: none}` section)."""
    from transformers.integrations.deepspeed_expert_parallel import offload_device

    return sorted(what for what, offload in (("optimizer", engine.zero_offload_optimizer()),
                                             ("param", engine.zero_offload_param()))
                  if offload_device(offload) != "none")


def snapshot(module, master: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Each parameter gathered over its partition group, with its Adam moments (experts: this rank's EP slice), and
    with `master` the optimizer's fp32 master weights (`master`; frozen parameters: the module's, cast to fp32)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {"param": {}, **{key: {} for key in MOMENT_KEYS}, **({"master": {}} if master else {})}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            state["param"][name] = param.data.detach().clone()
        if param.requires_grad:  # frozen parameters have no optimizer state
            for key in MOMENT_KEYS:
                state[key][name] = safe_get_full_optimizer_state(param, key).detach().clone()
        if master:
            trained = safe_get_full_fp32_param(param) if param.requires_grad else None
            state["master"][name] = state["param"][name].float() if trained is None else trained.detach().clone()
    return state


def training_arguments(args):
    """`TrainingArguments(deepspeed=...)` as a user writes them, on CPU ranks started with gloo (see ep_train.py)."""
    import os

    from accelerate import PartialState

    from transformers import TrainingArguments

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    config = deepspeed_config(args)
    config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", gradient_clipping="auto")
    if args.bf16:
        config["bf16"] = {"enabled": "auto"}
    return TrainingArguments(
        output_dir=args.output_dir, deepspeed=config, per_device_train_batch_size=args.global_batch // world_size(),
        max_steps=args.first_step + args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, report_to="none", disable_tqdm=True,
        accelerator_config={"use_configured_state": True},
        # bf16 on CPU ranks: TrainingArguments refuses it without `use_cpu` (the configured gloo state stays)
        bf16=args.bf16, use_cpu=args.bf16,
    )


def train_with_trainer(args, training_args, model, record):
    """The rows of every step in order (step s's global batch, dealt to the ranks in rank order), from step 0: the
    Trainer skips the steps a resumed checkpoint already trained."""
    from transformers import Trainer

    steps = range(args.first_step + args.steps)
    rows = torch.cat([global_batch(args, step, model.config.vocab_size) for step in steps])

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # Averaged over the ranks, the global batch's mean loss (see ep_train.py)
            record["losses"].append(loss.item())
            return loss

    trainer = InOrderTrainer(model=model, args=training_args, train_dataset=Rows())
    trainer.train(resume_from_checkpoint=args.resume_from)
    return trainer.model_wrapped


def freeze(args, model):
    if args.freeze:
        for name, param in model.named_parameters():
            param.requires_grad_(re.search(args.freeze, name) is None)


def main():
    args = parse_args()
    if args.entry == "trainer":
        return main_trainer(args)
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations.deepspeed_expert_parallel_reshard import load_checkpoint_on_new_topology

    with_accelerate = args.resume_with == "accelerate" or args.launch_config or args.save_state is not None
    if with_accelerate:
        registered = start_accelerator()
    else:
        init_process_group()
        from transformers.integrations import HfDeepSpeedConfig

        registered = HfDeepSpeedConfig(deepspeed_config(args))
    distributed_config = DistributedConfig(ep_size=args.ep_size) if args.ep_size > 1 else None
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, distributed_config=distributed_config, dtype=torch.float32
    )
    model.train()
    freeze(args, model)
    trained = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    if with_accelerate:
        launched = registered.state.deepspeed_plugin.deepspeed_config
        if args.launch_config:  # what the yaml leaves to "auto" and no data loader tells accelerate here
            launched["train_micro_batch_size_per_gpu"] = deepspeed_config(args)["train_micro_batch_size_per_gpu"]
        else:
            launched.update(deepspeed_config(args))
        engine, optimizer = registered.prepare(model, optimizer)
    else:
        import deepspeed

        engine, optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(args))

    record = {"losses": []}
    if args.resume_from:
        try:
            if args.resume_with == "reshard":
                load_checkpoint_on_new_topology(engine, args.resume_from)
            elif args.resume_with == "deepspeed":
                engine.load_checkpoint(args.resume_from)
            else:
                registered.load_state(args.resume_from)
        except Exception as e:
            traceback.print_exc()
            record["resume_error"] = f"{type(e).__name__}: {e}"
            return {**record, "rank": rank()}
        if args.zero_moments:
            from deepspeed.utils import safe_set_local_optimizer_state

            for param in engine.module.parameters():
                for key in MOMENT_KEYS:
                    safe_set_local_optimizer_state(param, torch.zeros(param.partition_numel()), key)
        record["loaded"] = snapshot(engine.module, master=args.bf16)
        record["global_steps_after_load"] = engine.global_steps

    train_steps(args, engine, model.config.vocab_size, record["losses"])
    record["final"] = snapshot(engine.module, master=args.bf16)
    if args.save_checkpoint:
        if args.resume_with == "accelerate":
            registered.save_state(args.save_checkpoint)
        else:
            engine.save_checkpoint(args.save_checkpoint)
    if args.save_state:
        registered.save_state(args.save_state)
    mesh_manager = getattr(model, "_mesh_manager", None)
    record.update(
        rank=rank(),
        world_size=world_size(),
        ep_rank=mesh_manager.get_mesh("ep").get_local_rank() if args.ep_size > 1 else 0,
        global_steps=engine.global_steps,
        offloaded=offloaded(engine),
        # What the engine's accessors return: None without a section, else the config object, with its device
        offload_sections={what: None if section is None else str(getattr(section.device, "value", section.device))
                          for what, section in (("optimizer", engine.zero_offload_optimizer()),
                                                ("param", engine.zero_offload_param()))},
    )
    dist.barrier()
    return record


def main_trainer(args):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    training_args = training_arguments(args)
    distributed_config = DistributedConfig(ep_size=args.ep_size) if args.ep_size > 1 else None
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, distributed_config=distributed_config, dtype=torch.float32
    )
    freeze(args, model)
    record = {"losses": []}
    engine = train_with_trainer(args, training_args, model, record)
    record.update(
        final=snapshot(engine.module, master=args.bf16),
        rank=rank(),
        world_size=world_size(),
        ep_rank=model._mesh_manager.get_mesh("ep").get_local_rank() if args.ep_size > 1 else 0,
        global_steps=engine.global_steps,
    )
    dist.barrier()
    return record


if __name__ == "__main__":
    run_rank(main)
