"""Save benchmark: EP + ZeRO-3 saves (every rank writing, one writer, accelerate's `get_state_dict`) vs one process,
on 2 and 4 ranks, with experts saved one tensor per expert and fused.

    make bench-save                              # or: .venv/bin/python benchmarks/save_ep_zero3.py [--runs 3]
    .venv/bin/python benchmarks/save_ep_zero3.py --layout per-expert --nproc 2   # the 2-rank Qwen3-MoE part alone
    .venv/bin/python benchmarks/save_ep_zero3.py --layers 8 2 --runs 1    # two model sizes in one go

Two models of 461 MB fp32 (8 layers, hidden 512, 16 experts of intermediate size 512, top-2, vocab 8000), one per
checkpoint layout (`--layout`, default both):

- `per-expert` (Mixtral-style): the load benchmark's Qwen3-MoE (benchmarks/load_ep_zero3.py), each expert's projections
  saved as tensors of their own (`mlp.experts.3.gate_proj.weight`), which the save converts back to from the fused
  tensors the model holds;
- `fused` (gpt-oss-style): a GptOssForCausalLM of the same dimensions, whose experts are saved as the model holds them,
  one tensor per layer spanning every rank's experts (`mlp.experts.gate_up_proj` [16, 512, 1024]).

Each with `--layers N` layers (e.g. 2: 140 MB; several values run one size after the other), built once under
`.cache/bench/` (the load is not measured here: ranks beyond the copies built share them). Cases, each through its real
launcher under a hard timeout, the distributed ones on each number of ranks of `--nproc` (default 2 and 4: with EP 2,
4 ranks are 2 expert-parallel groups of 2, each expert partitioned by ZeRO-3 over the 2 ranks holding it):

- `ep_zero3`: CPU ranks, accelerate launch + docs/configs/accelerate_deepspeed_zero3.yaml,
  `DistributedConfig(ep_size=2)`, then `deepspeed.initialize` (SGD), then `save_pretrained` on every rank, as a
  training script saves: every rank writes its part of each shard (`write_planned_checkpoint_in_parallel`): the
  elements it holds of the tensors whose keys are ranges of them (dense tensors, fused experts) in place, and the
  experts it holds that are saved per expert (gathered over their ZeRO-3 partitions only);
- `ep_zero3_single_writer`: the same with the parallel write off (`PARALLEL_WRITE = False`), the save before it:
  every dense parameter is gathered over ZeRO-3's partitions and every expert over the expert-parallel group, one at
  a time, and rank 0 writes each tensor as soon as it has it (streamed);
- `ep_zero3_state_dict`: the same launch, then accelerate's documented ZeRO-3 save (what
  `accelerator.get_state_dict(model)` calls): `state_dict = engine._zero3_consolidated_16bit_state_dict()` (the
  whole model on rank 0, `None` elsewhere), then `save_pretrained(dir, state_dict=state_dict, is_main_process=rank
  == 0)` on every rank (rank 0 writes, the others return), then `del state_dict`. As upstream's ZeRO-3 16-bit save,
  rank 0 holds the whole model: there is no goal on its memory, only the figures. On 2 ranks only unless
  `--state-dict-nproc 2 4` (rank 0 holds the whole model whatever the number of ranks);
- `single`: one process, the model loaded without any parallelism, `save_pretrained` (the upstream save); once per
  layout and size, the reference of every number of ranks.

All save with `--max-shard-size` (default 50GB as in `save_pretrained`: the whole model in one shard) into a
directory under `.cache/bench/saves/` that the previous run left, as a training run overwrites its checkpoint. Per
rank and run: wall time of the save (for `ep_zero3_state_dict` the consolidation and `save_pretrained`, the
consolidation's share beside it; barriers around it), peak RSS over it (VmHWM reset right before) minus the RSS before
it, and the bytes of tensor data the rank wrote.

Printed, per layout, number of ranks and model size (the 2-rank per-expert block as before the other layouts and
ranks): a table per rank, then the writing rank's (rank 0's) peak RSS increase for the streamed save and for the
state-dict save, in MB, over the model's size and over the largest tensor gathered (one layer's fused gate and up
projections of every expert), and the ratio state-dict save / streamed save (the streamed one floored at 1 MB: in
place, it can be about 0); then the goals and ratios. Goals, in units of the largest tensor gathered (neither bound
grows with the model): a writing rank's peak RSS increase <= 3.5 (the gathered tensor, the gather's receive buffer and
the copies converted back to the checkpoint's layout): every rank's in `ep_zero3`, rank 0's in
`ep_zero3_single_writer`, whose other ranks' <= 1.5; in `ep_zero3` each rank wrote its share of the bytes (within 10 %
of the model's size over the ranks, plus one largest saved tensor); on 2 ranks with experts saved per expert the save
takes at most one process's time (issue 25; reported on 4 ranks, which share the 2 cores of the CPU machine this was
written on, and for fused experts, which one process saves as it holds them, without a conversion); each distributed
save's checkpoint has the one process's tensors, key by key and byte for byte (the weights are those loaded: no step is
taken). Reported: the same over the model's size, the state-dict save's figures, and the other saves' time /
single-process save time (the gathers are collectives; the single process has everything local). Then, with several
layouts or numbers of ranks, two tables put each number of ranks side by side: the save time and its ratio to one
process's, then the bytes each rank wrote against its share and the writers' peak RSS increase; with several sizes, one
more puts the 2-rank per-expert writing rank's figures of every size side by side. JSON under benchmarks/results/
(git-ignored): the 2-rank per-expert summaries under "sizes" as before, every layout and number of ranks under "runs",
the goals under "goals" (named as before for the 2-rank per-expert save, prefixed with the layout, number of ranks and
size otherwise, e.g. `fused/4_ranks/...`).

Run time, default (both layouts, 2 and 4 ranks, 3 runs each): about 4-5 min on a quiet 2-core CPU machine, 6 min
measured with another multi-process job beside it (the first run also builds the gpt-oss checkpoint, a few seconds);
`--layout per-expert --nproc 2` about 1 min.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench_checkpoints import build_per_rank_checkpoints, per_rank_checkpoint  # noqa: E402  (beside this script)
from bench_driver import finish, launch_cases, parse_args, run, start_rank  # noqa: E402
from load_ep_zero3 import (  # noqa: E402
    CACHE,
    MB,
    MODEL,
    NPROC,
    build_checkpoints,
    checkpoint_dir,
    model_with_layers,
    release_free_memory,
    reset_peak_rss,
)
from proc_stats import proc_status_kb  # noqa: E402


SAVES = CACHE / "saves"
EP_SIZE = 2
# case -> launcher; the distributed cases run on each of `--nproc` ranks, `single` on one process
CASES = {
    "ep_zero3": "accelerate",
    "ep_zero3_single_writer": "accelerate",
    "ep_zero3_state_dict": "accelerate",
    "single": "python",
}
DISTRIBUTED = ("ep_zero3", "ep_zero3_single_writer", "ep_zero3_state_dict")
NPROCS = (2, 4)
# The state-dict save puts the whole model on rank 0 whatever the number of ranks: by default measured on 2 only
STATE_DICT_NPROCS = (2,)
# The checkpoint layouts: experts saved one tensor per expert (Mixtral, Qwen3-MoE) or fused as the model holds them
LAYOUTS = ("per-expert", "fused")
# The fused layout's model: a gpt-oss of the per-expert model's dimensions (461 MB fp32 as well)
FUSED_MODEL = {
    "num_hidden_layers": MODEL["num_hidden_layers"],
    "hidden_size": MODEL["hidden_size"],
    "intermediate_size": MODEL["moe_intermediate_size"],
    "num_attention_heads": MODEL["num_attention_heads"],
    "num_key_value_heads": MODEL["num_key_value_heads"],
    "head_dim": MODEL["head_dim"],
    "num_local_experts": MODEL["num_experts"],
    "num_experts_per_tok": MODEL["num_experts_per_tok"],
    "vocab_size": MODEL["vocab_size"],
    "max_position_embeddings": MODEL["max_position_embeddings"],
    "tie_word_embeddings": False,
}
# The save benchmark does not measure the load: one copy of the fused checkpoint, read by every rank
FUSED_COPIES = 1
# Peak RSS increase over a save, in units of the largest tensor gathered (see `summarize`)
GOAL_WRITER = 3.5
GOAL_OTHERS = 1.5
# The state-dict save's writer increase is compared with the streamed one's floored at this (see `summarize`)
STREAMED_INCREASE_FLOOR_MB = 1.0
# Issue 25: the save where every rank writes takes at most the time of one process saving the same model, on 2 ranks
# with experts saved per expert (Mixtral's layout); reported for the others: 4 ranks share the 2 cores of the CPU
# machine this was written on, and one process saves fused experts as it holds them, without any conversion
GOAL_SAVE_TIME_OVER_SINGLE_PROCESS = 1.0
GOAL_SAVE_TIME_NPROC = 2
GOAL_SAVE_TIME_LAYOUT = "per-expert"
# Bytes written per rank: within 10 % of the model's size over the ranks, plus one largest saved tensor
GOAL_BYTES_SHARE_TOLERANCE = 0.1


# ---------------------------------------------------------------------------------------------------------------------
# The models and their checkpoints


def model_config(layout: str, layers: int) -> dict:
    if layout == "per-expert":
        return model_with_layers(layers)
    return {**FUSED_MODEL, "num_hidden_layers": layers}


def fused_checkpoint_base(model: dict) -> Path:
    return CACHE / (f"gptoss-l{model['num_hidden_layers']}-h{model['hidden_size']}-e{model['num_local_experts']}"
                    f"-v{model['vocab_size']}-fp32-150MB")


def build_layout_checkpoints(layout: str, model: dict) -> None:
    if layout == "per-expert":
        build_checkpoints(model)
        return

    def make_model():
        import torch

        from transformers import GptOssConfig, GptOssForCausalLM

        return GptOssForCausalLM(GptOssConfig(**model)).to(torch.float32)

    build_per_rank_checkpoints(fused_checkpoint_base(model), FUSED_COPIES, make_model)


def layout_checkpoint_dir(layout: str, rank: int, model: dict) -> Path:
    """The copy rank `rank` loads: ranks beyond the copies built share them (the load is not measured here)."""
    if layout == "per-expert":
        return checkpoint_dir(rank % NPROC, model)
    return per_rank_checkpoint(fused_checkpoint_base(model), rank % FUSED_COPIES)


def largest_gathered_experts(layout: str, model: dict) -> int:
    """Bytes of one layer's fused gate and up projections of every expert, fp32: what the save gathers of the
    per-expert layout before it splits it per expert, and the largest tensor the fused layout saves."""
    if layout == "per-expert":
        return 2 * model["num_experts"] * model["hidden_size"] * model["moe_intermediate_size"] * 4
    return 2 * model["num_local_experts"] * model["hidden_size"] * model["intermediate_size"] * 4


def save_directory(layout: str, layers: int, case: str, nproc: int) -> Path:
    run_name = case if case not in DISTRIBUTED else f"{case}-{nproc}ranks"
    return SAVES / f"{layout}-l{layers}" / run_name


# ---------------------------------------------------------------------------------------------------------------------
# Rank side


def load_model(case: str, rank: int, layout: str, model: dict):
    """(model, DeepSpeed engine or None)."""
    import torch

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kwargs = {"dtype": torch.float32}
    if case in DISTRIBUTED:
        kwargs["distributed_config"] = DistributedConfig(ep_size=EP_SIZE)
    model = AutoModelForCausalLM.from_pretrained(layout_checkpoint_dir(layout, rank, model), **kwargs)
    if case not in DISTRIBUTED:
        return model, None
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                                      config=config)
    return engine.module, engine


def rank_main(args) -> dict:
    import torch.distributed as dist

    from tests.fork_utils.worker import rank
    from transformers.integrations import deepspeed_expert_parallel_save as ep_save

    distributed = args.case in DISTRIBUTED
    ep_save.PARALLEL_WRITE = args.case != "ep_zero3_single_writer"
    keep_alive = start_rank(CASES[args.case])  # noqa: F841
    r = rank()
    # One layout, size and number of ranks per launch
    (layout,), (layers,), (nproc,) = args.layout, args.layers, args.nproc
    model, engine = load_model(args.case, r, layout, model_config(layout, layers))
    target = save_directory(layout, layers, args.case, nproc)
    if r == 0:
        shutil.rmtree(target, ignore_errors=True)

    def barrier():
        if distributed:
            dist.barrier()

    runs = []
    for _ in range(1 + args.runs):  # the first one is a warm-up (it also creates the directory)
        gc.collect()
        release_free_memory()
        # Every save starts with the disk idle: the previous save's dirty pages written out (the parallel save starts
        # its writeback as it writes, the others leave theirs to the kernel: without this, the next case would pay)
        os.sync()
        barrier()
        reset_peak_rss()
        rss_before = proc_status_kb("VmRSS")
        start = time.perf_counter()
        gather_seconds = None
        if args.case == "ep_zero3_state_dict":
            # accelerate's ZeRO-3 save: `accelerator.get_state_dict(model)` is this call (the whole model on rank 0,
            # None elsewhere), then save_pretrained with it on every rank
            state_dict = engine._zero3_consolidated_16bit_state_dict()
            gather_seconds = time.perf_counter() - start
            model.save_pretrained(target, state_dict=state_dict, max_shard_size=args.max_shard_size,
                                  is_main_process=r == 0)
        else:
            model.save_pretrained(target, max_shard_size=args.max_shard_size, is_main_process=r == 0)
        seconds = time.perf_counter() - start
        peak = proc_status_kb("VmHWM")
        if args.case == "ep_zero3_state_dict":
            del state_dict
        barrier()
        runs.append({
            "seconds": seconds,
            "gather_seconds": gather_seconds,
            "seconds_barrier": time.perf_counter() - start,
            "rss_before_mb": rss_before * 1024 / MB,
            "peak_rss_delta_mb": (peak - rss_before) * 1024 / MB,
            "bytes_written": ep_save.last_save_bytes_written if distributed else None,
        })
    written = sum(f.stat().st_size for f in target.glob("*.safetensors")) if r == 0 else None
    barrier()
    return {"case": args.case, "rank": r, "layout": layout, "layers": layers, "runs": runs[1:], "written": written}


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensors of a safetensors file's header (key -> dtype, shape, data offsets) and where their data starts."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def checkpoint_tensors(directory: Path) -> dict:
    """key -> (file, dtype, shape, first byte, end byte) of every tensor of the checkpoint in `directory`."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        header, data_start = safetensors_header(path)
        for key, info in header.items():
            start, end = info["data_offsets"]
            tensors[key] = (path, info["dtype"], info["shape"], data_start + start, data_start + end)
    return tensors


