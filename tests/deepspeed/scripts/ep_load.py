"""Rank side of the loading tests: load a tiny checkpoint and report what this rank holds.

Modes (``--mode``):
- ``accelerate``: started by ``accelerate launch`` with a DeepSpeed ZeRO-3 config; an ``Accelerator`` registers the
  DeepSpeed config with transformers before ``from_pretrained``, as in a user's training script.
- ``hf_deepspeed_config``: started by ``torchrun``; registers ZeRO-3 in process with ``HfDeepSpeedConfig``.
- ``plain``: started by ``torchrun`` without DeepSpeed (EP only, or a reference). With ``--deepspeed-after-load`` a
  ZeRO-3 config is registered after the load, by ``TrainingArguments(deepspeed=...)``: the model, laid out for FSDP2,
  must not be taken for one handed over to DeepSpeed (saved with ``save_pretrained``, refused by the ``Trainer``, by
  ``Accelerator.prepare`` of an ``Accelerator`` created after the load, and by ``deepspeed.initialize``).

The test process compares the returned tensors with the checkpoint: nothing is asserted here, so that a wrong load is
reported with numbers rather than as a crash.
"""

import argparse
import json
import os
import signal
import time

import torch
import torch.distributed as dist

from tests.fork_utils.worker import init_process_group, mark_fault, rank, run_rank


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--mode", choices=["accelerate", "hf_deepspeed_config", "plain"], required=True)
    parser.add_argument("--ep-size", type=int, default=None)
    parser.add_argument("--fsdp-size", type=int, default=None, help="the explicit data-parallel size, with --ep-size")
    parser.add_argument("--enable-expert-parallel", action="store_true", help="the deprecated flag, no ep_size")
    parser.add_argument("--no-distributed-config", action="store_true", help="a dense ZeRO-3 load")
    parser.add_argument("--forward", action="store_true", help="run a forward pass on a batch of this rank's own")
    parser.add_argument("--save-config", default=None, help="rank 0 saves the loaded model's config here")
    parser.add_argument("--tp-size", type=int, default=None)
    parser.add_argument("--pp-size", type=int, default=None)
    parser.add_argument("--deepspeed-after-load", default=None, metavar="SAVE_DIR",
                        help="plain mode: register ZeRO-3 after the load, then save into SAVE_DIR and build a Trainer")
    parser.add_argument("--die-while-loading", action="store_true",
                        help="rank 1 is killed (SIGKILL) when it opens its first checkpoint file")
    return parser.parse_args()


def register_deepspeed(mode):
    """Keep the returned object alive: transformers only holds a weak reference to the DeepSpeed config."""
    if mode == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        from tests.fork_utils.worker import backend

        # On CPU accelerate must be told to use gloo, or every rank believes it is alone.
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend=backend())])
    init_process_group()
    if mode == "hf_deepspeed_config":
        from transformers.integrations import HfDeepSpeedConfig

        return HfDeepSpeedConfig(
            {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
        )
    return None


def kill_rank1_when_it_opens_a_checkpoint_file():
    """A rank that dies in the middle of `from_pretrained` (out of memory, a node lost), after the mesh exists."""
    import transformers.modeling_utils

    if rank() != 1:
        return
    real_safe_open = transformers.modeling_utils.safe_open

    def safe_open(*args, **kwargs):
        mark_fault()
        os.kill(os.getpid(), signal.SIGKILL)
        return real_safe_open(*args, **kwargs)

    transformers.modeling_utils.safe_open = safe_open


def deepspeed_registered_after_load(model, save_dir):
    """`TrainingArguments(deepspeed=...)` created after a load without DeepSpeed: what the model and its gates say then."""
    from accelerate import PartialState

    from transformers import Trainer, TrainingArguments
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed_expert_parallel import is_expert_parallel_under_zero3

    from tests.fork_utils.worker import backend

    if backend() == "gloo":
        # As in ep_train.py: accelerate's DeepSpeed state must reuse the gloo process group on CPU.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    args = TrainingArguments(
        output_dir=os.path.join(save_dir, "trainer"),
        deepspeed={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3},
                   "zero_allow_untested_optimizer": True},
        save_strategy="no",
        report_to="none",
        accelerator_config={"use_configured_state": backend() == "gloo"},
    )
    report = {
        "zero3_after_load": is_deepspeed_zero3_enabled(),
        "ep_under_zero3_after_load": is_expert_parallel_under_zero3(model),
        "handed_over": getattr(model, "_expert_parallel_handed_over", False),
    }
    try:
        model.save_pretrained(save_dir)
        report["save_error"] = None
    except Exception as e:
        report["save_error"] = f"{type(e).__name__}: {e}"
    dist.barrier()
    report["trainer_error"] = error_of(lambda: Trainer(model=model, args=args))
    report.update(deepspeed_engines_built_after_load(model))
    return report


