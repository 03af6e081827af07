"""Training benchmark: expert parallelism under DeepSpeed ZeRO-3, ZeRO-2 and ZeRO-1 against plain ZeRO and DeepSpeed's
own AutoEP.

    make bench-train                             # or: .venv/bin/python benchmarks/train_ep_zero3.py [--repeats 3]

One Qwen3MoeForCausalLM (4 layers, 8 experts, top-2, hidden 256, moe_intermediate 256, vocab 4096, fp32: 9.19 M
parameters, 6.29 M of them in experts) is saved once under `.cache/bench/` (seeded) and every variant loads it; each
trains 10 AdamW steps (lr 1e-3, no weight decay) on 2 CPU ranks (`--nproc`; torchrun, gloo, OMP_NUM_THREADS=1 per
rank; EP size 2, `--ep-size`: `--nproc 4 --ep-size 2` adds data parallelism over the expert copies), micro
batch 4 rows of 128 structured tokens per rank, the same rows on the same rank and step in every variant, under
DeepSpeed ZeRO-3 (defaults plus `stage3_param_persistence_threshold: 0`) or ZeRO-1 / ZeRO-2 (DeepSpeed's defaults):

- `D` ours:    ZeRO-3 registered (HfDeepSpeedConfig) before `from_pretrained(..., DistributedConfig(ep_size=2))`: each
               rank loads its experts, tagged for DeepSpeed (patch 0003); then `deepspeed.initialize`.
- `B` ZeRO-3:  the same registration, no distributed config: upstream's `zero.Init` path, experts partitioned over all
               ranks like every other weight and gathered whole for each forward and backward.
- `C` AutoEP:  a plain load, then `deepspeed.initialize` with `"expert_parallel": {"enabled": true, "autoep_size": 2,
               "preset_model": "qwen3_moe"}`: DeepSpeed swaps the MoE blocks for its own EP layer.
- `M` D with expert load metrics on every other step (even steps in one repeat, odd in the next)
               (`track_expert_load(engine)` before the step, `collect(step)` inside it: the hooks' counting plus one
               all-reduce, as when logging every step; off on the other steps). Not in the default set:
               `--variants D M` (`make bench-expert-load`) prints the ratio of M's on-steps to its off-steps, in the
               same processes (what other load on the host does to both cancels out), against its goal (<= 1.02), and
               M/D over all steps.
- `D2` EP + ZeRO-2: D's load and hand-over with ZeRO-2 registered (issue 24): the experts become DeepSpeed MoE
               layers, the client AdamW is split into dense and expert groups inside `deepspeed.initialize`.
- `D1` EP + ZeRO-1: the same at stage 1.
- `B2` ZeRO-2, no EP: a plain load with ZeRO-2 registered (every rank holds every expert; gradients and optimizer
               state partitioned over all ranks).
- `C2` AutoEP + ZeRO-2: C's `expert_parallel` section at stage 2. DeepSpeed requires MoE parameter groups at stages 1
               and 2 ("The model has moe layers, but None of the param groups are marked as MoE") and its AutoEP swaps
               the MoE blocks inside `deepspeed.initialize`, after a client optimizer was built: so C2 takes the
               config's optimizer, `{"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0, "torch_adam": true}}`
               (the same `torch.optim.AdamW`), which DeepSpeed splits into MoE groups itself.
`--stages 2 3` keeps the variants of those stages only.

Per variant and rank: load time (`from_pretrained`, barriers around it; D's includes starting DeepSpeed's communication
and its expert groups, which B and C do in `deepspeed.initialize`, so their sum is compared too),
`deepspeed.initialize` time, step times (a barrier before and after every step; the figure is the median of steps
3-10), the rank's CPU time per step (all its threads; unlike wall time it hardly moves when other processes share the
cores, and the host's load average is recorded with every launch), CPU time per step by thread name (main thread vs the
gloo threads of each process group), peak RSS (VmHWM: after initialize and at the end), and the ZeRO state the rank
keeps. ZeRO-3: its parameter partitions (`ds_tensor`), the optimizer's fp32 master partitions
(`fp32_partitioned_groups_flat`), the Adam states (`optimizer.state` of those partitions) and the gradient partitions
(`grad_partitions_flat_buffer`), in elements and bytes (bytes also counted once per storage, to catch aliases). ZeRO-1/2
(counted as the memory planner's test counts them, `tests/deepspeed/scripts/ep_memory_plan.py`, during step 2, which
is not timed): the whole parameters (flat groups), the gradient partition buffer when the step starts plus, at stage 1,
the whole gradients when the reduction starts, the fp32 master partitions (`single_partition_of_fp32_groups`) and their
Adam states. Both against the ZeRO-3 ideal per rank: (dense / W + experts / W) x (param + grad + 2 Adam states + fp32
master), and against the memory planner (`plan_memory` for the variant's stage and EP size, `cpu_only`; it models
this fork's layout: AutoEP's rows get the fork's figure for their EP size, its own expert tensors may move a partition
boundary), whose per-rank state and host figure are printed next to the measured peak RSS, with the planner's three
stages side by side for this model.
The variants run interleaved, `--repeats` times (3); a variant's figure is the median over repeats of the slowest
rank (time) or the largest rank (memory). The table and the ratios against the goals (step D/B < 1, step D/C <= 1;
EP + ZeRO-2 and EP + ZeRO-1 faster than EP + ZeRO-3, step D2/D < 1 and D1/D < 1, and at most AutoEP + ZeRO-2's, step
D2/C2 <= 1 and D1/C2 <= 1) go to stdout, everything to JSON under benchmarks/results/ (git-ignored). The losses of
the variants are compared too: they train the same model on the same rows, so they agree to float rounding.

`--profile` adds one run of D, C, D2 and C2 (those selected) with torch.profiler on rank 0 around steps 5-6 and prints
their top self-CPU operators (per step; a profiler's self time is wall time inside the operator, waits for the other
rank included) and every collective and wait (`--repeats 0 --profile` runs only that). Every launch runs under a hard
timeout. Method and earlier figures: the project's research note `autoep-anchor.md`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


PROCESS_START = time.perf_counter()
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench_driver import finish, run  # noqa: E402  (beside this script)
from proc_stats import proc_status_kb  # noqa: E402

CACHE = REPO_ROOT / ".cache" / "bench"
NPROC = 2  # default ranks (--nproc)
EP_SIZE = 2  # default expert-parallel size of D and C (--ep-size)
MODEL = dict(
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=512,  # unused: every layer is an MoE layer
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
    norm_topk_prob=True,
    vocab_size=4096,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
CHECKPOINT = CACHE / "qwen3moe-l4-h256-e8-v4096-fp32-train"
SEQ_LEN = 128
MICRO_BATCH = 4
STEPS = 10
TIMED_STEPS = slice(2, 10)  # steps 3-10
PROFILED_STEPS = (4, 5)  # steps 5-6
PROFILED_VARIANTS = ("D", "C", "D2", "C2")  # --profile
ZERO12_COUNTED_STEP = 1  # step 2: the ZeRO-1/2 state is counted while it runs (see `zero12_state`), not timed
LR = 1e-3
DATA_SEED = 1234
VARIANTS = {
    "D": "EP + ZeRO-3 (ours)",
    "B": "ZeRO-3, no EP (zero.Init)",
    "C": "DeepSpeed AutoEP + ZeRO-3",
    "M": "D + expert load metrics on every other step",
    "D2": "EP + ZeRO-2 (ours)",
    "D1": "EP + ZeRO-1 (ours)",
    "B2": "ZeRO-2, no EP",
    "C2": "DeepSpeed AutoEP + ZeRO-2",
}
# The ZeRO stage of each variant
STAGES = {"D": 3, "B": 3, "C": 3, "M": 3, "D2": 2, "D1": 1, "B2": 2, "C2": 2}
# This fork's EP (DistributedConfig(ep_size)), DeepSpeed's AutoEP, neither
FORK_EP = ("D", "M", "D2", "D1")
AUTOEP = ("C", "C2")
DEFAULT_VARIANTS = ("D", "B", "C", "D2", "D1", "B2", "C2")
GOAL_STEP_D_OVER_B = 1.0  # strictly below
GOAL_STEP_D_OVER_C = 1.0  # at most
GOAL_STEP_M_OVER_D = 1.02  # at most: expert load metrics on vs off
GOAL_STEP_ZERO12_OVER_D = 1.0  # strictly below: EP + ZeRO-1/2 faster than EP + ZeRO-3
GOAL_STEP_ZERO12_OVER_C2 = 1.0  # at most: EP + ZeRO-1/2 against AutoEP + ZeRO-2
MiB = 2**20


# ---------------------------------------------------------------------------------------------------------------------
# Shared by both sides


def deepspeed_config(variant: str, ep_size: int) -> dict:
    stage = STAGES[variant]
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if variant in AUTOEP:
        config["expert_parallel"] = {"enabled": True, "autoep_size": ep_size, "preset_model": "qwen3_moe"}
    if variant in AUTOEP and stage < 3:
        # DeepSpeed's ZeRO-1/2 optimizer needs MoE parameter groups, which AutoEP's layers (made inside
        # `deepspeed.initialize`) only get from an optimizer DeepSpeed builds: the config's, the same torch AdamW
        config["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}}
    return config


def uses_config_optimizer(variant: str) -> bool:
    return "optimizer" in deepspeed_config(variant, EP_SIZE)


def build_checkpoint() -> None:
    """Save the seeded model once; every variant and repeat loads these same weights."""
    if (CHECKPOINT / ".complete").exists():
        return
    import shutil

    import torch

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    print(f"building the benchmark checkpoint under {CHECKPOINT} (once)", flush=True)
    shutil.rmtree(CHECKPOINT, ignore_errors=True)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MODEL)).to(torch.float32)
    model.save_pretrained(CHECKPOINT)
    (CHECKPOINT / ".complete").touch()


def parameter_counts() -> dict:
    """Dense and expert elements of the model (from a meta-device instance)."""
    import torch

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MODEL))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "experts": experts, "dense": total - experts}


def ideal_state(counts: dict, nproc: int) -> dict:
    """Per rank, ZeRO-3 with EP x EDP = W: 1/W of every dense and every expert tensor, 5 fp32 copies of it."""
    per_copy = counts["dense"] / nproc + counts["experts"] / nproc
    return {"per_copy_numel": per_copy, "numel": 5 * per_copy, "bytes": 5 * per_copy * 4}


# ---------------------------------------------------------------------------------------------------------------------
# Rank side



def rank_rows(step: int, rank: int, world: int, vocab: int):
    """This rank's rows at `step`: structured sequences (random start, random stride, mod vocab), the same for every
    variant; the global batch of a step is the ranks' rows in rank order."""
    import torch

    generator = torch.Generator().manual_seed(DATA_SEED)
    rows = STEPS * world * MICRO_BATCH
    start = torch.randint(0, vocab, (rows, 1), generator=generator)
    stride = torch.randint(1, 8, (rows, 1), generator=generator)
    data = (start + stride * torch.arange(SEQ_LEN)) % vocab
    first = (step * world + rank) * MICRO_BATCH
    return data[first : first + MICRO_BATCH]


