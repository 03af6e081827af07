"""Save benchmark: EP + ZeRO-3 saves (streamed `save_pretrained`, accelerate's `get_state_dict`) vs one process.

    make bench-save                              # or: .venv/bin/python benchmarks/save_ep_zero3.py [--runs 3]
    .venv/bin/python benchmarks/save_ep_zero3.py --layers 8 2 --runs 1    # two model sizes in one go

The model is the one of the load benchmark (benchmarks/load_ep_zero3.py: Qwen3-MoE, 461 MB fp32, 8 layers, 16
experts), or the same with `--layers N` layers (e.g. 2: 140 MB; several values run one size after the other); each is
built once under `.cache/bench/`. Cases, each through its real launcher under a hard timeout:

- `ep_zero3`: 2 CPU ranks, accelerate launch + docs/configs/accelerate_deepspeed_zero3.yaml,
  `DistributedConfig(ep_size=2)`, then `deepspeed.initialize` (SGD), then `save_pretrained` on every rank, as a
  training script saves: every rank writes its part of each shard (`write_planned_checkpoint_in_parallel`), the
  experts it holds (gathered over ZeRO-3's partitions only) and its share of the dense tensors (gathered onto it);
- `ep_zero3_single_writer`: the same with the parallel write off (`PARALLEL_WRITE = False`), the save before it:
  every dense parameter is gathered over ZeRO-3's partitions and every expert over the expert-parallel group, one at
  a time, and rank 0 writes each tensor as soon as it has it (streamed);
- `ep_zero3_state_dict`: the same launch, then accelerate's documented ZeRO-3 save (what
  `accelerator.get_state_dict(model)` calls): `state_dict = engine._zero3_consolidated_16bit_state_dict()` (the
  whole model on rank 0, `None` elsewhere), then `save_pretrained(dir, state_dict=state_dict, is_main_process=rank
  == 0)` on every rank (rank 0 writes, the others return), then `del state_dict`. As upstream's ZeRO-3 16-bit save,
  rank 0 holds the whole model: there is no goal on its memory, only the figures;
- `single`: one process, the model loaded without any parallelism, `save_pretrained` (the upstream save).

All save with `--max-shard-size` (default 50GB as in `save_pretrained`: the whole model in one shard) into a
directory under `.cache/bench/` that the previous run left, as a training run overwrites its checkpoint. Per rank and
run: wall time of the save (for `ep_zero3_state_dict` the consolidation and `save_pretrained`, the consolidation's
share beside it; barriers around it), peak RSS over it (VmHWM reset right before) minus the RSS before it, and the
bytes of tensor data the rank wrote.

Printed, per model size: a table, then the writing rank's (rank 0's) peak RSS increase for the streamed save and for
the state-dict save, in MB, over the model's size and over the largest tensor gathered (one layer's fused experts),
and the ratio state-dict save / streamed save; then the goals and ratios. Goals, in units of the largest tensor
gathered (neither bound grows with the model): a writing rank's peak RSS increase <= 3.5 (the gathered tensor, the
gather's receive buffer and the copies converted back to the checkpoint's layout): every rank's in `ep_zero3`, rank
0's in `ep_zero3_single_writer`, whose other ranks' <= 1.5; in `ep_zero3` each rank wrote its share of the bytes
(within 10 % of the model's size over the ranks, plus one largest saved tensor), and the save takes at most one
process's time (issue 25). Reported: the same over the model's size, the state-dict save's figures, and the other
saves' time / single-process save time (the gathers are collectives; the single process has everything local). With several sizes,
a last table puts the writing rank's figures of every size side by side. JSON under benchmarks/results/ (git-ignored).
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
    model_with_layers,
    release_free_memory,
    reset_peak_rss,
)
from proc_stats import proc_status_kb  # noqa: E402


SAVES = CACHE / "saves"
EP_SIZE = 2
# case -> (launcher, number of processes)
CASES = {
    "ep_zero3": ("accelerate", 2),
    "ep_zero3_single_writer": ("accelerate", 2),
    "ep_zero3_state_dict": ("accelerate", 2),
    "single": ("python", 1),
}
DISTRIBUTED = ("ep_zero3", "ep_zero3_single_writer", "ep_zero3_state_dict")
# Peak RSS increase over a save, in units of the largest tensor gathered (see `summarize`)
GOAL_WRITER = 3.5
GOAL_OTHERS = 1.5
# Issue 25: the save where every rank writes takes at most the time of one process saving the same model
GOAL_SAVE_TIME_OVER_SINGLE_PROCESS = 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Rank side


def load_model(case: str, rank: int, model_config: dict):
    """(model, DeepSpeed engine or None)."""
    import torch

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kwargs = {"dtype": torch.float32}
    if case in DISTRIBUTED:
        kwargs["distributed_config"] = DistributedConfig(ep_size=EP_SIZE)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(rank, model_config), **kwargs)
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
    keep_alive = start_rank(CASES[args.case][0])  # noqa: F841
    r = rank()
    (layers,) = args.layers  # one size per launch
    model, engine = load_model(args.case, r, model_with_layers(layers))
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
    return {"case": args.case, "rank": r, "layers": layers, "runs": runs[1:], "written": written}


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def model_size_and_largest_tensor(model_config: dict) -> tuple[int, int]:
    """Bytes of the full model and of its largest tensor as saved, from the checkpoint's headers."""
    import struct

    total, largest = 0, 0
    for path in checkpoint_dir(0, model_config).glob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key != "__metadata__":
                size = info["data_offsets"][1] - info["data_offsets"][0]
                total, largest = total + size, max(largest, size)
    return total, largest


