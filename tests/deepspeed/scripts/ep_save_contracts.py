"""Rank side of the save-contract tests: train a tiny MoE under DeepSpeed ZeRO-3 (with EP, or without: the plain
ZeRO-3 twin), then save it the ways accelerate, DeepSpeed and PEFT document, and report what each rank saw.

Default mode (``accelerate launch`` with docs/configs' ZeRO-3 config: persistence threshold 0, 16-bit gather on save;
or its ZeRO-2 config, issue 24):
``accelerator.prepare`` and ``--steps`` AdamW steps (``ep_train.train_accelerate``), then each save of ``--paths``,
in the order given, into ``<--out>/<path>``:
- ``save_16bit_model``: ``engine.save_16bit_model(dir, "pytorch_model.bin")``, and ``engine._zero3_consolidated_16bit_
  state_dict()`` (rank 0's dict kept in the report);
- ``save_model``: ``accelerator.save_model(model, dir)``;
- ``save_state``: ``accelerator.save_state(dir)``, one more step (the weights and optimizer state move on),
  ``accelerator.load_state(dir)``, the same step again;
- ``get_state_dict``: accelerate's documented ZeRO-3 save, ``state_dict = accelerator.get_state_dict(model)`` then
  ``unwrap_model(model).save_pretrained(dir, state_dict=state_dict, is_main_process=...,
  save_function=accelerator.save)`` on every rank (rank 0's dict kept in the report);
- ``save_pretrained``: ``unwrap_model(model).save_pretrained(dir)`` on every rank (the fork's own gathering save).
A directory may already exist (e.g. a mount point the test made). ``--no-ep-gather`` is the negative control: the
gather of expert tensors across the EP group (``_gather_expert_parallel_tensor``) gives every rank its local slice, and
where every rank writes its own experts (``_gather_keys_to_write``) each places them as EP rank 0's.

``--peft`` (torchrun): PEFT LoRA on q_proj, v_proj of the model, ``Trainer`` with ``TrainingArguments(deepspeed=...)``
(ZeRO-3, persistence threshold 0; ``ep_train.register_deepspeed``), then ``trainer.save_model(<--out>/trainer)``.
``--lora-experts``: LoRA on the fused experts through PEFT ``target_parameters`` instead, which EP must refuse.

Every rank records, per path, its error (a traceback, or None), then the ranks exchange them on a separate process
group with a timeout: a path that left a rank inside a collective its peers never join stops the run there (raised on
the ranks that noticed) instead of hanging. The report is written after each path, so what ran before is kept.
Nothing is asserted here: the test compares numbers.
"""

import argparse
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tests.deepspeed.scripts.ep_train import (
    dataset_rows,
    gathered_state,
    register_deepspeed,
    rows_of,
    train_accelerate,
    train_trainer,
)
from tests.deepspeed.scripts.ep_train import parse_args as ep_train_parse_args
from tests.fork_utils.worker import rank, run_rank, save_result, start_accelerator, world_size


PATHS = ("save_16bit_model", "save_model", "save_state", "get_state_dict", "save_pretrained")
LORA_MODULES = ["q_proj", "v_proj"]
LORA_EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj"]


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ep-size", type=int, required=True,
                        help="1: no EP, the plain ZeRO-3 twin (from_pretrained without distributed_config)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--paths", nargs="*", choices=PATHS, default=[])
    parser.add_argument("--no-ep-gather", action="store_true",
                        help="negative control: expert tensors are not gathered across the EP group when saving")
    parser.add_argument("--peft", action="store_true",
                        help="LoRA on q_proj, v_proj, trained by the Trainer (torchrun)")
    parser.add_argument("--lora-experts", action="store_true", help="--peft with LoRA on the experts' weights")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], default=3,
                        help="--peft: the ZeRO stage (the accelerate mode's stage is its launch config's)")
    parser.add_argument("--sync-timeout", type=float, default=45.0,
                        help="seconds a rank waits for the others after a path before declaring them stuck")
    args = parser.parse_args()
    entry = "trainer" if args.peft or args.lora_experts else "accelerate"
    return ep_train_args(
        **vars(args), entry=entry, optimizer="adamw", output_dir=str(Path(args.out) / "trainer-output"),
        save_dir=str(Path(args.out) / "trainer") if entry == "trainer" else None,
    )


