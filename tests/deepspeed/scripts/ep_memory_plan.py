"""Rank side of the memory planner's test: measure what an EP + ZeRO run holds, for several configurations in a row.

For each configuration (``--cases`` JSON: ``[{"ep_size": 2, "offload": ["optimizer"], "stage": 3}, ...]``, stage 3
unless given), in one process:
1. register the ZeRO config (``HfDeepSpeedConfig``), ``from_pretrained`` with ``DistributedConfig(ep_size=P)`` (P > 1)
   or without it (P = 1: at ZeRO-3 ``zero.Init``, shard-on-read), the peak anonymous RSS over the load sampled by a
   thread;
2. ``deepspeed.initialize`` with AdamW, one training step, then the ZeRO state counted tensor by tensor: every storage
   once, dense and experts apart. ZeRO-3 (the fp32 master partitions of an fp32 model are the parameter partitions
   themselves): parameter partitions, whole persistent parameters, gradient partitions (+ offload's fp32 gradients),
   fp32 master and optimizer state. ZeRO-1/2: the parameters (the flat groups ``bit16_groups_flat``), the whole gradients when stage 1 starts its
   reduction, the gradient partition buffer (``grads_in_partition``) when the step starts, the fp32 master partitions
   (``single_partition_of_fp32_groups``), their optimizer state, offload's fp32 gradients, 16-bit partitions and
   staging buffers, and the largest fp32 gradient the step makes for a group's partition (``step_transient``);
3. ``save_pretrained`` on every rank (ZeRO-3 only; with EP the streamed save; without, accelerate's ZeRO-3 save
   through the engine's consolidated state dict), the peak anonymous RSS over it;
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
    zero = {"stage": case.get("stage", 3), "reduce_bucket_size": args.bucket}
    if zero["stage"] == 3:
        zero.update(stage3_param_persistence_threshold=case.get("persistence_threshold", 0),
                    stage3_prefetch_bucket_size=args.bucket)
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


def is_expert(param) -> bool:
    return getattr(param, "allreduce", True) is False


class StorageCounter:
    """Bytes by kind, dense and experts apart, each storage counted once."""

    def __init__(self):
        self.seen, self.out = set(), {}

    def add(self, kind, tensor, expert):
        if tensor is None or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.add_bytes(kind, storage.nbytes(), expert)

    def add_bytes(self, kind, nbytes, expert):
        part = self.out.setdefault(kind, {"dense": 0, "experts": 0})
        part["experts" if expert else "dense"] += nbytes


class Zero12Probe:
    """
    Looks at the ZeRO-1/2 optimizer's gradients where they peak, during one step: the whole gradients as stage 1's
    reduction starts (`reduce_gradients`, called by the engine at the accumulation boundary), the gradient partition
    buffer as the step starts (its views are `averaged_gradients`; `grads_in_partition` itself is unset after the
    backward), and the fp32 gradient of each group's partition as the wrapped optimizer steps it (a step pre-hook).
    """

    def __init__(self, engine):
        self.optimizer = engine.optimizer
        self.whole_gradients = StorageCounter()
        self.gradient_buffer = None
        self.buffer_storages = set()
        self.step_gradients = []  # (storage pointer, bytes) of the fp32 gradients at each group's step
        self._wrap("reduce_gradients", self._count_whole_gradients)
        self._wrap("step", self._count_gradient_buffer)
        self._hook = self.optimizer.optimizer.register_step_pre_hook(self._count_step_gradients)

    def _wrap(self, name, before):
        original = getattr(self.optimizer, name)

        def wrapped(*args, **kwargs):
            before()
            return original(*args, **kwargs)

        setattr(self.optimizer, name, wrapped)

    def _count_whole_gradients(self):
        for group in self.optimizer.bit16_groups:
            for param in group:
                self.whole_gradients.add("whole_gradients", param.grad, is_expert(param))

    def _count_gradient_buffer(self):
        """The buffer's bytes as allocated, and split by what DeepSpeed put in it: the parameters it updates, whole."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for grads in self.optimizer.averaged_gradients.values() if grads is not None for t in grads}
        split = StorageCounter()
        if storages:  # none with offload: the gradients go to the host's fp32 partitions directly
            for i, params in enumerate(self.optimizer.params_in_partition):
                for param in params:
                    split.add_bytes("gradients", param.numel() * param.element_size(), is_moe_group(self.optimizer, i))
        self.gradient_buffer = {"split": split.out.get("gradients", {"dense": 0, "experts": 0}),
                                "largest_storage": max(storages.values(), default=0)}
        self.buffer_storages = set(storages)

    def _count_step_gradients(self, optimizer, args, kwargs):
        for group in optimizer.param_groups:  # the one group being stepped
            for master in group["params"]:
                if master.grad is not None:
                    grad = master.grad
                    self.step_gradients.append((grad.untyped_storage().data_ptr(), grad.numel() * grad.element_size()))

    def step_transient(self) -> int:
        """
        The largest fp32 gradient of a partition the step made and freed: not offload's (kept), nor a view of the
        gradient buffer (a partition within one parameter of an fp32 model is flattened without a copy).
        """
        kept = {master.grad.untyped_storage().data_ptr() for master in self.optimizer.single_partition_of_fp32_groups
                if master.grad is not None}
        return max((nbytes for pointer, nbytes in self.step_gradients
                    if pointer not in kept and pointer not in self.buffer_storages), default=0)

    def remove(self):
        self._hook.remove()
        for name in ("reduce_gradients", "step"):
            delattr(self.optimizer, name)