def thread_names() -> dict[str, int]:
    """This process's threads by name (/proc/self/task/*/comm): the gloo process groups' threads show up here."""
    names: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        names[name] = names.get(name, 0) + 1
    return dict(sorted(names.items()))


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process's threads, summed per thread name."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return out


def zero3_state(engine) -> dict:
    """The ZeRO-3 state this rank keeps, per kind: elements, bytes, and bytes counted once per storage."""
    import torch

    optimizer = engine.optimizer  # DeepSpeedZeroOptimizer_Stage3
    kinds: dict[str, list] = {"params": [], "grads": [], "fp32_master": [], "adam_states": []}
    for param in engine.module.parameters():
        if hasattr(param, "ds_tensor"):
            kinds["params"].append(param.ds_tensor)
        else:  # not partitioned (should not happen with persistence threshold 0)
            kinds["params"].append(param.data)
    kinds["fp32_master"] = list(optimizer.fp32_partitioned_groups_flat)
    for flat in optimizer.fp32_partitioned_groups_flat:
        for value in optimizer.optimizer.state.get(flat, {}).values():
            if torch.is_tensor(value) and value.numel() > 1:  # exp_avg, exp_avg_sq (not the scalar step)
                kinds["adam_states"].append(value)
    grads = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if grads is not None:
        kinds["grads"].append(grads)

    out, seen, unique_bytes = {}, set(), 0
    for kind, tensors in kinds.items():
        out[kind] = {
            "numel": sum(t.numel() for t in tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "tensors": len(tensors),
        }
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                unique_bytes += storage.nbytes()
    out["total"] = {k: sum(out[kind][k] for kind in kinds) for k in ("numel", "bytes")}
    out["total"]["unique_storage_bytes"] = unique_bytes
    # The master weights are a copy, not an alias, of the parameter partitions in fp32 (DeepSpeed compares
    # `tensor.device == self.device` with `self.device` the string 'cpu'): record it.
    params_ptrs = {t.untyped_storage().data_ptr() for t in kinds["params"]}
    out["fp32_master_aliases_params"] = all(
        t.untyped_storage().data_ptr() in params_ptrs for t in kinds["fp32_master"]
    )
    ipg = [b.buffer for b in getattr(optimizer, "ipg_buckets", {}).values() if getattr(b, "buffer", None) is not None]
    out["ipg_buffer_bytes_virtual"] = sum(t.numel() * t.element_size() for t in ipg)
    return out


def expert_partition_groups(engine) -> dict:
    """The ranks over which expert and dense parameters are partitioned (first one of each)."""
    import torch.distributed as dist

    groups = {}
    for name, param in engine.module.named_parameters():
        kind = "experts" if ".experts." in name else "dense"
        if kind not in groups and hasattr(param, "ds_process_group"):
            groups[kind] = dist.get_process_group_ranks(param.ds_process_group)
    return groups


def zero12_state(engine, probe) -> dict:
    """
    The ZeRO-1/2 state this rank keeps, in `zero3_state`'s form, counted as the memory planner's test counts it
    (`count_zero12_state`: each storage once, dense and experts apart) once `probe` (`Zero12Probe`) has watched a step:
    params = the flat parameter groups (whole parameters), grads = the gradient partition buffer when the step starts
    plus, at stage 1, the whole gradients when the reduction starts, fp32_master = the fp32 partitions, adam_states =
    their AdamW moments. Every tensor of it is fp32 here (fp32 model), so elements = bytes / 4.
    """
    from tests.deepspeed.scripts.ep_memory_plan import count_zero12_state

    optimizer = engine.optimizer  # DeepSpeedZeroOptimizer
    counted = count_zero12_state(engine, probe)

    def nbytes(*keys):
        return sum(sum(counted.get(key, {}).values()) for key in keys)

    kinds = {"params": nbytes("parameters"), "grads": nbytes("gradients", "whole_gradients", "fp32_gradients"),
             "fp32_master": nbytes("master"), "adam_states": nbytes("optimizer")}
    out = {kind: {"numel": value // 4, "bytes": value} for kind, value in kinds.items()}
    out["total"] = {k: sum(out[kind][k] for kind in kinds) for k in ("numel", "bytes")}
    out["total"]["unique_storage_bytes"] = nbytes(*counted)
    out["by_kind"] = counted  # bytes per kind of the planner's test, dense and experts apart
    flat_ptrs = {t.untyped_storage().data_ptr() for t in optimizer.bit16_groups_flat}
    out["fp32_master_aliases_params"] = all(
        t.untyped_storage().data_ptr() in flat_ptrs for t in optimizer.single_partition_of_fp32_groups
    )
    ipg = [t for b in getattr(optimizer, "ipg_buckets", {}).values() for t in getattr(b, "buffer", None) or []]
    out["ipg_buffer_bytes_virtual"] = sum(t.numel() * t.element_size() for t in ipg)
    return out


def zero12_partition_groups(engine) -> dict:
    """The ranks over which the ZeRO-1/2 optimizer partitions its dense and its expert (MoE) groups (first of each)."""
    import torch.distributed as dist

    optimizer = engine.optimizer
    groups = {}
    for i, group in enumerate(optimizer.optimizer.param_groups):
        kind = "experts" if group.get("moe", False) else "dense"
        if kind not in groups:
            groups[kind] = dist.get_process_group_ranks(optimizer.real_dp_process_group[i])
    return groups


def top_self_cpu(prof, steps: int, limit: int = 25) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"name": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps,
         "cpu_total_ms_per_step": e.cpu_time_total / 1e3 / steps}
        for e in events[:limit]
    ]


def rank_main(args) -> dict:
    import torch
    import torch.distributed as dist

    from tests.fork_utils.worker import init_process_group, rank, world_size

    variant = args.variant
    init_process_group()
    r, world = rank(), world_size()
    config = deepspeed_config(variant, args.ep_size)
    stage = STAGES[variant]
    registered = None
    if variant not in AUTOEP:
        from transformers.integrations import HfDeepSpeedConfig

        registered = HfDeepSpeedConfig(config)  # noqa: F841  (ZeRO registered for from_pretrained; keep alive)
    import deepspeed

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401  (not inside the timed load)

    torch.manual_seed(0)
    post_import_rss = proc_status_kb("VmRSS")
    import_s = time.perf_counter() - PROCESS_START
    kwargs = {"dtype": torch.float32}
    if variant in FORK_EP:
        kwargs["distributed_config"] = DistributedConfig(ep_size=args.ep_size)
    dist.barrier()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT, **kwargs)
    dist.barrier()
    load_s = time.perf_counter() - start
    rss_after_load = proc_status_kb("VmRSS")
    model.train()

    if uses_config_optimizer(variant):  # AutoEP at stage 1/2: the config's AdamW (see `deepspeed_config`)
        initialize_kwargs = {"model_parameters": list(model.parameters())}
    else:
        initialize_kwargs = {"optimizer": torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)}
    dist.barrier()
    start = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, config=config, **initialize_kwargs)
    dist.barrier()
    init_s = time.perf_counter() - start
    hwm_after_init = proc_status_kb("VmHWM")
    rss_after_init = proc_status_kb("VmRSS")
    tracker, expert_load, collect_s, metrics_on = None, [], [], []
    if variant == "M":
        from transformers.integrations.expert_load_metrics import track_expert_load

    vocab = model.config.vocab_size
    losses, step_s, step_cpu_s, threads = [], [], [], []
    prof, profiled = None, []
    state, probe = None, None
    for step in range(STEPS):
        input_ids = rank_rows(step, r, world, vocab)
        if stage < 3 and step == ZERO12_COUNTED_STEP:
            from tests.deepspeed.scripts.ep_memory_plan import Zero12Probe

            probe = Zero12Probe(engine)  # watches this step's gradients (not a timed step)
        if step == TIMED_STEPS.start:
            threads_cpu_before = thread_cpu_s()
        if args.profile and r == 0 and step == PROFILED_STEPS[0]:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU])
            prof.__enter__()
        if variant == "M" and step % 2 == args.metrics_parity:
            tracker = track_expert_load(engine)  # hooks on for this step (outside the timed part)
        metrics_on.append(tracker is not None)
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        if tracker is not None:
            collect_start = time.perf_counter()
            expert_load.append(tracker.collect(step + 1))  # what a logger would get, every step
            collect_s.append(time.perf_counter() - collect_start)
            tracker.remove()
            tracker = None
        dist.barrier()
        step_s.append(time.perf_counter() - start)
        step_cpu_s.append(time.process_time() - cpu_start)  # every thread of this rank, the gloo ones included
        if probe is not None:
            state = zero12_state(engine, probe)
            probe.remove()
            probe = None
        if prof is not None and step == PROFILED_STEPS[-1]:
            prof.__exit__(None, None, None)
            profiled = top_self_cpu(prof, len(PROFILED_STEPS), limit=60)
            averages, n = prof.key_averages(), len(PROFILED_STEPS)
            total = sum(e.self_cpu_time_total for e in averages) / 1e3 / n
            # every collective call and wait, whatever its rank in the list
            comm = [e for e in averages if "c10d" in e.key or "wait" in e.key.lower() or "AllToAll" in e.key]
            profiled.insert(0, {"name": "[collectives and waits: " + ", ".join(
                f"{e.key} x{e.count / n:.0f}" for e in sorted(comm, key=lambda e: e.key)) + "]",
                "self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in comm) / 1e3 / n,
                "calls_per_step": sum(e.count for e in comm) / n, "cpu_total_ms_per_step": 0.0})
            profiled.insert(0, {"name": "[total self CPU]", "self_cpu_ms_per_step": total, "calls_per_step": 0,
                                "cpu_total_ms_per_step": total})
            prof = None
        losses.append(loss.item())
        threads.append(len(os.listdir("/proc/self/task")))
    threads_cpu_after = thread_cpu_s()
    timed = TIMED_STEPS.stop - TIMED_STEPS.start
    # CPU per timed step by thread name: do the gloo threads (one set per process group) take CPU from the main one?
    thread_cpu_per_step = {name: (threads_cpu_after[name] - threads_cpu_before.get(name, 0.0)) / timed
                           for name in threads_cpu_after}

    if stage == 3:
        state, partition_groups = zero3_state(engine), expert_partition_groups(engine)
    else:
        partition_groups = zero12_partition_groups(engine)
    result = {
        "rank_wall_s": time.perf_counter() - PROCESS_START,
        "variant": variant,
        "stage": stage,
        "rank": r,
        "world_size": world,
        "threads": max(threads),
        "thread_names": thread_names(),
        "thread_cpu_s_per_step": thread_cpu_per_step,
        "import_s": import_s,
        "load_s": load_s,
        "init_s": init_s,
        "step_s": step_s,
        "step_cpu_s": step_cpu_s,
        "losses": losses,
        "post_import_rss_mib": post_import_rss / 1024,
        "rss_after_load_mib": rss_after_load / 1024,
        "rss_after_init_mib": rss_after_init / 1024,
        "peak_rss_load_init_mib": hwm_after_init / 1024,
        "peak_rss_mib": proc_status_kb("VmHWM") / 1024,
        "zero3": state,
        "has_moe_layers": bool(getattr(engine, "has_moe_layers", False)),
        "partition_groups": partition_groups,
        "profile": profiled,
        "expert_load_last": expert_load[-1] if expert_load else None,
        "expert_load_collect_s": collect_s,
        "metrics_on": metrics_on,
    }
    dist.barrier()
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def median(values):
    return statistics.median(values)