def model_size_and_largest_tensor(directory: Path) -> tuple[int, int]:
    """Bytes of the full model and of its largest tensor as saved, from the checkpoint's headers."""
    sizes = [end - start for *_, start, end in checkpoint_tensors(directory).values()]
    return sum(sizes), max(sizes)


def differing_tensors(directory: Path, reference: Path) -> tuple[list[str], int]:
    """The keys whose dtype, shape or bytes differ between two checkpoints (or that only one has), and the number of
    keys of `reference`. Shards may be cut differently: tensors are compared by key, their bytes read in place."""
    ours, theirs = checkpoint_tensors(directory), checkpoint_tensors(reference)
    differing = sorted(set(ours) ^ set(theirs))
    mapped = {}

    def data(path: Path, start: int, end: int):
        if path not in mapped:
            with open(path, "rb") as f:
                mapped[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mapped[path][start:end]

    try:
        for key in sorted(set(ours) & set(theirs)):
            path, dtype, shape, start, end = ours[key]
            ref_path, ref_dtype, ref_shape, ref_start, ref_end = theirs[key]
            same_bytes = data(path, start, end) == data(ref_path, ref_start, ref_end)
            if (dtype, shape) != (ref_dtype, ref_shape) or not same_bytes:
                differing.append(key)
    finally:
        for view in mapped.values():
            view.close()
    return differing, len(theirs)


def checkpoint_checks(results: dict, layout: str, layers: int, nproc: int) -> dict:
    """Each distributed save's checkpoint against the one process's (the same weights: no training step between the
    load and the saves), tensor by tensor, as goals: no tensor may differ."""
    goals = {}
    if "single" not in results:
        return goals
    reference = save_directory(layout, layers, "single", 1)
    for case in DISTRIBUTED:
        if case in results:
            differing, count = differing_tensors(save_directory(layout, layers, case, nproc), reference)
            note = f"of {count} tensors" + (f"; first: {', '.join(differing[:3])}" if differing else "")
            goals[f"{case}_checkpoint_tensors_differing_from_single_process"] = {
                "value": len(differing), "goal": 0, "ok": not differing and count > 0, "note": note,
            }
    return goals


def writing_ranks(case: str, nproc: int) -> range:
    """The ranks that write in a save: every rank in `ep_zero3`, rank 0 in the others."""
    return range(nproc) if case == "ep_zero3" else range(1)


def case_figures(by: dict, case: str, nproc: int, model_bytes: int, largest: int, largest_gathered: int,
                 single_s: float | None) -> dict:
    """One distributed save's figures for the tables side by side (`print_rank_counts`)."""
    writers = writing_ranks(case, nproc)
    others = [r for r in range(nproc) if r not in writers]
    written = [by[case, r]["written_by_rank_mb"] * MB for r in range(nproc)]
    share = model_bytes / nproc
    allowance = GOAL_BYTES_SHARE_TOLERANCE * share + largest
    writers_peak = max(by[case, r]["peak_rss_delta_mb"] * MB for r in writers)
    save_s = by[case, 0]["save_s_barrier"]
    return {
        "save_s": save_s,
        "over_single_process": save_s / single_s if single_s else None,
        "written_by_rank_mb": [value / MB for value in written],
        "share_mb": share / MB,
        # Only the save where every rank writes is meant to split the bytes
        "off_share_over_allowance": max(abs(value - share) for value in written) / allowance
        if case == "ep_zero3" else None,
        "writers_peak_rss_increase_mb": writers_peak / MB,
        "writers_over_largest_gathered_tensor": writers_peak / largest_gathered,
        "others_peak_rss_increase_mb": max((by[case, r]["peak_rss_delta_mb"] for r in others), default=None),
    }


def summarize(results: dict, layout: str, model: dict, nproc: int) -> dict:
    model_bytes, largest = model_size_and_largest_tensor(layout_checkpoint_dir(layout, 0, model))
    # The experts of one layer are gathered as the fused tensor of all of them (per-expert layout: then split per
    # expert), or saved as it (fused layout).
    fused_experts = largest_gathered_experts(layout, model)
    rows = []
    for case, ranks in results.items():
        for r, rep in sorted(ranks.items()):
            seconds = [run["seconds"] for run in rep["runs"]]
            gather = [run["gather_seconds"] for run in rep["runs"] if run.get("gather_seconds") is not None]
            rows.append({
                "case": case,
                "rank": r,
                "save_s": statistics.median(seconds),
                "save_s_range": [min(seconds), max(seconds)],
                "gather_s": statistics.median(gather) if gather else None,
                "save_s_barrier": statistics.median(run["seconds_barrier"] for run in rep["runs"]),
                "rss_before_mb": statistics.median(run["rss_before_mb"] for run in rep["runs"]),
                "peak_rss_delta_mb": max(run["peak_rss_delta_mb"] for run in rep["runs"]),
                "written_mb": rep["written"] / MB if rep["written"] else None,
                "written_by_rank_mb": (rep["runs"][-1].get("bytes_written") or 0) / MB
                if case in DISTRIBUTED else None,
            })
    by = {(row["case"], row["rank"]): row for row in rows}
    goals = {}
    # One tensor at a time: the gathered tensor (at most one layer's fused experts), and on the writing rank also the
    # receive buffer of the expert-parallel gather and the copies converted back to the checkpoint's layout. Neither
    # bound grows with the model.
    largest_gathered = max(largest, fused_experts)
    # The writing rank's peak RSS increase per distributed save, for the comparison printed per size
    writer = {}
    for case in DISTRIBUTED:
        if (case, 0) in by:
            delta = by[case, 0]["peak_rss_delta_mb"] * MB
            writer[case] = {"mb": delta / MB, "over_model_size": delta / model_bytes,
                            "over_largest_gathered_tensor": delta / largest_gathered}
    if ("ep_zero3", 0) in by:
        # Every rank writes: each within the writer's bound, and each writes its share of the bytes
        ranks = range(nproc)
        value = max(by["ep_zero3", r]["peak_rss_delta_mb"] * MB for r in ranks)
        goals["every_writer_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": value / largest_gathered, "goal": GOAL_WRITER, "ok": value <= GOAL_WRITER * largest_gathered,
            "over_model_size": value / model_bytes,
        }
        share = model_bytes / nproc
        allowance = GOAL_BYTES_SHARE_TOLERANCE * share + largest
        off = max(abs(by["ep_zero3", r]["written_by_rank_mb"] * MB - share) for r in ranks)
        goals["bytes_written_per_rank_off_the_share_over_share_plus_largest_tensor"] = {
            "value": off / allowance, "goal": 1.0, "ok": off <= allowance,
        }
    if ("ep_zero3_single_writer", 0) in by:
        value = by["ep_zero3_single_writer", 0]["peak_rss_delta_mb"] * MB
        goals["single_writer_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": value / largest_gathered, "goal": GOAL_WRITER, "ok": value <= GOAL_WRITER * largest_gathered,
            "over_model_size": value / model_bytes,
        }
        others = max(by["ep_zero3_single_writer", r]["peak_rss_delta_mb"] * MB for r in range(1, nproc))
        goals["single_writer_other_ranks_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": others / largest_gathered, "goal": GOAL_OTHERS, "ok": others <= GOAL_OTHERS * largest_gathered,
            "over_model_size": others / model_bytes,
        }
    if ("ep_zero3_state_dict", 0) in by:
        # No goal: rank 0 holds the whole model by design, as upstream's ZeRO-3 16-bit save
        value = writer["ep_zero3_state_dict"]["mb"] * MB
        goals["state_dict_writer_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": value / largest_gathered, "ok": True, "over_model_size": value / model_bytes,
        }
        others = max(by["ep_zero3_state_dict", r]["peak_rss_delta_mb"] * MB for r in range(1, nproc))
        goals["state_dict_other_ranks_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": others / largest_gathered, "ok": True, "over_model_size": others / model_bytes,
        }
    state_dict_over_streamed = None
    if "ep_zero3" in writer and "ep_zero3_state_dict" in writer:
        # Floored at 1 MB: where every rank writes what it holds in place (the fused layout), the streamed save's
        # increase is about 0 and the ratio would say nothing but the noise of the reading
        streamed_mb = max(writer["ep_zero3"]["mb"], STREAMED_INCREASE_FLOOR_MB)
        state_dict_over_streamed = writer["ep_zero3_state_dict"]["mb"] / streamed_mb
        goals["state_dict_over_streamed_writer_peak_rss_increase"] = {
            "value": state_dict_over_streamed, "ok": True,
            **({"note": f"streamed increase floored at {STREAMED_INCREASE_FLOOR_MB:.0f} MB"}
               if writer["ep_zero3"]["mb"] < STREAMED_INCREASE_FLOOR_MB else {}),
        }
    single_s = by["single", 0]["save_s"] if ("single", 0) in by else None
    for case in DISTRIBUTED:
        if (case, 0) in by and single_s is not None:
            value = by[case, 0]["save_s_barrier"] / single_s
            goals[f"{case}_save_time_over_single_process"] = {"value": value, "ok": True}
            if case == "ep_zero3" and nproc == GOAL_SAVE_TIME_NPROC and layout == GOAL_SAVE_TIME_LAYOUT:
                goals[f"{case}_save_time_over_single_process"].update(
                    goal=GOAL_SAVE_TIME_OVER_SINGLE_PROCESS, ok=value <= GOAL_SAVE_TIME_OVER_SINGLE_PROCESS
                )
    if single_s is not None:
        goals["single_process_peak_rss_increase_over_model_size"] = {
            "value": by["single", 0]["peak_rss_delta_mb"] * MB / model_bytes, "ok": True,
        }
    cases = {
        case: case_figures(by, case, nproc, model_bytes, largest, largest_gathered, single_s)
        for case in DISTRIBUTED if case in results
    }
    return {"layout": layout, "nproc": nproc, "layers": model["num_hidden_layers"], "model_mb": model_bytes / MB,
            "largest_tensor_mb": largest / MB, "fused_experts_mb": fused_experts / MB,
            "largest_gathered_tensor_mb": largest_gathered / MB, "single_process_save_s": single_s,
            "rows": rows, "writer_peak_rss_increase": writer, "state_dict_over_streamed": state_dict_over_streamed,
            "cases": cases, "goals": goals}


WRITER_LABELS = {
    "ep_zero3": "ep_zero3 (save_pretrained, every rank writing)",
    "ep_zero3_single_writer": "ep_zero3_single_writer (streamed save_pretrained, rank 0 writing)",
    "ep_zero3_state_dict": "ep_zero3_state_dict (get_state_dict, then save_pretrained)",
}


def print_goals(goals: dict) -> None:
    for name, goal in goals.items():
        limit = f" <= {goal['goal']:.2f}" if "goal" in goal else " (reported)"
        value = f"{goal['value']:.2f}" if isinstance(goal["value"], float) else str(goal["value"])
        notes = [f"{goal['over_model_size']:.2f} of the model's size"] if "over_model_size" in goal else []
        notes += [goal["note"]] if "note" in goal else []
        note = f" ({'; '.join(notes)})" if notes else ""
        print(f"{'PASS' if goal['ok'] else 'FAIL'} {name}{limit}: {value}{note}")


def print_table(summary: dict) -> None:
    print(f"{summary['layers']} layers: model {summary['model_mb']:.0f} MB, largest saved tensor "
          f"{summary['largest_tensor_mb']:.1f} MB, one layer's fused experts {summary['fused_experts_mb']:.1f} MB")
    print("| case | rank | save s (median [min-max]) | of which get_state_dict s | +barrier s | RSS before MB "
          "| peak RSS increase MB | written MB | MB written by the rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in summary["rows"]:
        written = f"{row['written_mb']:.0f}" if row["written_mb"] else "-"
        by_rank = f"{row['written_by_rank_mb']:.0f}" if row["written_by_rank_mb"] is not None else "-"
        gather = f"{row['gather_s']:.2f}" if row["gather_s"] is not None else "-"
        print(f"| {row['case']} | {row['rank']} | {row['save_s']:.2f} [{row['save_s_range'][0]:.2f}-"
              f"{row['save_s_range'][1]:.2f}] | {gather} | {row['save_s_barrier']:.2f} | {row['rss_before_mb']:.0f} | "
              f"{row['peak_rss_delta_mb']:.0f} | {written} | {by_rank} |")
    writer = summary["writer_peak_rss_increase"]
    if writer:
        print()
        print(f"Writing rank (0), peak RSS increase over the save, {summary['layers']} layers "
              f"(model {summary['model_mb']:.0f} MB, largest gathered tensor "
              f"{summary['largest_gathered_tensor_mb']:.1f} MB):")
        print("| save | MB | / model size | / largest gathered tensor |")
        print("|---|---|---|---|")
        for case, fig in writer.items():
            print(f"| {WRITER_LABELS[case]} | {fig['mb']:.0f} | {fig['over_model_size']:.2f} | "
                  f"{fig['over_largest_gathered_tensor']:.2f} |")
        if summary["state_dict_over_streamed"] is not None:
            print(f"state_dict / streamed: {summary['state_dict_over_streamed']:.2f}")
    print()
    print_goals(summary["goals"])


def print_sizes(summaries: list[dict]) -> None:
    """The writing rank's figures of every size side by side."""
    print("Writing rank (0), peak RSS increase over the save, per model size:")
    print("| layers | model MB | largest gathered tensor MB | save | MB | / model size | / largest gathered tensor "
          "| state_dict / streamed |")
    print("|---|---|---|---|---|---|---|---|")
    for summary in summaries:
        writer = summary["writer_peak_rss_increase"]
        ratio = summary["state_dict_over_streamed"]
        ratio = f"{ratio:.2f}" if ratio is not None else "-"
        for case, fig in writer.items():
            print(f"| {summary['layers']} | {summary['model_mb']:.0f} | {summary['largest_gathered_tensor_mb']:.1f} | "
                  f"{case} | {fig['mb']:.0f} | {fig['over_model_size']:.2f} | "
                  f"{fig['over_largest_gathered_tensor']:.2f} | {ratio} |")


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def print_rank_counts(summaries: list[dict]) -> None:
    """Per layout and size, each distributed save on every number of ranks side by side: its time over one process's,
    then the bytes each rank wrote and the writers' peak memory."""
    nprocs = sorted({summary["nproc"] for summary in summaries})
    groups = {}
    for summary in summaries:
        groups.setdefault((summary["layout"], summary["layers"]), {})[summary["nproc"]] = summary
    print("Save time over one process's, per number of ranks (rank 0's save and the barrier after it; one process: "
          "its save):")
    print("| layout | layers | case | one process s |" + "".join(f" {n} ranks s | / one process |" for n in nprocs))
    print("|---" * (4 + 2 * len(nprocs)) + "|")
    for (layout, layers), by_nproc in groups.items():
        single_s = next((s["single_process_save_s"] for s in by_nproc.values() if s["single_process_save_s"]), None)
        for case in DISTRIBUTED:
            cells = []
            for n in nprocs:
                fig = by_nproc[n]["cases"].get(case) if n in by_nproc else None
                cells += [f"{fig['save_s']:.2f}", _ratio(fig["over_single_process"])] if fig else ["-", "-"]
            if any(cell != "-" for cell in cells):
                print(f"| {layout} | {layers} | {case} | {_ratio(single_s)} | " + " | ".join(cells) + " |")
    print()
    print("Bytes written and peak RSS increase per rank, per number of ranks (off share: the largest distance of a "
          "rank's bytes from the model's size / ranks, over 10 % of it plus the largest saved tensor; writers: every "
          "rank in ep_zero3, rank 0 in the others):")
    print("| layout | layers | case | ranks | MB written per rank | share MB | off share / allowance | writers' peak "
          "RSS increase MB (max) | / largest gathered tensor | other ranks' MB (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (layout, layers), by_nproc in groups.items():
        for case in DISTRIBUTED:
            for n, summary in sorted(by_nproc.items()):
                fig = summary["cases"].get(case)
                if fig is None:
                    continue
                written = " / ".join(f"{value:.0f}" for value in fig["written_by_rank_mb"])
                others = fig["others_peak_rss_increase_mb"]
                print(f"| {layout} | {layers} | {case} | {n} | {written} | {fig['share_mb']:.0f} | "
                      f"{_ratio(fig['off_share_over_allowance'])} | {fig['writers_peak_rss_increase_mb']:.0f} | "
                      f"{fig['writers_over_largest_gathered_tensor']:.2f} | "
                      f"{f'{others:.0f}' if others is not None else '-'} |")


def cases_on(args: argparse.Namespace, nproc: int, single_measured: bool) -> list[str]:
    """The cases launched on `nproc` ranks: the distributed ones asked for (the state-dict save on
    `--state-dict-nproc` only), then the single process once per layout and size."""
    cases = [
        case for case in args.cases
        if case in DISTRIBUTED and (case != "ep_zero3_state_dict" or nproc in args.state_dict_nproc)
    ]
    if "single" in args.cases and not single_measured:
        cases.append("single")
    return cases


def launch_options(nproc: int):
    """`launch_cases`'s options: each case's launcher, `nproc` processes (one for the single process), no env."""
    return lambda case: (CASES[case], nproc if case in DISTRIBUTED else 1, None)


def run_label(args: argparse.Namespace, layout: str, nproc: int, layers: int) -> str:
    """What tells one layout, number of ranks and size from the others, in goal names (`per-expert`, 2 ranks and one
    size: none, the names as they were before the other layouts and rank counts)."""
    parts = [layout] if layout != "per-expert" else []
    parts += [f"{nproc}_ranks"] if nproc != 2 else []
    parts += [f"{layers}_layers"] if len(args.layers) > 1 else []
    return "".join(part + "/" for part in parts)


def measure(args: argparse.Namespace, layout: str, layers: int) -> tuple[list[dict], list[str]]:
    """Every number of ranks of `--nproc` for one layout and size: launches, summaries printed as they come."""
    model = model_config(layout, layers)
    build_layout_checkpoints(layout, model)
    summaries, failures, single = [], [], None
    try:
        for nproc in args.nproc:
            cases = cases_on(args, nproc, single is not None)
            if not cases:
                continue
            print(f"=== {layout} layout, {nproc} ranks, {layers} layers", flush=True)
            cased = argparse.Namespace(**{**vars(args), "cases": cases})
            results, failed = launch_cases(
                Path(__file__), cased, launch_options(nproc),
                ["--runs", str(args.runs), "--max-shard-size", args.max_shard_size, "--layers", str(layers),
                 "--layout", layout, "--nproc", str(nproc)],
            )
            failures += [f"{case} ({layout}, {nproc} ranks, {layers} layers)" for case in failed]
            # One process does not depend on the number of ranks: measured once, compared with each
            single = results.pop("single", single)
            if single is not None:
                results["single"] = single
            if not results:
                continue
            summary = summarize(results, layout, model, nproc)
            summary["goals"].update(checkpoint_checks(results, layout, layers, nproc))
            print()
            print_table(summary)
            print()
            summaries.append({"model": model, **summary})
    finally:
        shutil.rmtree(SAVES / f"{layout}-l{layers}", ignore_errors=True)
    return summaries, failures


def driver(args) -> int:
    started = time.monotonic()
    summaries, goals, failures = [], {}, []
    for layout in args.layout:
        for layers in args.layers:
            measured, failed = measure(args, layout, layers)
            summaries += measured
            failures += failed
    if not summaries:
        return 1
    for summary in summaries:
        label = run_label(args, summary["layout"], summary["nproc"], summary["layers"])
        goals.update({label + name: goal for name, goal in summary["goals"].items()})
    # The 2-rank per-expert figures stay where they were ("sizes"); every layout and number of ranks under "runs"
    default = [summary for summary in summaries if summary["layout"] == "per-expert" and summary["nproc"] == 2]
    if len(default) > 1:
        print_sizes(default)
        print()
    if len(summaries) > 1:
        print_rank_counts(summaries)
    payload = {"max_shard_size": args.max_shard_size, "cpus": os.cpu_count(), "sizes": default, "runs": summaries,
               "goals": goals}
    return finish("save_ep_zero3", args, payload, goals, failures, started)


def main() -> int:
    def add_arguments(parser):
        parser.add_argument("--max-shard-size", default="50GB")
        parser.add_argument("--layers", type=int, nargs="+", default=[MODEL["num_hidden_layers"]],
                            help="the model's number of layers; several values: one size after the other "
                                 f"(default {MODEL['num_hidden_layers']}: 461 MB; 2: 140 MB)")
        parser.add_argument("--layout", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                            help="checkpoint layouts: per-expert (Qwen3-MoE), fused (gpt-oss); default both")
        parser.add_argument("--nproc", type=int, nargs="+", default=list(NPROCS),
                            help=f"numbers of ranks, EP {EP_SIZE} (default: 2 4)")
        parser.add_argument("--state-dict-nproc", type=int, nargs="*", default=list(STATE_DICT_NPROCS),
                            help="numbers of ranks the ep_zero3_state_dict case runs on (default: 2)")

    args = parse_args(
        __doc__, "save_ep_zero3", list(CASES), "saves measured after the warm-up save", 300, add_arguments
    )
    return run(args, rank_main, driver)


if __name__ == "__main__":
    sys.exit(main())
