"""Rank side of the hub-kernels tests: what `kernelize` (on by default since transformers 5.25) does to a tiny MoE
loaded under DeepSpeed ZeRO-3, with expert parallelism (`--ep-size 2`) or without it (`--ep-size 1`, the plain ZeRO-3
twin). One launch, several loads of the same checkpoint on every rank:

1. ``default``: `from_pretrained` as 5.25 does it (kernels on, the default mapping); then `--steps` AdamW steps with
   `deepspeed.initialize` on each rank's own rows, and `save_pretrained` into `--save-dir` (EP only).
2. ``off``: `use_kernels=False`.
3. ``mapped``: the experts class and the sparse MoE block class made kernel layers
   (`replace_kernel_forward_from_hub`), and a mapping for the CPU to the local kernel repository `--kernel-repo`
   (written by the test), whose forwards double the layers' output: a swap shows in the logits.
   `train()` / `eval()` kernelize again.

Every rank records which modules carry a kernel (`_kernel_repo`), whether the experts still run the expert-parallel
forward, its experts as loaded, the logits on one probe batch (EP: before `deepspeed.initialize`, when the dense weights
are whole), the log lines of the fork about kernels, and every attempt to reach a non-local address (refused at
once, so that nothing waits on the network). Nothing is asserted here: the test compares.
"""

import argparse
import ipaddress
import logging
import socket
from types import SimpleNamespace

import torch

from tests.deepspeed.scripts.ep_train import SEQ_LEN, dataset_rows, deepspeed_config, gathered_state, rows_of
from tests.fork_utils.worker import init_process_group, rank, run_rank


KERNEL_LOG_MARK = "kernelize leaves"


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ep-size", type=int, required=True, help="1: plain ZeRO-3 without expert parallelism")
    parser.add_argument("--kernel-repo", required=True, help="local kernel repository with ScaledExperts/ScaledBlock")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-dir", default=None)
    return parser.parse_args()


NETWORK_ATTEMPTS = []


def _is_local(host) -> bool:
    if host is None or host in ("localhost", "") or (isinstance(host, str) and host.startswith("/")):
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return socket.gethostname() == host
    return address.is_loopback or address.is_unspecified


def refuse_network():
    """Record and refuse (at once, no timeout to wait for) every name look-up or connection to a non-local address."""
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def recording_getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            NETWORK_ATTEMPTS.append(f"getaddrinfo {host}")
            raise OSError(f"network access refused by the test: {host}")
        return getaddrinfo(host, *args, **kwargs)

    def recording_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if not _is_local(host):
            NETWORK_ATTEMPTS.append(f"connect {address}")
            raise OSError(f"network access refused by the test: {address}")
        return connect(self, address)

    socket.getaddrinfo = recording_getaddrinfo
    socket.socket.connect = recording_connect


class KernelLogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        message = record.getMessage()
        if KERNEL_LOG_MARK in message:
            self.lines.append(message)


def moe_classes(model):
    """The experts class and the class of the module that holds the experts (the sparse MoE block)."""
    modules = dict(model.named_modules())
    experts = next(name for name in modules if name.endswith(".experts"))
    return type(modules[experts]), type(modules[experts.rpartition(".")[0]])


def kernel_report(model) -> dict:
    modules = dict(model.named_modules())
    experts = [module for name, module in modules.items() if name.endswith(".experts")]
    return {
        "use_kernels": model.use_kernels,
        "kernelized": sorted(name for name, module in modules.items() if "_kernel_repo" in module.__dict__),
        # the expert-parallel forward installed on the experts instances (`ep_forward`, distributed/expert_parallel.py),
        # which a kernel's forward would replace
        "expert_forward_kept": all(
            getattr(module.__dict__.get("forward"), "__name__", None) == "ep_forward" for module in experts
        ),
    }


def probe_logits(model, vocab_size) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    probe = torch.randint(0, vocab_size, (2, SEQ_LEN), generator=generator)
    with torch.no_grad():
        return model(input_ids=probe).logits.detach().clone()