def planner_figures(variants, nproc: int, ep_size: int) -> tuple[dict, dict]:
    """
    The memory planner on this benchmark's model (`compare_stages`, fp32, AdamW, the variants' ZeRO options, DeepSpeed's
    CPU accelerator: the device is the host), per EP size the variants use (the fork's and AutoEP's, 1 without EP):
    per variant its stage's per-rank figures (bytes), and per EP size the stages side by side (text).
    """
    import dataclasses

    from transformers.integrations.deepspeed_expert_parallel_memory import (
        ZeroOptions,
        compare_stages,
        format_stage_comparison,
    )

    def ep_of(variant):
        return ep_size if variant in FORK_EP or variant in AUTOEP else 1

    plans, figures, text = {}, {}, {}
    zero = ZeroOptions.from_deepspeed_config(deepspeed_config("D", ep_size))  # stage 3, persistence threshold 0
    for ep in sorted({ep_of(v) for v in variants}):
        plans[ep] = compare_stages(CHECKPOINT, nproc, ep, "fp32", "adamw", zero, micro_batch=MICRO_BATCH,
                                   sequence_length=SEQ_LEN, cpu_only=True)
        text[ep] = format_stage_comparison(plans[ep])
    for v in variants:
        plan = plans[ep_of(v)][STAGES[v]]
        # the variant's own ZeRO options (stage 1/2 configs set no stage-3 option: the same plan)
        assert dataclasses.replace(zero, stage=STAGES[v]) == ZeroOptions.from_deepspeed_config(
            deepspeed_config(v, ep_size), param_persistence_threshold=0)
        figures[v] = {"ep_size": ep_of(v), "stage": STAGES[v], "state_bytes": plan.state,
                      "host_per_rank_bytes": plan.per_device("host"), "load_peak_bytes": plan.load_peak,
                      "optimizer_class": plan.optimizer_class, "rank": plan.rank}
    return figures, text


