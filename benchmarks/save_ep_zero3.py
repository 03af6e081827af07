"""Save benchmark: `save_pretrained` of an expert-parallel model under DeepSpeed ZeRO-3, against a single-process save.

    make bench-save                              # or: .venv/bin/python benchmarks/save_ep_zero3.py [--runs 3]

The model is the one of the load benchmark (benchmarks/load_ep_zero3.py: Qwen3-MoE, 461 MB fp32, 16 experts, built
once under `.cache/bench/`). Cases, each through its real launcher under a hard timeout:

- `ep_zero3`: 2 CPU ranks, accelerate launch + docs/configs/accelerate_deepspeed_zero3.yaml,
  `DistributedConfig(ep_size=2)`, then `deepspeed.initialize` (SGD), then `save_pretrained` on every rank, as a
  training script saves: every dense parameter is gathered over ZeRO-3's partitions and every expert over the
  expert-parallel group, one at a time, and rank 0 writes the shards;
- `single`: one process, the model loaded without any parallelism, `save_pretrained` (the upstream save).

Both save with `--max-shard-size` (default 50GB as in `save_pretrained`: the whole model in one shard) into a
directory under `.cache/bench/` that the previous run left, as a training run overwrites its checkpoint. Per rank and
run: wall time of `save_pretrained` (barriers around it), and peak RSS over it (VmHWM reset right before) minus the RSS
before it. The ranks hold one gathered tensor at a time, whatever the shard size.

Printed: a table and the ratios. Goals, in units of the largest tensor gathered (one layer's fused experts; neither
bound grows with the model): the writing rank's peak RSS increase <= 3.5 (the gathered tensor, the gather's receive
buffer and the copies converted back to the checkpoint's layout), the other ranks' <= 1.5. Reported: the same over
the model's size, and EP + ZeRO-3 save time / single-process save time (the gathers are collectives; the single
process has everything local). JSON under benchmarks/results/ (git-ignored).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench_driver import finish, launch_cases, parse_args, run, start_rank  # noqa: E402  (beside this script)
from load_ep_zero3 import (  # noqa: E402
    CACHE,
    MB,
    MODEL,
    build_checkpoints,
    checkpoint_dir,
    release_free_memory,
    reset_peak_rss,
)
from proc_stats import proc_status_kb  # noqa: E402


SAVES = CACHE / "saves"
EP_SIZE = 2
# case -> (launcher, number of processes)
CASES = {"ep_zero3": ("accelerate", 2), "single": ("python", 1)}
# Peak RSS increase over a save, in units of the largest tensor gathered (see `summarize`)
GOAL_WRITER = 3.5
GOAL_OTHERS = 1.5


# ---------------------------------------------------------------------------------------------------------------------
# Rank side


def load_model(case: str, rank: int):
    import torch

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kwargs = {"dtype": torch.float32}
    if case == "ep_zero3":
        kwargs["distributed_config"] = DistributedConfig(ep_size=EP_SIZE)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(rank), **kwargs)
    if case != "ep_zero3":
        return model
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                                      config=config)
    return engine.module


def rank_main(args) -> dict:
    import torch.distributed as dist

    from tests.fork_utils.worker import rank

    distributed = args.case == "ep_zero3"
    keep_alive = start_rank(CASES[args.case][0])  # noqa: F841
    r = rank()
    model = load_model(args.case, r)
    target = SAVES / args.case
    if r == 0:
        shutil.rmtree(target, ignore_errors=True)

    def barrier():
        if distributed:
            dist.barrier()

    runs = []
    for _ in range(1 + args.runs):  # the first one is a warm-up (it also creates the directory)
        gc.collect()
        release_free_memory()
        barrier()
        reset_peak_rss()
        rss_before = proc_status_kb("VmRSS")
        start = time.perf_counter()
        model.save_pretrained(target, max_shard_size=args.max_shard_size, is_main_process=r == 0)
        seconds = time.perf_counter() - start
        peak = proc_status_kb("VmHWM")
        barrier()
        runs.append({
            "seconds": seconds,
            "seconds_barrier": time.perf_counter() - start,
            "rss_before_mb": rss_before * 1024 / MB,
            "peak_rss_delta_mb": (peak - rss_before) * 1024 / MB,
        })
    written = sum(f.stat().st_size for f in target.glob("*.safetensors")) if r == 0 else None
    barrier()
    return {"case": args.case, "rank": r, "runs": runs[1:], "written": written}


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def model_size_and_largest_tensor() -> tuple[int, int]:
    """Bytes of the full model and of its largest tensor as saved, from the checkpoint's headers."""
    import struct

    total, largest = 0, 0
    for path in checkpoint_dir(0).glob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key != "__metadata__":
                size = info["data_offsets"][1] - info["data_offsets"][0]
                total, largest = total + size, max(largest, size)
    return total, largest