def is_moe_group(optimizer, group_index) -> bool:
    return bool(optimizer.optimizer.param_groups[group_index].get("moe", False))


def count_zero12_state(engine, probe) -> dict:
    """Bytes of the ZeRO-1/2 state on this rank, each storage counted once, by kind and dense / experts."""
    optimizer = engine.optimizer
    counter = StorageCounter()
    # The parameters are views of the flat groups: their storages are `bit16_groups_flat`, and any other is counted
    for param in engine.module.parameters():
        counter.add("parameters", param.data, is_expert(param))
    for i, master in enumerate(optimizer.single_partition_of_fp32_groups):
        moe = is_moe_group(optimizer, i)
        counter.add("master", master, moe)
        counter.add("fp32_gradients", master.grad, moe)
        for value in optimizer.optimizer.state.get(master, {}).values():
            if torch.is_tensor(value) and value.numel() > 1:
                counter.add("optimizer", value, moe)
    for i, buffer in enumerate(getattr(optimizer, "param_buffer_of_bit16_for_cpu_offload_groups", [])):
        counter.add("offload_16bit", buffer, is_moe_group(optimizer, i))
    if optimizer.cpu_offload:
        largest = max((p for group in optimizer.bit16_groups for p in group), key=lambda p: p.numel())
        counter.add("staging_host", optimizer.temp_grad_buffer_for_cpu_offload, is_expert(largest))
        counter.add("staging_device", optimizer.temp_grad_buffer_for_gpu_offload, is_expert(largest))
    out = dict(counter.out)
    out.update(probe.whole_gradients.out)
    if probe.gradient_buffer is not None:
        out["gradients"] = probe.gradient_buffer["split"]
    return out


def run_case(case, args):
    import deepspeed

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations import HfDeepSpeedConfig

    started = time.monotonic()
    config = deepspeed_config(case, args)
    zero3 = config["zero_optimization"]["stage"] == 3
    registered = HfDeepSpeedConfig(config)  # transformers holds it weakly: kept until the case ends
    kwargs = {"distributed_config": DistributedConfig(ep_size=case["ep_size"])} if case["ep_size"] > 1 else {}
    dist.barrier()
    with PeakAnonymousMemory() as load:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    probe = None if zero3 else Zero12Probe(engine)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(rank()))
    engine.backward(engine(input_ids=input_ids, labels=input_ids).loss)
    engine.step()
    extra = {}
    if zero3:
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
        save_increase = save.increase
    else:
        state = count_zero12_state(engine, probe)
        extra = {"step_transient": probe.step_transient(),
                 "gradient_buffer_storage": (probe.gradient_buffer or {}).get("largest_storage", 0)}
        probe.remove()
        save_increase = None  # the planner does not model the save at stages 1 and 2
    dist.barrier()
    engine.destroy()
    del engine, optimizer, model, registered, probe
    release_free_memory()
    print(f"{case['name']}: load +{load.increase / 2**20:.1f} MiB"
          + (f", save +{save_increase / 2**20:.1f} MiB" if save_increase is not None else "")
          + f", {time.monotonic() - started:.1f} s", flush=True)
    return {"state": state, "load_peak_increase": load.increase, "save_peak_increase": save_increase, **extra}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--cases", required=True,
                        help="JSON list of {name, ep_size, offload: [optimizer, param], persistence_threshold, stage}")
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--bucket", type=int, default=50_000)
    args = parser.parse_args()
    init_process_group()
    return {case["name"]: run_case(case, args) for case in json.loads(args.cases)}


if __name__ == "__main__":
    run_rank(main)