def summarize(runs: dict[str, list[dict]], counts: dict, nproc: int, planned: dict | None = None) -> dict:
    """runs[variant] = one dict per repeat, rank -> result. Per repeat: the slowest rank for times, the largest rank
    for memory; then the median over repeats. `planned`: the planner's figures per variant (`planner_figures`)."""
    planned = planned or {}
    ideal = ideal_state(counts, nproc)
    rows = {}
    for variant, repeats in runs.items():
        if not repeats:
            continue

        def over(fn, pick=max):
            return [pick(fn(res) for res in rep.values()) for rep in repeats]

        step_medians = over(lambda res: median(res["step_s"][TIMED_STEPS]))
        rows[variant] = {
            "label": VARIANTS[variant],
            "stage": STAGES[variant],
            "repeats": len(repeats),
            "step_s": median(step_medians),
            "step_s_range": [min(step_medians), max(step_medians)],
            "step_s_per_repeat": step_medians,
            "step_cpu_s": median(over(lambda res: median(res["step_cpu_s"][TIMED_STEPS]))),
            "step_cpu_s_per_repeat": over(lambda res: median(res["step_cpu_s"][TIMED_STEPS])),
            "init_s": median(over(lambda res: res["init_s"])),
            "load_s": median(over(lambda res: res["load_s"])),
            # D starts DeepSpeed's communication and its expert groups inside from_pretrained, which B and C do in
            # deepspeed.initialize: compare the sum too.
            "load_init_s": median(over(lambda res: res["load_s"] + res["init_s"])),
            "peak_rss_mib": median(over(lambda res: res["peak_rss_mib"])),
            "peak_rss_load_init_mib": median(over(lambda res: res["peak_rss_load_init_mib"])),
            "post_import_rss_mib": median(over(lambda res: res["post_import_rss_mib"])),
            "peak_over_post_import_mib": median(over(lambda res: res["peak_rss_mib"] - res["post_import_rss_mib"])),
            "rss_after_load_mib": median(over(lambda res: res["rss_after_load_mib"])),
            "threads": max(over(lambda res: res["threads"])),
            "import_s": median(over(lambda res: res["import_s"])),
            "launch_wall_s": median(over(lambda res: res["launch_wall_s"])),
            "host_loadavg": median(over(lambda res: max(res["loadavg_1min"]))),
            # the ZeRO state at the variant's stage (`zero3_state` or `zero12_state`; the key predates stages 1/2)
            "zero3": {
                kind: {k: median(over(lambda res, kind=kind, k=k: res["zero3"][kind][k]))
                       for k in ("numel", "bytes")}
                for kind in ("params", "grads", "fp32_master", "adam_states", "total")
            },
            "zero3_unique_storage_bytes": median(over(lambda res: res["zero3"]["total"]["unique_storage_bytes"])),
            "fp32_master_aliases_params": repeats[0][0]["zero3"]["fp32_master_aliases_params"],
            "ipg_buffer_bytes_virtual": repeats[0][0]["zero3"]["ipg_buffer_bytes_virtual"],
            "has_moe_layers": repeats[0][0]["has_moe_layers"],
            "partition_groups": {r: res["partition_groups"] for r, res in repeats[0].items()},
            "thread_names": repeats[0][0]["thread_names"],
            "thread_cpu_s_per_step": {
                name: median([median(res["thread_cpu_s_per_step"].get(name, 0.0) for res in rep.values())
                              for rep in repeats])
                for name in repeats[0][0]["thread_cpu_s_per_step"]
            },
            # mean over ranks of each step's loss, first repeat (all repeats are identical up to rounding)
            "losses": [statistics.fmean(res["losses"][s] for res in repeats[0].values()) for s in range(STEPS)],
            "planner": planned.get(variant),
        }
    ratios = {}

    def ratio(name, a, b, key, goal=None, strict=False):
        if a in rows and b in rows:
            value = rows[a][key] / rows[b][key]
            entry = {"value": value}
            if goal is not None:
                entry.update(goal=goal, ok=value < goal if strict else value <= goal,
                             op="<" if strict else "<=")
            ratios[name] = entry

    ratio("step D/B", "D", "B", "step_s", GOAL_STEP_D_OVER_B, strict=True)
    ratio("step D/C", "D", "C", "step_s", GOAL_STEP_D_OVER_C)
    ratio("step C/B", "C", "B", "step_s")
    ratio("step M/D (metrics on every other step)", "M", "D", "step_s")
    ratio("step CPU time M/D", "M", "D", "step_cpu_s")
    ratio("step CPU time D/B", "D", "B", "step_cpu_s")
    ratio("step CPU time D/C", "D", "C", "step_cpu_s")
    ratio("init D/B", "D", "B", "init_s")
    ratio("init D/C", "D", "C", "init_s")
    ratio("load D/B", "D", "B", "load_s")
    ratio("load D/C", "D", "C", "load_s")
    ratio("load+init D/B", "D", "B", "load_init_s")
    ratio("load+init D/C", "D", "C", "load_init_s")
    ratio("peak RSS D/B", "D", "B", "peak_rss_mib")
    ratio("peak RSS D/C", "D", "C", "peak_rss_mib")
    ratio("peak-post-import D/B", "D", "B", "peak_over_post_import_mib")
    ratio("peak-post-import D/C", "D", "C", "peak_over_post_import_mib")
    # Stages 1 and 2 (issue 24): EP + ZeRO-2 / ZeRO-1 faster than EP + ZeRO-3, and at most AutoEP + ZeRO-2
    for v in ("D2", "D1"):
        ratio(f"step {v}/D", v, "D", "step_s", GOAL_STEP_ZERO12_OVER_D, strict=True)
        ratio(f"step {v}/C2", v, "C2", "step_s", GOAL_STEP_ZERO12_OVER_C2)
    for a, b in (("D2", "D"), ("D1", "D"), ("D2", "C2"), ("D1", "C2")):
        ratio(f"step CPU time {a}/{b}", a, b, "step_cpu_s")
    for a, b in (("D2", "B2"), ("C2", "C"), ("B2", "B"), ("C2", "B2")):
        ratio(f"step {a}/{b}", a, b, "step_s")
    for a, b in (("D2", "D"), ("D1", "D"), ("D2", "C2"), ("D1", "C2"), ("D2", "B2")):
        ratio(f"peak RSS {a}/{b}", a, b, "peak_rss_mib")
        ratio(f"peak-post-import {a}/{b}", a, b, "peak_over_post_import_mib")
        ratio(f"load+init {a}/{b}", a, b, "load_init_s")
    for a, b in (("D", "B"), ("D", "C"), ("D2", "D"), ("D1", "D"), ("D2", "C2"), ("D2", "B2")):
        if a in rows and b in rows:
            ratios[f"ZeRO state bytes {a}/{b}"] = {
                "value": rows[a]["zero3"]["total"]["bytes"] / rows[b]["zero3"]["total"]["bytes"]}
    for v in rows:
        ratios[f"ZeRO state bytes {v}/ZeRO-3 ideal"] = {
            "value": rows[v]["zero3"]["total"]["bytes"] / ideal["bytes"]}
    for v in rows:
        if rows[v]["planner"]:
            ratios[f"ZeRO state bytes {v}/planner"] = {
                "value": rows[v]["zero3"]["total"]["bytes"] / rows[v]["planner"]["state_bytes"]}
    parity = {}
    reference = next((v for v in ("B", "B2", "D") if v in rows), next(iter(rows), None))
    for v in rows:
        if v != reference:
            parity[f"{v} vs {reference}"] = max(
                abs(a - b) / abs(b) for a, b in zip(rows[v]["losses"], rows[reference]["losses"]))
    return {"rows": rows, "ratios": ratios, "ideal": ideal, "counts": counts, "loss_rel_diff": parity}