def summarize(results: dict) -> dict:
    model_bytes, largest = model_size_and_largest_tensor()
    # The experts of one layer are saved per expert but gathered as the fused tensor of all of them.
    fused_experts = 2 * MODEL["num_experts"] * MODEL["hidden_size"] * MODEL["moe_intermediate_size"] * 4
    rows = []
    for case, ranks in results.items():
        for r, rep in sorted(ranks.items()):
            seconds = [run["seconds"] for run in rep["runs"]]
            rows.append({
                "case": case,
                "rank": r,
                "save_s": statistics.median(seconds),
                "save_s_range": [min(seconds), max(seconds)],
                "save_s_barrier": statistics.median(run["seconds_barrier"] for run in rep["runs"]),
                "rss_before_mb": statistics.median(run["rss_before_mb"] for run in rep["runs"]),
                "peak_rss_delta_mb": max(run["peak_rss_delta_mb"] for run in rep["runs"]),
                "written_mb": rep["written"] / MB if rep["written"] else None,
            })
    by = {(row["case"], row["rank"]): row for row in rows}
    goals = {}
    # One tensor at a time: the gathered tensor (at most one layer's fused experts), and on the writing rank also the
    # receive buffer of the expert-parallel gather and the copies converted back to the checkpoint's layout. Neither
    # bound grows with the model.
    largest_gathered = max(largest, fused_experts)
    if ("ep_zero3", 0) in by:
        writer = by["ep_zero3", 0]["peak_rss_delta_mb"] * MB
        goals["writer_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": writer / largest_gathered, "goal": GOAL_WRITER, "ok": writer <= GOAL_WRITER * largest_gathered,
            "over_model_size": writer / model_bytes,
        }
        others = max(by["ep_zero3", r]["peak_rss_delta_mb"] * MB for r in range(1, CASES["ep_zero3"][1]))
        goals["other_ranks_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": others / largest_gathered, "goal": GOAL_OTHERS, "ok": others <= GOAL_OTHERS * largest_gathered,
            "over_model_size": others / model_bytes,
        }
    if ("ep_zero3", 0) in by and ("single", 0) in by:
        goals["ep_zero3_save_time_over_single_process"] = {
            "value": by["ep_zero3", 0]["save_s_barrier"] / by["single", 0]["save_s"], "ok": True,
        }
    if ("single", 0) in by:
        goals["single_process_peak_rss_increase_over_model_size"] = {
            "value": by["single", 0]["peak_rss_delta_mb"] * MB / model_bytes, "ok": True,
        }
    return {"model_mb": model_bytes / MB, "largest_tensor_mb": largest / MB, "fused_experts_mb": fused_experts / MB,
            "rows": rows, "goals": goals}


def print_table(summary: dict) -> None:
    print(f"model {summary['model_mb']:.0f} MB, largest saved tensor {summary['largest_tensor_mb']:.1f} MB, "
          f"one layer's fused experts {summary['fused_experts_mb']:.1f} MB")
    print("| case | rank | save s (median [min-max]) | +barrier s | RSS before MB | peak RSS increase MB "
          "| written MB |")
    print("|---|---|---|---|---|---|---|")
    for row in summary["rows"]:
        written = f"{row['written_mb']:.0f}" if row["written_mb"] else "-"
        print(f"| {row['case']} | {row['rank']} | {row['save_s']:.2f} [{row['save_s_range'][0]:.2f}-"
              f"{row['save_s_range'][1]:.2f}] | {row['save_s_barrier']:.2f} | {row['rss_before_mb']:.0f} | "
              f"{row['peak_rss_delta_mb']:.0f} | {written} |")
    print()
    for name, goal in summary["goals"].items():
        limit = f" <= {goal['goal']:.2f}" if "goal" in goal else " (reported)"
        of_model = f" ({goal['over_model_size']:.2f} of the model's size)" if "over_model_size" in goal else ""
        print(f"{'PASS' if goal['ok'] else 'FAIL'} {name}{limit}: {goal['value']:.2f}{of_model}")


def driver(args) -> int:
    build_checkpoints()
    started = time.monotonic()
    results, failures = launch_cases(
        Path(__file__), args, lambda case: (*CASES[case], None),
        ["--runs", str(args.runs), "--max-shard-size", args.max_shard_size],
    )
    shutil.rmtree(SAVES, ignore_errors=True)
    if not results:
        return 1
    summary = summarize(results)
    print()
    print_table(summary)
    payload = {"model": MODEL, "max_shard_size": args.max_shard_size, "cpus": os.cpu_count(), **summary}
    return finish("save_ep_zero3", args, payload, summary["goals"], failures, started)


def main() -> int:
    def add_arguments(parser):
        parser.add_argument("--max-shard-size", default="50GB")

    args = parse_args(
        __doc__, "save_ep_zero3", list(CASES), "saves measured after the warm-up save", 300, add_arguments
    )
    return run(args, rank_main, driver)


if __name__ == "__main__":
    sys.exit(main())