def ep_train_args(**values):
    """ep_train's options at their defaults (what its helpers read), with `values` set."""
    argv = sys.argv
    sys.argv = [argv[0], "--checkpoint", values["checkpoint"], "--entry", values["entry"], "--ep-size",
                str(values["ep_size"])]
    try:
        args = ep_train_parse_args()
    finally:
        sys.argv = argv
    vars(args).update(values)
    return args


def load_model(args):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kwargs = {"distributed_config": DistributedConfig(ep_size=args.ep_size)} if args.ep_size > 1 else {}
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, **kwargs)
    model.train()
    return model


def ep_rank(model) -> int:
    mesh_manager = getattr(model, "_mesh_manager", None)
    return mesh_manager.get_mesh("ep").get_local_rank() if mesh_manager is not None else 0


def switch_off_ep_gather(record):
    """Negative control: each expert tensor is saved as this rank's slice (`layout=None`: gathered over its ZeRO group
    only, as a dense tensor would be). Counts the expert tensors it was asked to gather across the EP group."""
    from transformers.integrations import deepspeed_expert_parallel_save as ep_save

    original = ep_save._gather_expert_parallel_tensor
    record["expert_gathers_switched_off"] = 0

    def local_slice_only(tensor, layout, ep_group, *args, **kwargs):
        if layout is not None:
            record["expert_gathers_switched_off"] += 1
        return original(tensor, None, ep_group, *args, **kwargs)

    ep_save._gather_expert_parallel_tensor = local_slice_only

    # Where every rank writes its own experts (`_gather_keys_to_write`): each rank's experts placed as EP rank 0's
    original_keys = ep_save._gather_keys_to_write

    def experts_placed_as_ep_rank_0(name, tensor, layout, *args, **kwargs):
        if layout is not None:
            record["expert_gathers_switched_off"] += 1
            layout = layout._replace(ep_rank=0)
        return original_keys(name, tensor, layout, *args, **kwargs)

    ep_save._gather_keys_to_write = experts_placed_as_ep_rank_0


def exchange_errors(control_group, error):
    """Every rank's error for the path just run (None where it succeeded); raises TimeoutError when a rank does not
    come within the group's timeout (stuck in a collective its peers left)."""
    errors = [None] * world_size()
    try:
        dist.all_gather_object(errors, error, group=control_group)
    except Exception as e:
        raise TimeoutError(f"rank {rank()}: the other ranks did not finish the path ({type(e).__name__}: {e})") from e
    return errors


def one_more_step(args, accelerator, engine, step):
    """An optimizer step on the rows of step `step` (past the training's): the weights and optimizer state move on."""
    one_step = argparse.Namespace(**{**vars(args), "first_step": step, "steps": 1})
    data = dataset_rows(one_step, engine.module.config.vocab_size)
    input_ids = rows_of(data, args, 0)
    loss = engine(input_ids=input_ids, labels=input_ids).loss
    accelerator.backward(loss)  # DeepSpeed: the engine's backward and step
    return loss.item()


