"""Rank side of the training tests: load a tiny MoE with EP under DeepSpeed ZeRO-3, train K steps, report.

Entry points (``--entry``), the three ways users start DeepSpeed training:
- ``deepspeed``: ``deepspeed.initialize`` directly (torchrun; ZeRO-3 registered in process with HfDeepSpeedConfig);
- ``accelerate``: ``accelerate launch`` with docs/configs' DeepSpeed ZeRO-3 config, then ``accelerator.prepare``;
- ``trainer``: ``Trainer`` with ``TrainingArguments(deepspeed=...)`` created before ``from_pretrained`` (torchrun).

Every rank feeds its own rows and records them, so the test process can rebuild each step's global batch (the ranks'
rows in rank order) and train a single-process reference on it. Step s always gets the same rows, so a run resumed
from a DeepSpeed checkpoint (``--resume-from``, ``--first-step``) continues on the data of an uninterrupted run.
Saving: ``--save-dir`` (``save_pretrained`` on every rank, or ``Trainer.save_model``; ``--save-from-state-dict``:
rank 0 writes the engine's consolidated state dict, as accelerate's ZeRO-3 save does), ``--save-checkpoint`` (the
engine's ``save_checkpoint``), ``--fail-save-after-shards N`` (rank 0's N+1-th shard write raises: a save that fails
midway), ``--kill-save-after-shards N`` (rank 0 is killed there; ``--fail-save-rank R``: rank R instead),
``--bf16`` (bf16 training: the model and its saves in bf16), ``--single-writer`` (global rank 0 writes alone: no
parallel write), ``--single-writer-save-dir`` (a second save,
written by rank 0 alone, to compare with; each rank reports the bytes it wrote). With the Trainer, ``--save-steps`` checkpoints into
``--output-dir`` and ``--resume-from`` is its ``resume_from_checkpoint``. Nothing is asserted here: the test compares
numbers.
"""

import argparse
import json
import os
import signal
import socket

import torch
import torch.distributed as dist

from tests.fork_utils.worker import (
    backend,
    init_process_group,
    mark_fault,
    process_group_timeout,
    rank,
    results_dir,
    run_rank,
    start_accelerator,
    world_size,
)


SEQ_LEN = 12


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--entry", choices=["deepspeed", "accelerate", "trainer"], required=True)
    parser.add_argument("--ep-size", type=int, required=True, help="1: loaded without a DistributedConfig")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aux-loss", action="store_true", help="output_router_logits=True: the router aux loss is on")
    parser.add_argument("--drop-expert-family-tag", action="store_true",
                        help="negative control: experts' gradients then get averaged like dense ones")
    parser.add_argument("--skip-placement-check", action="store_true",
                        help="train without the check of DeepSpeed's placement at the first forward (negative control)")
    parser.add_argument("--first-step", type=int, default=0, help="the index of the first step (resumed runs)")
    parser.add_argument("--resume-from", default=None,
                        help="DeepSpeed checkpoint directory to load before training (Trainer: a checkpoint-N)")
    parser.add_argument("--save-checkpoint", default=None,
                        help="DeepSpeed checkpoint directory to save after training (accelerate: save_state)")
    parser.add_argument("--save-dir", default=None, help="save_pretrained (Trainer.save_model) here after training")
    parser.add_argument("--save-steps", type=int, default=None, help="Trainer: checkpoint every N steps")
    parser.add_argument("--output-dir", default=None, help="Trainer: output_dir (default: the rank results dir)")
    parser.add_argument("--save-only-model", action="store_true", help="Trainer: checkpoints without optimizer state")
    parser.add_argument("--push-to-hub", action="store_true",
                        help="Trainer: push_to_hub after training, to a fake hub that records what it was sent")
    parser.add_argument("--also-save-dirs", nargs="*", default=[],
                        help="after training, any entry: save_pretrained on every rank into each (bytes written kept)")
    parser.add_argument("--max-shard-size", default="50GB")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], default=3, help="the ZeRO stage (1, 2: issue 24)")
    parser.add_argument("--bf16", action="store_true",
                        help="deepspeed entry: the model in bf16, DeepSpeed's bf16 training (fp32 master weights)")
    parser.add_argument("--fail-save-after-shards", type=int, default=None)
    parser.add_argument("--kill-save-after-shards", type=int, default=None, help="rank 0 is SIGKILLed instead")
    parser.add_argument("--fail-save-rank", type=int, default=0, help="the rank whose shard writes fail (or is killed)")
    parser.add_argument("--single-writer", action="store_true",
                        help="save_pretrained on every rank with global rank 0 writing alone (no parallel write)")
    parser.add_argument("--single-writer-save-dir", default=None,
                        help="after --save-dir, save again here with global rank 0 writing alone, for comparison")
    parser.add_argument("--die-at-step", type=int, default=None, help="rank 1 is SIGKILLed before this step")
    parser.add_argument("--offload", choices=["optimizer", "param"], nargs="*", default=[],
                        help="ZeRO-3 offload of the optimizer state and/or the parameters to CPU")
    parser.add_argument("--save-from-state-dict", action="store_true",
                        help="--save-dir through the engine's consolidated state dict and save_pretrained(state_dict=)")
    parser.add_argument("--convert-whole-shards", action="store_true",
                        help="save as when a conversion needs several tensors at once: each shard collected whole")
    parser.add_argument("--save-on-each-node", action="store_true",
                        help="Trainer: save_on_each_node=True; otherwise: DeepSpeed checkpoints on node-local storage "
                             "and save_pretrained by the main rank of each node")
    parser.add_argument("--record-collectives", action="store_true",
                        help="record each collective's group and bytes during training (multi-node layout checks)")
    parser.add_argument("--marker-at-step", type=int, default=None,
                        help="create <results>/step<N> when step N starts (for a test to inject a fault then)")
    return parser.parse_args()


