"""Rank side of the memory planner's test: measure what an EP + ZeRO-3 run holds, for several configurations in a row.

For each configuration (``--cases`` JSON: ``[{"ep_size": 2, "offload": ["optimizer"]}, ...]``), in one process:
1. register ZeRO-3 (``HfDeepSpeedConfig``), ``from_pretrained`` with ``DistributedConfig(ep_size=P)`` (P > 1) or
   without it (P = 1: ``zero.Init``, shard-on-read), the peak anonymous RSS over the load sampled by a thread;
2. ``deepspeed.initialize`` with AdamW, one training step, then the ZeRO-3 state counted tensor by tensor: every
   storage once (the fp32 master partitions of an fp32 model are the parameter partitions themselves), as parameter
   partitions, whole persistent parameters, gradient partitions (+ offload's fp32 gradients), fp32 master and
   optimizer state, dense and experts apart;
3. ``save_pretrained`` on every rank (with EP the streamed save; without, accelerate's ZeRO-3 save through the
   engine's consolidated state dict), the peak anonymous RSS over it;
4. everything freed before the next configuration.
The first configuration also warms the process up: its peaks include one-time costs (imports, DeepSpeed's first
engine), so the test compares only its state.
Nothing is asserted here: the test compares these figures with ``plan_memory``'s.
"""

import argparse
import ctypes
import gc
import json
import threading
import time

import torch
import torch.distributed as dist

from benchmarks.proc_stats import proc_status_kb
from tests.fork_utils.worker import init_process_group, rank, run_rank


def anon_kb() -> int:
    return proc_status_kb("RssAnon")


def release_free_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakAnonymousMemory:
    """The peak of RssAnon (memory that cannot be reclaimed, unlike the checkpoint's page cache) over a block, minus
    its lowest value in the block (its value at the start, unless memory left over from before, such as the previous
    configuration's, was freed during the block), in bytes; sampled every millisecond by a thread."""

    def __enter__(self):
        release_free_memory()
        self.start = self.peak = self.lowest = anon_kb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            now = anon_kb()
            self.peak, self.lowest = max(self.peak, now), min(self.lowest, now)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_kb())
        self.increase = (self.peak - self.lowest) * 1024


def deepspeed_config(case, args) -> dict:
    zero = {
        "stage": 3,
        "stage3_param_persistence_threshold": case.get("persistence_threshold", 0),
        "reduce_bucket_size": args.bucket,
        "stage3_prefetch_bucket_size": args.bucket,
    }
    for what in case.get("offload", []):
        zero[f"offload_{what}"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def count_state(engine) -> dict:
    """Bytes of the ZeRO-3 state on this rank, each storage counted once, by kind and dense / experts."""
    optimizer = engine.optimizer
    seen, out = set(), {}

    def add(kind, tensor, is_expert):
        if tensor is None or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        part = out.setdefault(kind, {"dense": 0, "experts": 0})
        part["experts" if is_expert else "dense"] += storage.nbytes()

    def sub_group_is_expert(i):
        return getattr(optimizer.fp16_groups[i][0], "allreduce", True) is False

    for param in engine.module.parameters():
        is_expert = getattr(param, "allreduce", True) is False
        # ds_tensors are views of one flat buffer per sub-group: count the partitions' elements, not the storage
        part = out.setdefault("parameters", {"dense": 0, "experts": 0})
        part["experts" if is_expert else "dense"] += param.ds_tensor.numel() * param.ds_tensor.element_size()
        seen.add(param.ds_tensor.untyped_storage().data_ptr())
        if param.ds_persist:
            add("persistent", param.data, is_expert)
    for i, flat in enumerate(optimizer.fp16_partitioned_groups_flat):
        seen.add(flat.untyped_storage().data_ptr())
    grads = optimizer.grad_partitions_flat_buffer
    expert_grads = sum(p.partition_numel() for i, group in enumerate(optimizer.fp16_groups) if sub_group_is_expert(i)
                       for p in group)
    out["gradients"] = {"experts": expert_grads * grads.element_size(),
                        "dense": (grads.numel() - expert_grads) * grads.element_size()}
    seen.add(grads.untyped_storage().data_ptr())
    for i, master in enumerate(optimizer.fp32_partitioned_groups_flat):
        add("master", master, sub_group_is_expert(i))
        add("fp32_gradients", master.grad, sub_group_is_expert(i))
        for value in optimizer.optimizer.state.get(master, {}).values():
            if torch.is_tensor(value) and value.numel() > 1:
                add("optimizer", value, sub_group_is_expert(i))
    return out


def run_case(case, args):
    import deepspeed

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations import HfDeepSpeedConfig

    started = time.monotonic()
    config = deepspeed_config(case, args)
    registered = HfDeepSpeedConfig(config)  # noqa: F841  (transformers holds it weakly)
    kwargs = {"distributed_config": DistributedConfig(ep_size=case["ep_size"])} if case["ep_size"] > 1 else {}
    dist.barrier()
    with PeakAnonymousMemory() as load:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(rank()))
    engine.backward(engine(input_ids=input_ids, labels=input_ids).loss)
    engine.step()
    state = count_state(engine)
    dist.barrier()
    with PeakAnonymousMemory() as save:
        if case["ep_size"] > 1:
            engine.module.save_pretrained(f"{args.save_dir}/{case['name']}")
        else:
            # Without EP, the documented ZeRO-3 save (accelerate's `get_state_dict`): the whole model on rank 0
            state_dict = engine._zero3_consolidated_16bit_state_dict()
            engine.module.save_pretrained(f"{args.save_dir}/{case['name']}", state_dict=state_dict,
                                          is_main_process=rank() == 0)
            del state_dict
    dist.barrier()
    engine.destroy()
    del engine, optimizer, model, registered
    release_free_memory()
    print(f"{case['name']}: load +{load.increase / 2**20:.1f} MiB, save +{save.increase / 2**20:.1f} MiB, "
          f"{time.monotonic() - started:.1f} s", flush=True)
    return {"state": state, "load_peak_increase": load.increase, "save_peak_increase": save.increase}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--cases", required=True,
                        help="JSON list of {name, ep_size, offload: [optimizer, param], persistence_threshold}")
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--bucket", type=int, default=50_000)
    args = parser.parse_args()
    init_process_group()
    return {case["name"]: run_case(case, args) for case in json.loads(args.cases)}


if __name__ == "__main__":
    run_rank(main)
