"""Load benchmark: dense model under DeepSpeed ZeRO-3, shard-on-read (patch 0014) against upstream's ZeRO-3 path and a
load without DeepSpeed.

    make bench-load-dense                          # or: .venv/bin/python benchmarks/load_zero3_dense.py [--runs 3]
    make bench-load-dense BENCH_ARGS="--size large"  # the same at 2.0 GB (hidden 2048, 11 layers), 4.2 x larger

One LlamaForCausalLM of 477 MB (8 layers, hidden 1024, intermediate 2816, 16 heads, vocab 8000, untied, fp32; 119.2 M
parameters, 4 safetensors shards of <= 150 MB: the dense checkpoint of the research baseline) is built once under
`.cache/bench/` and copied once per rank, so each rank reads a copy of its own from disk. Each case runs on 2 CPU
ranks through its real launcher, under a hard timeout:

- `shard_on_read`: accelerate launch + docs/configs/accelerate_deepspeed_zero3.yaml, no distributed config:
  `zero.Init`, then every rank fills its own partitions from the files (this fork's path);
- `upstream_zero3`: the same launch with TRANSFORMERS_ZERO3_SHARD_ON_READ=0: upstream's path, unchanged (rank 0
  reads the checkpoint, every parameter gathered, copied on rank 0 and re-partitioned);
- `no_deepspeed`: torchrun, a plain `from_pretrained` on every rank (each rank holds the whole model).

Per rank, around `from_pretrained` only (imports, process group and DeepSpeed init before, barriers around it), the
method of benchmarks/load_ep_zero3.py: warm load time (1 warm-up, then the median [min-max] of `--runs` loads; the
"+barrier" time is until the slowest rank is done), peak RSS (VmHWM reset right before the load), and cold bytes from
disk (the rank's own copy evicted with posix_fadvise(DONTNEED) before one more load; its page-cache residency after
the load, and /proc/self/io read_bytes over the load), and peak anonymous and file-backed resident memory apart (over
the load, against the rank's share: its partitions). Which path ran is checked on every rank.

Goals (printed as PASS/FAIL, JSON under benchmarks/results/):
- shard-on-read: every rank reads at most 1.1 x its own partitions plus the files' headers (cold residency);
- shard-on-read: rank 0's peak RSS within one parameter (the largest, in bytes) of every other rank's;
- shard-on-read: load time (slowest rank, until the barrier) at most half of upstream's ZeRO-3 path;
- shard-on-read: peak anonymous memory over the load at most 1.15 x the rank's share.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench_checkpoints import build_per_rank_checkpoints, per_rank_checkpoint  # noqa: E402  (beside this script)
from bench_driver import finish, launch_cases, parse_args, run, start_rank  # noqa: E402
from load_ep_zero3 import (  # noqa: E402  (beside this script: the same measuring method)
    CACHE,
    GOAL_ANON_RATIO,
    MB,
    measure_load,
    memory_figures,
    print_memory_table,
    read_ahead_kb,
    read_layout,
)

NPROC = 2
MODEL = dict(
    num_hidden_layers=8,
    hidden_size=1024,
    intermediate_size=2816,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=64,
    vocab_size=8000,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
# `--size`: the default model, and one 4.2 x larger (2.0 GB)
SIZES = {
    "small": MODEL,
    "large": {**MODEL, "num_hidden_layers": 11, "hidden_size": 2048, "intermediate_size": 5632},
}
# case -> (launcher, extra environment, expected load path on the ZeRO-3 cases)
CASES = {
    "shard_on_read": ("accelerate", {}, "shard_on_read"),
    "upstream_zero3": ("accelerate", {"TRANSFORMERS_ZERO3_SHARD_ON_READ": "0"}, "upstream"),
    "no_deepspeed": ("torchrun", {}, None),
}
GOAL_COLD_RATIO = 1.1
GOAL_TIME_RATIO = 0.5


def checkpoint_name(model: dict) -> str:
    return (f"llama-l{model['num_hidden_layers']}-h{model['hidden_size']}-i{model['intermediate_size']}"
            f"-v{model['vocab_size']}-fp32-150MB")


def checkpoint_dir(rank: int, model: dict = MODEL) -> Path:
    return per_rank_checkpoint(CACHE / checkpoint_name(model), rank)


def build_checkpoints(model: dict = MODEL) -> None:
    def make_model():
        import torch

        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**model)).to(torch.float32)

    build_per_rank_checkpoints(CACHE / checkpoint_name(model), NPROC, make_model)


def partition_minimum(layout: dict, rank: int, world: int) -> tuple[int, int]:
    """(headers + this rank's ZeRO-3 partition bytes of every tensor, the largest tensor's bytes)."""
    import math

    headers = sum(f["header"] for f in layout.values())
    own, largest = 0, 0
    for info in layout.values():
        for start, end in info["tensors"].values():
            # fp32 here: 4 bytes an element; rank r holds elements [r * n, (r + 1) * n), n = ceil(numel / world)
            numel = (end - start) // 4
            per_rank = math.ceil(numel / world)
            own += max(0, min(numel, (rank + 1) * per_rank) - rank * per_rank) * 4
            largest = max(largest, end - start)
    return headers + own, largest


def rank_main(args) -> dict:
    import torch
    import torch.distributed as dist

    from tests.fork_utils.worker import rank

    launcher, _, expected_path = CASES[args.case]
    keep_alive = start_rank(launcher)  # noqa: F841

    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed_shard_on_read
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    import transformers.models.llama.modeling_llama  # noqa: F401  (imported here, not inside the cold load)

    r = rank()
    path = checkpoint_dir(r, SIZES[args.size])
    layout = read_layout(path)

    def load_once(cold: bool) -> dict:
        deepspeed_shard_on_read.last_load.clear()

        def describe(model):
            return {
                "elements_held": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                     for p in model.parameters()),
                "path": deepspeed_shard_on_read.last_load.get("path"),
                "bytes_read_by_loader": deepspeed_shard_on_read.last_load.get("bytes_read"),
            }

        return measure_load(
            lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), layout, set(), cold, describe
        )

    cold = load_once(cold=True)
    warm = [load_once(cold=False) for _ in range(1 + args.runs)][1:]
    dist.barrier()
    minimum, largest = partition_minimum(layout, r, NPROC)
    return {
        "case": args.case,
        "rank": r,
        "zero3": is_deepspeed_zero3_enabled(),
        "expected_path": expected_path,
        "partition_minimum": minimum,
        "share": minimum - sum(f["header"] for f in layout.values()),
        "largest_tensor": largest,
        "checkpoint_bytes": sum(f["size"] for f in layout.values()),
        "warm": warm,
        "cold": cold,
    }


def slowest_barrier(by: dict, case: str) -> float:
    return max(by[case, r]["load_s_barrier"] for r in range(NPROC))


def summarize(results: dict) -> dict:
    rows = []
    for case, ranks in results.items():
        for r, rep in sorted(ranks.items()):
            warm, cold = rep["warm"], rep["cold"]
            pulled = cold["resident_after"]["total"] - cold["resident_before"]["total"]
            rows.append(
                {
                    "case": case,
                    "rank": r,
                    "paths": sorted({str(run["path"]) for run in [*warm, cold]}),
                    "expected_path": rep["expected_path"],
                    "load_s": statistics.median(w["seconds"] for w in warm),
                    "load_s_range": [min(w["seconds"] for w in warm), max(w["seconds"] for w in warm)],
                    "load_s_barrier": statistics.median(w["seconds_barrier"] for w in warm),
                    "peak_rss_mb": statistics.median(w["peak_rss_mb"] for w in warm),
                    "peak_rss_delta_mb": statistics.median(w["peak_rss_mb"] - w["rss_before_mb"] for w in warm),
                    "cold_load_s": cold["seconds"],
                    "cold_peak_rss_mb": cold["peak_rss_mb"],
                    "cold_read_bytes_mb": cold["read_bytes"] / MB,
                    "cold_pulled_mb": pulled / MB,
                    "loader_bytes_mb": (cold["bytes_read_by_loader"] or 0) / MB,
                    "partition_min_mb": rep["partition_minimum"] / MB,
                    "cold_ratio": pulled / rep["partition_minimum"],
                    "cold_read_bytes_ratio": cold["read_bytes"] / rep["partition_minimum"],
                    "largest_tensor_mb": rep["largest_tensor"] / MB,
                    "elements_held_m": warm[0]["elements_held"] / 1e6,
                    **memory_figures(warm, cold, rep["share"]),
                    "warm_runs": warm,
                    "cold_run": cold,
                }
            )
    by = {(row["case"], row["rank"]): row for row in rows}
    goals = {}
    for case in results:
        for r in range(NPROC):
            row = by[case, r]
            if row["expected_path"] is not None:
                goals[f"path_{case}_rank{r}"] = {"ok": row["paths"] == [row["expected_path"]], "paths": row["paths"]}
    if "shard_on_read" in results:
        ratios = [by["shard_on_read", r]["cold_ratio"] for r in range(NPROC)]
        goals["cold_bytes_over_partition_plus_headers"] = {
            "per_rank": ratios, "goal": GOAL_COLD_RATIO, "ok": max(ratios) <= GOAL_COLD_RATIO,
            "read_bytes_per_rank": [by["shard_on_read", r]["cold_read_bytes_ratio"] for r in range(NPROC)],
        }
        peaks = [by["shard_on_read", r]["peak_rss_mb"] for r in range(NPROC)]
        largest = by["shard_on_read", 0]["largest_tensor_mb"]
        excess = [peaks[0] - p for p in peaks[1:]]
        goals["rank0_peak_rss_minus_others_mb"] = {
            "per_rank": excess, "goal_mb": largest, "ok": max(excess) <= largest,
        }
    if "shard_on_read" in results:
        ratios = [by["shard_on_read", r]["anon_ratio"] for r in range(NPROC)]
        goals["peak_anon_shard_on_read_over_share"] = {
            "per_rank": ratios, "goal": GOAL_ANON_RATIO, "ok": max(ratios) <= GOAL_ANON_RATIO,
        }
    if "shard_on_read" in results and "upstream_zero3" in results:
        slowest = [slowest_barrier(by, case) for case in ("shard_on_read", "upstream_zero3")]
        goals["time_shard_on_read_over_upstream_zero3"] = {
            "per_rank": [by["shard_on_read", r]["load_s"] / by["upstream_zero3", r]["load_s"] for r in range(NPROC)],
            "until_barrier": slowest[0] / slowest[1], "goal": GOAL_TIME_RATIO,
            "ok": slowest[0] / slowest[1] <= GOAL_TIME_RATIO,
        }
        cold = [max(by[case, r]["cold_load_s"] for r in range(NPROC)) for case in ("shard_on_read", "upstream_zero3")]
        goals["cold_time_shard_on_read_over_upstream_zero3"] = {
            "per_rank": [cold[0] / cold[1]], "goal": GOAL_TIME_RATIO, "ok": cold[0] / cold[1] <= GOAL_TIME_RATIO,
        }
    if "shard_on_read" in results and "no_deepspeed" in results:
        slowest = [slowest_barrier(by, case) for case in ("shard_on_read", "no_deepspeed")]
        goals["info_time_shard_on_read_over_no_deepspeed"] = {"per_rank": [slowest[0] / slowest[1]], "ok": True}
    return {"rows": rows, "goals": goals}


def print_table(summary: dict) -> None:
    header = (
        "| case | rank | path | load s warm (median [min-max]) | +barrier s | peak RSS MB (+over before) "
        "| cold load s "
        "| cold read_bytes MB | cold own copy pulled MB | loader read MB | partition+headers MB | pulled / min "
        "| elements held M |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for row in summary["rows"]:
        print(
            f"| {row['case']} | {row['rank']} | {'/'.join(row['paths'])} | {row['load_s']:.2f} "
            f"[{row['load_s_range'][0]:.2f}-{row['load_s_range'][1]:.2f}] | {row['load_s_barrier']:.2f} | "
            f"{row['peak_rss_mb']:.0f} (+{row['peak_rss_delta_mb']:.0f}) | {row['cold_load_s']:.2f} | "
            f"{row['cold_read_bytes_mb']:.1f} | {row['cold_pulled_mb']:.1f} | {row['loader_bytes_mb']:.1f} | "
            f"{row['partition_min_mb']:.1f} | {row['cold_ratio']:.2f} | {row['elements_held_m']:.1f} |"
        )
    print()
    print_memory_table(summary["rows"])
    print()
    for name, goal in summary["goals"].items():
        ratios = ", ".join(f"{x:.2f}" for x in goal.get("per_rank", []))
        extra = f" (slowest rank until barrier: {goal['until_barrier']:.2f})" if "until_barrier" in goal else ""
        if "read_bytes_per_rank" in goal:
            extra += " (/proc/self/io read_bytes: " + ", ".join(f"{x:.2f}" for x in goal["read_bytes_per_rank"]) + ")"
        if "paths" in goal:
            extra += f" {goal['paths']}"
        limit = f" <= {goal['goal']}" if "goal" in goal else ""
        limit = f" <= {goal['goal_mb']:.1f} MB" if "goal_mb" in goal else limit
        status = "INFO" if name.startswith("info_") else ("PASS" if goal["ok"] else "FAIL")
        print(f"{status} {name}{limit}: {ratios}{extra}")


def driver(args) -> int:
    model_config = SIZES[args.size]
    build_checkpoints(model_config)
    import safetensors
    import torch

    import transformers

    def options(case):
        launcher, env, _ = CASES[case]
        return launcher, NPROC, env

    started = time.monotonic()
    results, failures = launch_cases(Path(__file__), args, options, ["--runs", str(args.runs), "--size", args.size])
    if not results:
        return 1
    summary = summarize(results)
    print()
    print_table(summary)
    environment = {
        "transformers": transformers.__version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
        "python": sys.version.split()[0], "cpus": os.cpu_count(), "kernel": os.uname().release,
        "read_ahead_kb": read_ahead_kb(checkpoint_dir(0, model_config)), "load_average": os.getloadavg(),
    }
    payload = {"model": model_config, "size": args.size, "nproc": NPROC, "environment": environment, **summary}
    return finish("load_zero3_dense", args, payload, summary["goals"], failures, started)


def main() -> int:
    def add_size(parser):
        parser.add_argument("--size", choices=list(SIZES), default="small",
                            help="small: 477 MB (default); large: 2.0 GB, 4.2 x larger")

    args = parse_args(
        __doc__, "load_zero3_dense", list(CASES), "warm loads measured after the warm-up load", 180, add_size
    )
    return run(args, rank_main, driver)


if __name__ == "__main__":
    sys.exit(main())