def save(path, args, accelerator, engine, directory, record):
    unwrapped = accelerator.unwrap_model(engine)
    if path == "save_16bit_model":
        if engine.zero_optimization_partition_weights():  # ZeRO-3's consolidation (stages 1, 2: the module's state)
            consolidated = engine._zero3_consolidated_16bit_state_dict()
            record["consolidated"] = consolidated if rank() == 0 else consolidated is None
        record["save_16bit_model_returned"] = engine.save_16bit_model(str(directory), "pytorch_model.bin")
    elif path == "save_model":
        accelerator.save_model(engine, str(directory))
    elif path == "save_state":
        accelerator.save_state(str(directory))
        record["perturbed_loss"] = one_more_step(args, accelerator, engine, args.steps)
        record["perturbed"] = gathered_state(engine.module)
        accelerator.load_state(str(directory))
        record["loaded"] = gathered_state(engine.module)
        # From the loaded weights and optimizer state, the same step must land where it landed before.
        record["resumed_loss"] = one_more_step(args, accelerator, engine, args.steps)
        record["resumed"] = gathered_state(engine.module)
        accelerator.load_state(str(directory))  # back to the trained state for the paths that follow
    elif path == "get_state_dict":
        state_dict = accelerator.get_state_dict(engine)
        record["state_dict"] = state_dict if rank() == 0 else state_dict is None
        unwrapped.save_pretrained(
            str(directory), state_dict=state_dict, is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
        )
    elif path == "save_pretrained":
        unwrapped.save_pretrained(str(directory))
    else:
        raise ValueError(path)


def main_accelerate(args):
    accelerator = start_accelerator()
    # Errors are exchanged on a group of their own, with a timeout: never behind a collective a rank is stuck in.
    control_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.sync_timeout))
    model = load_model(args)
    data = dataset_rows(args, model.config.vocab_size)
    record = {"inputs": [], "losses": [], "aux_losses": [], "errors": {}, "expert_gathers": {}}
    train_accelerate(args, accelerator, model, data, record)
    engine = accelerator.deepspeed_engine_wrapped.engine
    module = engine.module
    record.update(
        rank=rank(), world_size=world_size(), ep_rank=ep_rank(model), final=gathered_state(module),
        inputs=torch.stack(record["inputs"]), engine=type(engine).__name__,
    )
    if args.no_ep_gather:
        switch_off_ep_gather(record)
    for path in args.paths:
        directory = Path(args.out) / path
        error, before = None, record.get("expert_gathers_switched_off", 0)
        try:
            save(path, args, accelerator, engine, directory, record)
        except Exception:
            error = traceback.format_exc()
            print(f"rank {rank()}: {path} raised\n{error}", flush=True)
        record["expert_gathers"][path] = record.get("expert_gathers_switched_off", 0) - before
        record["errors"][path] = error
        save_result(record)
        try:
            record["errors_of_every_rank"] = {**record.get("errors_of_every_rank", {}),
                                              path: exchange_errors(control_group, error)}
        except TimeoutError as e:
            record["stuck_after"] = path
            save_result(record)
            raise RuntimeError(f"after {path}: the ranks are out of step, the remaining paths are not run") from e
        save_result(record)
    return record


def main_peft(args):
    from peft import LoraConfig, get_peft_model

    training_args = register_deepspeed(args)
    model = load_model(args)
    if args.lora_experts:
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[],
                          target_parameters=LORA_EXPERT_PARAMETERS)
    else:
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_MODULES)
    torch.manual_seed(args.seed)  # the same adapter initialisation on every rank
    peft_model = get_peft_model(model, lora)
    data = dataset_rows(args, model.config.vocab_size)
    record = {"inputs": [], "losses": [], "aux_losses": [], "rank": rank(), "world_size": world_size(),
              "ep_rank": ep_rank(model), "lora": lora.to_dict()}
    try:
        trained = train_trainer(args, training_args, peft_model, data, record)
    except Exception:
        # Kept for the test: how far training went before the error (it must be refused before any step).
        record["error"] = traceback.format_exc()
        record["steps_done"] = len(record["losses"])
        save_result(record)
        raise
    final = gathered_state(trained)
    record.update(final=final, inputs=torch.stack(record["inputs"]))
    dist.barrier()
    return record


def main():
    args = parse_args()
    return main_peft(args) if args.entry == "trainer" else main_accelerate(args)


if __name__ == "__main__":
    run_rank(main)