def summarize(results: dict, model_config: dict) -> dict:
    model_bytes, largest = model_size_and_largest_tensor(model_config)
    # The experts of one layer are saved per expert but gathered as the fused tensor of all of them.
    fused_experts = (2 * model_config["num_experts"] * model_config["hidden_size"]
                     * model_config["moe_intermediate_size"] * 4)
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
                "written_by_rank_mb": (rep["runs"][-1].get("bytes_written") or 0) / MB if case in DISTRIBUTED else None,
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
        ranks = range(CASES["ep_zero3"][1])
        value = max(by["ep_zero3", r]["peak_rss_delta_mb"] * MB for r in ranks)
        goals["every_writer_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": value / largest_gathered, "goal": GOAL_WRITER, "ok": value <= GOAL_WRITER * largest_gathered,
            "over_model_size": value / model_bytes,
        }
        share = model_bytes / len(ranks)
        off = max(abs(by["ep_zero3", r]["written_by_rank_mb"] * MB - share) for r in ranks)
        goals["bytes_written_per_rank_off_the_share_over_share_plus_largest_tensor"] = {
            "value": off / (0.1 * share + largest), "goal": 1.0, "ok": off <= 0.1 * share + largest,
        }
    if ("ep_zero3_single_writer", 0) in by:
        value = by["ep_zero3_single_writer", 0]["peak_rss_delta_mb"] * MB
        goals["single_writer_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": value / largest_gathered, "goal": GOAL_WRITER, "ok": value <= GOAL_WRITER * largest_gathered,
            "over_model_size": value / model_bytes,
        }
        others = max(by["ep_zero3_single_writer", r]["peak_rss_delta_mb"] * MB
                     for r in range(1, CASES["ep_zero3_single_writer"][1]))
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
        others = max(by["ep_zero3_state_dict", r]["peak_rss_delta_mb"] * MB
                     for r in range(1, CASES["ep_zero3_state_dict"][1]))
        goals["state_dict_other_ranks_peak_rss_increase_over_largest_gathered_tensor"] = {
            "value": others / largest_gathered, "ok": True, "over_model_size": others / model_bytes,
        }
    state_dict_over_streamed = None
    if "ep_zero3" in writer and "ep_zero3_state_dict" in writer:
        state_dict_over_streamed = writer["ep_zero3_state_dict"]["mb"] / max(writer["ep_zero3"]["mb"], 1e-9)
        goals["state_dict_over_streamed_writer_peak_rss_increase"] = {"value": state_dict_over_streamed, "ok": True}
    for case in DISTRIBUTED:
        if (case, 0) in by and ("single", 0) in by:
            value = by[case, 0]["save_s_barrier"] / by["single", 0]["save_s"]
            goals[f"{case}_save_time_over_single_process"] = {"value": value, "ok": True}
            if case == "ep_zero3":
                goals[f"{case}_save_time_over_single_process"].update(
                    goal=GOAL_SAVE_TIME_OVER_SINGLE_PROCESS, ok=value <= GOAL_SAVE_TIME_OVER_SINGLE_PROCESS
                )
    if ("single", 0) in by:
        goals["single_process_peak_rss_increase_over_model_size"] = {
            "value": by["single", 0]["peak_rss_delta_mb"] * MB / model_bytes, "ok": True,
        }
    return {"layers": model_config["num_hidden_layers"], "model_mb": model_bytes / MB,
            "largest_tensor_mb": largest / MB, "fused_experts_mb": fused_experts / MB,
            "largest_gathered_tensor_mb": largest_gathered / MB,
            "rows": rows, "writer_peak_rss_increase": writer, "state_dict_over_streamed": state_dict_over_streamed,
            "goals": goals}