def error_of(call):
    try:
        call()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def deepspeed_engines_built_after_load(model):
    """
    The other ways a DeepSpeed engine is built on the model: an `Accelerator` created after the load, given the model
    alone or with its optimizer, and `deepspeed.initialize` called directly. Then an engine on a dense module, which
    the refusal installed in DeepSpeed's engine must let through.
    """
    import deepspeed
    from accelerate import Accelerator

    accelerator = Accelerator()  # with the DeepSpeed plugin of the state the Trainer set up (one per process)
    config = {
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    report = {
        "prepare_model_error": error_of(lambda: accelerator.prepare(model)),
        "prepare_model_optimizer_error": error_of(lambda: accelerator.prepare(model, optimizer)),
        "initialize_error": error_of(lambda: deepspeed.initialize(model=model, config=config)),
    }
    dense = torch.nn.Linear(4, 4)
    report["dense_initialize_error"] = error_of(lambda: deepspeed.initialize(model=dense, config=config))
    report["dense_partitioned"] = hasattr(dense.weight, "ds_id")
    return report


def local_tensor(param):
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param.data


def describe_params(model):
    """Every parameter as this rank holds it; ZeRO-3 partitions are reported with their gathered value too."""
    params = {}
    for name, param in model.named_parameters():
        entry = {"local": local_tensor(param).detach().clone(), "ds_id": hasattr(param, "ds_id")}
        if entry["ds_id"]:
            import deepspeed

            entry["ds_local_numel"] = param.ds_tensor.numel()
            entry["ds_numel"] = param.ds_numel
            with deepspeed.zero.GatheredParameters([param]):
                entry["gathered"] = param.data.detach().clone()
        params[name] = entry
    return params


def forward_on_own_batch(model):
    generator = torch.Generator().manual_seed(1234 + rank())
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits
    return {"input_ids": input_ids, "logits": logits}


def main():
    args = parse_args()
    keep_alive = register_deepspeed(args.mode)  # noqa: F841

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    kwargs = {"dtype": torch.float32}
    if not args.no_distributed_config:
        config_kwargs = {"enable_expert_parallel": True} if args.enable_expert_parallel else {"ep_size": args.ep_size}
        for name in ("fsdp_size", "tp_size", "pp_size"):
            if getattr(args, name) is not None:
                config_kwargs[name] = getattr(args, name)
        kwargs["distributed_config"] = DistributedConfig(**config_kwargs)

    if args.die_while_loading:
        kill_rank1_when_it_opens_a_checkpoint_file()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, **kwargs)
    load_seconds = time.perf_counter() - start
    model.eval()

    distributed_config = getattr(model.config, "distributed_config", None)
    report = {
        "rank": rank(),
        "world_size": dist.get_world_size(),
        "zero3": is_deepspeed_zero3_enabled(),
        "has_ep": getattr(model, "has_ep", None),
        "ep_size": getattr(distributed_config, "ep_size", None),
        "load_seconds": load_seconds,
        "params": describe_params(model),
        "meta": [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta],
        "fsdp_managed": any(type(m).__name__.startswith("FSDP") for m in model.modules()),
        "local_num_experts": sorted({m.num_experts for n, m in model.named_modules() if n.endswith("mlp.experts")}),
    }
    if args.forward:
        report["forward"] = forward_on_own_batch(model)
    if args.deepspeed_after_load:
        report["after_load"] = deepspeed_registered_after_load(model, args.deepspeed_after_load)
    if args.save_config and rank() == 0:
        model.config.save_pretrained(args.save_config)
        with open(f"{args.save_config}/config.json") as f:
            report["saved_config"] = json.load(f)
    dist.barrier()
    return report


if __name__ == "__main__":
    run_rank(main)