def load(args, **kwargs):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    if args.ep_size > 1:
        kwargs["distributed_config"] = DistributedConfig(ep_size=args.ep_size)
    return AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, **kwargs)


def local_state(model, ep_size) -> dict:
    # Under EP, before `deepspeed.initialize`: each rank's experts and the whole dense weights; under plain ZeRO-3
    # the parameters are partitioned already
    return gathered_state(model) if ep_size == 1 else {n: p.detach().clone() for n, p in model.named_parameters()}


def train(args, model, ds_args, record):
    import deepspeed

    model.train()
    data = dataset_rows(ds_args, model.config.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ds_args.lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(ds_args))
    record.update(inputs=[], losses=[])
    for step in range(args.steps):
        input_ids = rows_of(data, ds_args, step)
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        record["inputs"].append(input_ids)
        record["losses"].append(loss.item())
    record["inputs"] = torch.stack(record["inputs"])
    record["clip"] = engine.gradient_clipping()
    record["final"] = gathered_state(engine.module)
    record["kernels_after_training"] = kernel_report(engine.module)
    return engine


def main():
    import torch.distributed as dist

    args = parse_args()
    refuse_network()
    log_lines = KernelLogLines()
    logging.getLogger("transformers").addHandler(log_lines)
    init_process_group()
    from transformers.integrations import HfDeepSpeedConfig

    ds_args = SimpleNamespace(micro_batch=2, offload=[], save_on_each_node=False, entry="deepspeed", steps=args.steps,
                              first_step=0, seed=0, lr=1e-2)
    registered = HfDeepSpeedConfig(deepspeed_config(ds_args))  # noqa: F841 (kept alive: ZeRO-3 registered)
    report = {"rank": rank(), "ep_size": args.ep_size}

    # 1. the 5.25 default: kernels on, the default mapping (no CPU entries)
    default = load(args)
    report["default"] = {**kernel_report(default), "initial": local_state(default, args.ep_size)}
    report["ep_rank"] = default._mesh_manager.get_mesh("ep").get_local_rank() if args.ep_size > 1 else 0
    if args.ep_size > 1:
        report["default"]["logits"] = probe_logits(default, default.config.vocab_size)
    engine = train(args, default, ds_args, report["default"])
    if args.save_dir:
        default.save_pretrained(args.save_dir, is_main_process=rank() == 0)
    del engine, default

    # 2. kernels off
    off = load(args, use_kernels=False)
    report["off"] = {**kernel_report(off), "initial": local_state(off, args.ep_size)}
    if args.ep_size > 1:
        report["off"]["logits"] = probe_logits(off, off.config.vocab_size)
    experts_class, block_class = moe_classes(off)
    del off

    # 3. a kernel mapping that targets the experts and the sparse MoE block, from a local kernel repository
    from pathlib import Path

    from kernels import LocalLayerRepository, register_kernel_mapping, replace_kernel_forward_from_hub

    replace_kernel_forward_from_hub(experts_class, "ScaledExperts")
    replace_kernel_forward_from_hub(block_class, "ScaledBlock")
    repo = Path(args.kernel_repo)
    register_kernel_mapping({
        "ScaledExperts": {"cpu": LocalLayerRepository(repo_path=repo, layer_name="ScaledExperts")},
        "ScaledBlock": {"cpu": LocalLayerRepository(repo_path=repo, layer_name="ScaledBlock")},
    })
    mapped = load(args)
    report["mapped"] = kernel_report(mapped)
    if args.ep_size > 1:
        report["mapped"]["logits"] = probe_logits(mapped, mapped.config.vocab_size)
        mapped.train()
        mapped.eval()  # kernelized again at each mode change
        report["mapped_again"] = {**kernel_report(mapped), "logits": probe_logits(mapped, mapped.config.vocab_size)}
    report["kernel_log_lines"] = log_lines.lines
    report["network_attempts"] = NETWORK_ATTEMPTS
    dist.barrier()
    return report


if __name__ == "__main__":
    run_rank(main)