def dataset_rows(args, vocab_size: int) -> torch.Tensor:
    """All rows of the run, in the order a non-shuffling sampler deals them out: step by step, rank by rank."""
    steps = []
    for step in range(args.first_step, args.first_step + args.steps):
        generator = torch.Generator().manual_seed(args.seed * 10_000 + step)
        steps.append(torch.randint(0, vocab_size, (world_size() * args.micro_batch, SEQ_LEN), generator=generator))
    return torch.cat(steps)


def rows_of(data: torch.Tensor, args, step: int) -> torch.Tensor:
    start = (step * world_size() + rank()) * args.micro_batch
    return data[start : start + args.micro_batch]


def fail_rank0_shard_writes_after(count: int, kill: bool = False, failing_rank: int = 0) -> None:
    """Make rank 0's (`failing_rank`'s) shard writes raise after `count` shard files, as a full disk would, or kill
    it there."""
    from transformers.integrations import deepspeed_expert_parallel_save as ep_save

    if rank() != failing_rank:
        return
    shard_file, started = ep_save._StreamedSafetensorsFile, []

    class FailingShardFile(shard_file):
        def __init__(self, path, *args, **kwargs):
            if len(started) >= count and kill:
                os.kill(os.getpid(), signal.SIGKILL)
            if len(started) >= count:
                raise OSError(28, "No space left on device (injected by the test after the first shard)")
            started.append(path)
            super().__init__(path, *args, **kwargs)

    ep_save._StreamedSafetensorsFile = FailingShardFile


def deepspeed_config(args) -> dict:
    # The Trainer writes HF weights into its checkpoints only with the 16-bit gather on, as for any ZeRO-3 model (the
    # ZeRO-3 example of transformers' DeepSpeed docs sets it)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}
    if getattr(args, "stage", 3) != 3:  # issue 24: EP under ZeRO stage 1 or 2 (test_ep_zero12.py)
        zero = {"stage": args.stage}
    for what in args.offload:
        zero[f"offload_{what}"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # the torch optimizer as given, not DeepSpeed's CPU Adam (a compiled op), with optimizer offload
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    if getattr(args, "bf16", False):  # other scripts build this config from their own arguments
        config["bf16"] = {"enabled": True}
    if args.save_on_each_node and args.entry != "trainer":
        # each node writes its own ranks' files and the model states (the Trainer sets this for save_on_each_node)
        config["checkpoint"] = {"use_node_local_storage": True}
    return config


def make_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)


def gathered_state(module) -> dict[str, torch.Tensor]:
    """Every parameter gathered over its ZeRO-3 partition group: dense tensors whole, experts this rank's EP slice."""
    import deepspeed

    state = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            state[name] = param.data.detach().clone()
    return state


def partition_groups(module, engine=None) -> dict[str, list[int]]:
    """The ranks each parameter is partitioned (and its gradient reduce-scattered) over: its ZeRO-3 partition group,
    or at stages 1 and 2 (`engine` given) the group of the optimizer parameter group it is in."""
    if engine is not None and not engine.zero_optimization_partition_weights():
        names = {id(param): name for name, param in module.named_parameters()}
        zero_optimizer = engine.optimizer
        return {
            names[id(param)]: dist.get_process_group_ranks(zero_optimizer.real_dp_process_group[i])
            for i, params in enumerate(zero_optimizer.bit16_groups)
            for param in params
        }
    return {
        name: dist.get_process_group_ranks(param.ds_process_group)
        for name, param in module.named_parameters()
        if hasattr(param, "ds_process_group")
    }