def print_table(summary: dict, nproc: int) -> None:
    rows, ideal = summary["rows"], summary["ideal"]
    print("| variant | step s median [range] | step CPU s/rank | initialize s | load s | peak RSS MiB (load+init) "
          "| peak - post-import MiB | ZeRO state/rank M elems: params + grads + fp32 master + Adam = total (MiB) "
          "| x ZeRO-3 ideal | threads |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v, row in rows.items():
        z = row["zero3"]
        print(
            f"| {v} {row['label']} | {row['step_s']:.3f} [{row['step_s_range'][0]:.3f}-{row['step_s_range'][1]:.3f}] "
            f"| {row['step_cpu_s']:.3f} | {row['init_s']:.2f} | {row['load_s']:.2f} "
            f"| {row['peak_rss_mib']:.0f} ({row['peak_rss_load_init_mib']:.0f}) "
            f"| {row['peak_over_post_import_mib']:.0f} "
            f"| {z['params']['numel'] / 1e6:.2f} + {z['grads']['numel'] / 1e6:.2f} + "
            f"{z['fp32_master']['numel'] / 1e6:.2f} + {z['adam_states']['numel'] / 1e6:.2f} = "
            f"{z['total']['numel'] / 1e6:.2f} ({z['total']['bytes'] / MiB:.1f}) "
            f"| {z['total']['bytes'] / ideal['bytes']:.3f} | {row['threads']} |"
        )
    if any(row["planner"] for row in rows.values()):
        print("\nmemory per rank (largest rank), measured and planned (`plan_memory`, the variant's stage and EP size; "
              "the planner leaves out activations, imports and allocator slack, in the measured peak RSS):")
        print("| variant | stage | EP | peak RSS MiB | peak - post-import MiB | ZeRO state MiB, measured "
              "| ZeRO state MiB, planner | measured / planner | planner host per rank MiB (state + step buffers) "
              "| planner load peak MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for v, row in rows.items():
            plan = row["planner"]
            if not plan:
                continue
            measured = row["zero3"]["total"]["bytes"]
            if v in AUTOEP:
                load = "n/a (AutoEP: a plain load)"
            else:
                load = f"{plan['load_peak_bytes'] / MiB:.1f}" if plan["load_peak_bytes"] is not None else "not modelled"
            print(f"| {v} {row['label']} | {row['stage']} | {plan['ep_size']} | {row['peak_rss_mib']:.0f} "
                  f"| {row['peak_over_post_import_mib']:.0f} | {measured / MiB:.1f} | {plan['state_bytes'] / MiB:.1f} "
                  f"| {measured / plan['state_bytes']:.3f} | {plan['host_per_rank_bytes'] / MiB:.1f} | {load} |")
    for ep, text in summary.get("planner_stages", {}).items():
        print(f"\nthe planner's stages side by side for this model, EP {ep} (AutoEP planned with the fork's layout; "
              "CPU ranks: 'host' holds the state, 'GPU' is the working buffers alone, mostly DeepSpeed's default "
              "reduce bucket of 5e8 elements, allocated but only partly touched on CPU):")
        print(text)
    counts = summary["counts"]
    print(f"\nideal ZeRO-3 state per rank: (dense {counts['dense'] / 1e6:.2f} M / {nproc} + experts "
          f"{counts['experts'] / 1e6:.2f} M / {nproc}) x 5 = {ideal['numel'] / 1e6:.2f} M elements, "
          f"{ideal['bytes'] / MiB:.1f} MiB fp32")
    for v, row in rows.items():
        print(f"{v} (ZeRO-{row['stage']}): import {row['import_s']:.1f} s, launch {row['launch_wall_s']:.0f} s, "
              f"host load average "
              f"{row['host_loadavg']:.1f} (2 cores), engine.has_moe_layers={row['has_moe_layers']}, fp32 master "
              f"aliases params={row['fp32_master_aliases_params']}, unique storage "
              f"{row['zero3_unique_storage_bytes'] / MiB:.1f} MiB, partition groups {row['partition_groups']}")
        cpu = ", ".join(f"{name} {sec * 1e3:.1f}" for name, sec in row["thread_cpu_s_per_step"].items())
        print(f"   threads of rank 0: {row['thread_names']}; CPU ms per step by thread name: {cpu}")
    print()
    for name, entry in summary["ratios"].items():
        goal = f"   goal {entry['op']} {entry['goal']}: {'PASS' if entry['ok'] else 'FAIL'}" if "goal" in entry else ""
        print(f"{name:30s} {entry['value']:.3f}{goal}")
    for name, value in summary["loss_rel_diff"].items():
        print(f"loss max rel diff {name}: {value:.2e}")


def print_profiles(profiles: dict[str, list[dict]], limit: int = 20) -> None:
    print("\ntop self-CPU operators on rank 0, ms per step (steps 5-6), calls per step")
    for variant, events in profiles.items():
        print(f"\n-- {variant} {VARIANTS[variant]}")
        print(f"{'operator':60s} {'self ms':>9s} {'calls':>7s}")
        for e in events[: limit + 2]:
            name = e["name"] if e["name"].startswith("[") else e["name"][:60]
            print(f"{name:60s} {e['self_cpu_ms_per_step']:9.2f} {e['calls_per_step']:7.0f}")


def expert_load_overhead(repeats: list[dict]) -> dict:
    """M's timed steps in pairs, metrics on and off (adjacent steps of the same launch, so what other load on the host
    does to one it mostly does to the other; the on-steps are the even ones in one repeat, the odd ones in the next):
    per pair the slowest rank's on / off ratio, median over all pairs of all repeats."""

    def pair_ratios(rep, key):
        ranks = list(rep.values())
        steps = range(TIMED_STEPS.start, TIMED_STEPS.stop)
        slowest = {s: max(res[key][s] for res in ranks) for s in steps}
        on_steps = [s for s in steps if ranks[0]["metrics_on"][s]]
        return [slowest[s] / slowest[s + 1 if s + 1 in slowest else s - 1] for s in on_steps]

    step_pairs = [r for rep in repeats for r in pair_ratios(rep, "step_s")]
    cpu_pairs = [r for rep in repeats for r in pair_ratios(rep, "step_cpu_s")]
    collect_ms = median([median(res["expert_load_collect_s"]) * 1e3 for rep in repeats for res in rep.values()])
    value = median(step_pairs)
    return {"step_on_off": value, "pairs": len(step_pairs), "step_cpu_on_off": median(cpu_pairs),
            "collect_ms": collect_ms, "goal": GOAL_STEP_M_OVER_D, "ok": value <= GOAL_STEP_M_OVER_D}


def print_expert_load_overhead(overhead: dict) -> None:
    verdict = "PASS" if overhead["ok"] else "FAIL"
    print(f"\nexpert load metrics on/off (adjacent steps, median of {overhead['pairs']} pairs): step "
          f"{overhead['step_on_off']:.3f}   goal <= {overhead['goal']}: {verdict}; step CPU time "
          f"{overhead['step_cpu_on_off']:.3f}; collect {overhead['collect_ms']:.2f} ms per step (one all-reduce + the "
          "figures)")


def run_variant(variant: str, cli, profile: bool = False, repeat: int = 0):
    from tests.fork_utils.launcher import launch

    args = ["--rank-side", "--variant", variant, "--ep-size", str(cli.ep_size)] + (["--profile"] if profile else [])
    # M: metrics on the even steps in one repeat, the odd ones in the next (steps of one parity can be slower)
    args += ["--metrics-parity", str(repeat % 2)]
    load_before = os.getloadavg()[0]
    env = {"OMP_NUM_THREADS": "1"}
    outcome = launch(Path(__file__), args, nproc=cli.nproc, launcher="torchrun", timeout=cli.timeout, env=env)
    if not outcome.ok or len(outcome.ranks) != cli.nproc or any(o.result is None for o in outcome.ranks.values()):
        print(outcome.report(), flush=True)
        return None, outcome.elapsed
    results = outcome.results()
    for res in results.values():
        res["launch_wall_s"] = outcome.elapsed
        res["loadavg_1min"] = [load_before, os.getloadavg()[0]]  # before / after the launch: other load on the host
    return results, outcome.elapsed


def driver(args) -> int:
    import torch

    import deepspeed
    import transformers

    started = time.monotonic()
    build_checkpoint()
    counts = parameter_counts()
    planned, planner_stages = planner_figures(args.variants, args.nproc, args.ep_size)
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    failures = []
    order = list(args.variants)
    for repeat in range(args.repeats):
        for variant in order[repeat % len(order):] + order[: repeat % len(order)]:  # rotate: interleaved, fair
            print(f"== repeat {repeat + 1}/{args.repeats}, {variant} ({VARIANTS[variant]})", end="", flush=True)
            result, elapsed = run_variant(variant, args, repeat=repeat)
            if result is None:
                failures.append(f"{variant}#{repeat + 1}")
                continue
            runs[variant].append(result)
            step = max(median(res["step_s"][TIMED_STEPS]) for res in result.values())
            print(f": step {step:.3f} s, {elapsed:.0f} s wall, load average {os.getloadavg()[0]:.1f}", flush=True)
    profiles = {}
    if args.profile:
        for variant in [v for v in PROFILED_VARIANTS if v in args.variants]:
            print(f"== profile {variant}", end="", flush=True)
            result, elapsed = run_variant(variant, args, profile=True)
            if result is None:
                failures.append(f"profile {variant}")
                continue
            profiles[variant] = result[0]["profile"]
            print(f": {elapsed:.0f} s wall", flush=True)
    if not any(runs.values()) and not profiles:
        return 1
    summary = summarize(runs, counts, args.nproc, planned)
    summary["planner_stages"] = planner_stages
    if summary["rows"]:
        print()
        print_table(summary, args.nproc)
    if profiles:
        print_profiles(profiles)
    environment = {
        "transformers": transformers.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "python": sys.version.split()[0], "cpus": os.cpu_count(), "kernel": os.uname().release,
    }
    setup = {"model": MODEL, "nproc": args.nproc, "ep_size": args.ep_size, "seq_len": SEQ_LEN,
             "micro_batch": MICRO_BATCH, "steps": STEPS, "lr": LR, "repeats": args.repeats,
             "stages": {v: STAGES[v] for v in args.variants},
             "deepspeed_config": {v: deepspeed_config(v, args.ep_size) for v in args.variants}}
    raw = {v: [{str(r): res for r, res in rep.items()} for rep in reps] for v, reps in runs.items()}
    payload = {"setup": setup, "environment": environment, **summary, "profiles": profiles, "runs": raw}
    if runs.get("M"):
        summary["expert_load"] = expert_load_overhead(runs["M"])
        print_expert_load_overhead(summary["expert_load"])
    if failures:
        print(f"FAILED launches: {', '.join(failures)}")
    goals = {name: entry for name, entry in summary["ratios"].items() if "ok" in entry}
    if "expert_load" in summary:
        overhead = summary["expert_load"]
        goals["step expert load metrics on/off"] = {"value": overhead["step_on_off"], "goal": overhead["goal"],
                                                    "ok": overhead["ok"], "op": "<="}
    return finish("train_ep_zero3", args, payload, goals, failures, started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                        help=f"default: {' '.join(DEFAULT_VARIANTS)}; "
                        + "; ".join(f"{v}: {label} (ZeRO-{STAGES[v]})" for v, label in VARIANTS.items()))
    parser.add_argument("--stages", nargs="+", type=int, choices=[1, 2, 3], default=None,
                        help="keep the variants at these ZeRO stages only (e.g. --stages 2 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every variant (0: --profile only)")
    parser.add_argument("--profile", action="store_true",
                        help="one more run of D, C, D2 and C2 (those selected) with torch.profiler on rank 0, "
                        "steps 5-6")
    parser.add_argument("--nproc", type=int, default=NPROC, help="ranks (torchrun, CPU): 2, or 4 on a 2-core host "
                        "for EP x data parallelism (oversubscribed: compare the ratios, not the times)")
    parser.add_argument("--ep-size", type=int, default=EP_SIZE,
                        help="expert-parallel size of the EP variants (D, D1, D2, M) and of AutoEP (C, C2)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per launch (hard)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/train_ep_zero3-<time>.json)")
    parser.add_argument("--strict", action="store_true", help="exit with status 2 when a goal is not met")
    parser.add_argument("--rank-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--metrics-parity", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stages and not args.rank_side:
        args.variants = [v for v in args.variants if STAGES[v] in args.stages]
        if not args.variants:
            parser.error(f"no variant at ZeRO stage(s) {args.stages}")
    return run(args, rank_main, driver)


if __name__ == "__main__":
    sys.exit(main())