WRITER_LABELS = {
    "ep_zero3": "ep_zero3 (save_pretrained, every rank writing)",
    "ep_zero3_single_writer": "ep_zero3_single_writer (streamed save_pretrained, rank 0 writing)",
    "ep_zero3_state_dict": "ep_zero3_state_dict (get_state_dict, then save_pretrained)",
}


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
    for name, goal in summary["goals"].items():
        limit = f" <= {goal['goal']:.2f}" if "goal" in goal else " (reported)"
        of_model = f" ({goal['over_model_size']:.2f} of the model's size)" if "over_model_size" in goal else ""
        print(f"{'PASS' if goal['ok'] else 'FAIL'} {name}{limit}: {goal['value']:.2f}{of_model}")


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


def driver(args) -> int:
    started = time.monotonic()
    sizes, goals, failures = [], {}, []
    for layers in args.layers:
        model_config = model_with_layers(layers)
        if len(args.layers) > 1:
            print(f"=== {layers} layers", flush=True)
        build_checkpoints(model_config)
        results, failed = launch_cases(
            Path(__file__), args, lambda case: (*CASES[case], None),
            ["--runs", str(args.runs), "--max-shard-size", args.max_shard_size, "--layers", str(layers)],
        )
        shutil.rmtree(SAVES, ignore_errors=True)
        failures += [f"{case} ({layers} layers)" for case in failed]
        if not results:
            continue
        summary = summarize(results, model_config)
        print()
        print_table(summary)
        print()
        sizes.append({"model": model_config, **summary})
        prefix = f"{layers}_layers/" if len(args.layers) > 1 else ""
        goals.update({prefix + name: goal for name, goal in summary["goals"].items()})
    if not sizes:
        return 1
    if len(sizes) > 1:
        print_sizes(sizes)
    payload = {"max_shard_size": args.max_shard_size, "cpus": os.cpu_count(), "sizes": sizes}
    return finish("save_ep_zero3", args, payload, goals, failures, started)


def main() -> int:
    def add_arguments(parser):
        parser.add_argument("--max-shard-size", default="50GB")
        parser.add_argument("--layers", type=int, nargs="+", default=[MODEL["num_hidden_layers"]],
                            help="the model's number of layers; several values: one size after the other "
                                 f"(default {MODEL['num_hidden_layers']}: 461 MB; 2: 140 MB)")

    args = parse_args(
        __doc__, "save_ep_zero3", list(CASES), "saves measured after the warm-up save", 300, add_arguments
    )
    return run(args, rank_main, driver)


if __name__ == "__main__":
    sys.exit(main())