def register_deepspeed(args):
    """Register ZeRO-3 before `from_pretrained`, as each entry point does; keep what it returns alive."""
    if args.entry == "accelerate":
        return start_accelerator()
    if args.entry == "trainer":
        from accelerate import PartialState

        from transformers import TrainingArguments

        if backend() == "gloo":
            # CPU only: accelerate would start DeepSpeed's state without a backend and see 1 process. Start it with
            # gloo and let TrainingArguments reuse it (`use_configured_state`). GPU runs need none of this.
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            timeout = process_group_timeout()
            PartialState(backend="gloo", **({"timeout": timeout} if timeout else {}))
        config = deepspeed_config(args)
        config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
        return TrainingArguments(
            output_dir=args.output_dir or os.environ.get("EPFORK_RESULTS_DIR", ".") + "/trainer",
            deepspeed=config,
            per_device_train_batch_size=args.micro_batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            optim="sgd" if args.optimizer == "sgd" else "adamw_torch",
            max_grad_norm=0.0,
            logging_steps=1,
            save_strategy="steps" if args.save_steps else "no",
            save_steps=args.save_steps or 500,
            save_only_model=args.save_only_model,
            save_on_each_node=args.save_on_each_node,
            report_to="none",
            disable_tqdm=True,
            seed=args.seed,
            accelerator_config={"use_configured_state": backend() == "gloo"},
        )
    init_process_group()
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(args))


def train_deepspeed(args, model, data, record):
    import deepspeed

    from transformers.integrations.deepspeed_expert_parallel import offload_device

    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(args, model.parameters()),
                                      config=deepspeed_config(args))
    if args.resume_from:
        engine.load_checkpoint(args.resume_from)
    record["initial"] = gathered_state(engine.module)
    for step in range(args.steps):
        if step == args.die_at_step and rank() == 1:
            mark_fault()
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.marker_at_step and rank() == 0:
            (results_dir() / f"step{step}").touch()
        input_ids = rows_of(data, args, step)
        outputs = engine(input_ids=input_ids, labels=input_ids)
        engine.backward(outputs.loss)
        engine.step()
        record["inputs"].append(input_ids)
        record["losses"].append(outputs.loss.item())
        if args.aux_loss:
            record["aux_losses"].append(None if outputs.aux_loss is None else outputs.aux_loss.item())
    record["clip"] = engine.gradient_clipping()
    record["offloaded"] = sorted(w for w, section in [("optimizer", engine.zero_offload_optimizer()),
                                                      ("param", engine.zero_offload_param())]
                                 if offload_device(section) != "none")
    if args.save_checkpoint:
        engine.save_checkpoint(args.save_checkpoint)
    return engine


def train_accelerate(args, accelerator, model, data, record):
    from torch.utils.data import DataLoader

    rows = [{"input_ids": row, "labels": row} for row in data]
    loader = DataLoader(rows, batch_size=args.micro_batch, shuffle=False)
    engine, optimizer, loader = accelerator.prepare(model, make_optimizer(args, model.parameters()), loader)
    if args.resume_from:
        accelerator.load_state(args.resume_from)
    record["initial"] = gathered_state(engine.module)
    for batch in loader:
        loss = engine(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        record["inputs"].append(batch["input_ids"].clone())
        record["losses"].append(loss.item())
    record["clip"] = engine.gradient_clipping()
    if args.save_checkpoint:
        accelerator.save_state(args.save_checkpoint)
    return engine


def train_trainer(args, training_args, model, data, record):
    from transformers import Trainer

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    class RecordingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not record["inputs"]:
                record["initial"] = gathered_state(self.model)
            record["inputs"].append(inputs["input_ids"].detach().clone())
            # Averaged over ranks this is the global batch's mean loss, token-averaged across ranks or not (equal
            # token counts): the Trainer scales each rank's loss by the world size when it divides by all tokens.
            record["losses"].append(loss.item())
            return loss

    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=Rows())
    trainer.train(resume_from_checkpoint=args.resume_from)
    record["engine"] = type(trainer.model_wrapped).__name__
    record["logged_losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record["clip"] = trainer.model_wrapped.gradient_clipping()
    if args.save_dir:
        trainer.save_model(args.save_dir)
    if args.push_to_hub:
        record["pushed"] = push_to_fake_hub(trainer)
    return trainer.model


def push_to_fake_hub(trainer) -> dict | None:
    """`Trainer.push_to_hub` with the hub replaced by a fake that records, on rank 0, the bytes of each file of the
    folder it is asked to upload (nothing leaves the machine)."""
    from pathlib import Path
    from unittest import mock

    uploaded = {}

    class FakeHub:
        def create_repo(self, repo_id, **kwargs):
            return mock.Mock(repo_id=f"fake-user/{repo_id}")

        def upload_folder(self, folder_path, ignore_patterns=(), **kwargs):
            for path in Path(folder_path).iterdir():
                if path.is_file() and not path.name.startswith("_"):
                    uploaded[path.name] = path.read_bytes()
            return mock.Mock(commit_url="fake://commit")

    with mock.patch("transformers.trainer.hf_api", return_value=FakeHub()):
        trainer.push_to_hub(commit_message="test", blocking=True)
    return uploaded if rank() == 0 else None


def main():
    args = parse_args()
    if args.record_collectives:
        from tests.fork_utils import collectives

        # before transformers and DeepSpeed are imported: some bind collectives by name
        collectives.record_collectives()
    registered = register_deepspeed(args)

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, distributed_config=DistributedConfig(ep_size=args.ep_size) if args.ep_size > 1 else None,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
    )
    if args.drop_expert_family_tag:
        for param in model.parameters():
            if hasattr(param, "ds_zero_placement_family"):
                del param.ds_zero_placement_family
    if args.skip_placement_check:
        model._deepspeed_placement_check.remove()
    model.config.output_router_logits = args.aux_loss
    model.train()
    data = dataset_rows(args, model.config.vocab_size)
    record = {"inputs": [], "losses": [], "aux_losses": []}
    if args.record_collectives:
        collectives.clear()  # the training steps (and saves) only, not the load
    if args.entry == "deepspeed":
        engine = train_deepspeed(args, model, data, record)
        module = engine.module
    elif args.entry == "accelerate":
        engine = train_accelerate(args, registered, model, data, record)
        module = engine.module
    else:
        module = train_trainer(args, registered, model, data, record)
    final = gathered_state(module)
    if args.save_dir and args.entry != "trainer":
        from transformers.integrations import deepspeed_expert_parallel_save as ep_save

        if args.single_writer:
            ep_save.PARALLEL_WRITE = False
        if args.fail_save_after_shards is not None:
            fail_rank0_shard_writes_after(args.fail_save_after_shards, failing_rank=args.fail_save_rank)
        if args.kill_save_after_shards is not None:
            fail_rank0_shard_writes_after(args.kill_save_after_shards, kill=True, failing_rank=args.fail_save_rank)
        if args.convert_whole_shards:
            from transformers.integrations import deepspeed_expert_parallel_save as ep_save

            ep_save._plan_streamed_shard = lambda *args: None
        try:
            if args.save_from_state_dict:
                # accelerate's documented ZeRO-3 save: the engine's 16-bit consolidation (what
                # `accelerator.get_state_dict` returns) gives rank 0 the whole model, which it writes alone
                state_dict = engine._zero3_consolidated_16bit_state_dict()
                model.save_pretrained(args.save_dir, state_dict=state_dict, is_main_process=rank() == 0,
                                      max_shard_size=args.max_shard_size)
            else:
                # as accelerate scripts pass it: `accelerator.is_local_main_process` to save on each node
                local_main = int(os.environ.get("LOCAL_RANK", 0)) == 0
                model.save_pretrained(args.save_dir, max_shard_size=args.max_shard_size,
                                      is_main_process=local_main if args.save_on_each_node else rank() == 0)
            record["save_bytes_written"] = ep_save.last_save_bytes_written
            if args.single_writer_save_dir:
                ep_save.PARALLEL_WRITE = False
                model.save_pretrained(args.single_writer_save_dir, max_shard_size=args.max_shard_size,
                                      is_main_process=rank() == 0)
                record["single_writer_bytes_written"] = ep_save.last_save_bytes_written
        except Exception as e:
            record["save_error"] = f"{type(e).__name__}: {e}"
    if args.also_save_dirs:
        from transformers.integrations import deepspeed_expert_parallel_save as ep_save

        record["also_saved_bytes_written"] = {}
        for directory in args.also_save_dirs:
            model.save_pretrained(directory, is_main_process=rank() == 0)
            record["also_saved_bytes_written"][directory] = ep_save.last_save_bytes_written
    if args.record_collectives:
        record["collectives"] = collectives.recorded()
        record["groups"] = {
            "ep": dist.get_process_group_ranks(model._mesh_manager.get_mesh("ep").get_group()),
            "edp": dist.get_process_group_ranks(model._mesh_manager.get_mesh("efsdp").get_group()),
        }
    record.update(
        node=os.environ.get("EPFORK_NODE"),
        hostname=socket.gethostname(),
        rank=rank(),
        world_size=world_size(),
        backend=dist.get_backend(),
        ep_rank=model._mesh_manager.get_mesh("ep").get_local_rank() if args.ep_size > 1 else 0,
        final=final,
        partition_groups=partition_groups(module, engine if args.entry != "trainer" else None),
        inputs=torch.stack(record["inputs"]),
    )
    dist.barrier()
    return record


if __name__ == "__main__":
    run_rank(main)
