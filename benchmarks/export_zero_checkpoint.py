"""Export benchmark: a DeepSpeed ZeRO-3 checkpoint of an EP model exported to a Hugging Face checkpoint, offline.

    make bench-export                          # or: .venv/bin/python benchmarks/export_zero_checkpoint.py
    .venv/bin/python benchmarks/export_zero_checkpoint.py --sizes small --dtypes bf16

Two model sizes 5.5x apart (the load benchmark's, benchmarks/load_ep_zero3.py: Qwen3-MoE, 461 MB and 2.6 GB in fp32,
16 experts). For each, once, cached under `.cache/bench/`: 2 CPU ranks (torchrun) load it with
`DistributedConfig(ep_size=2)` under ZeRO-3, take one AdamW step and `engine.save_checkpoint` it (fp32 master weights
and both Adam moments: 3x the model on disk). Then, each in a fresh process, without the training topology:

- `export`: `export_zero_checkpoint_to_hf_checkpoint` (the fork's export, streamed one tensor at a time);
- `in_memory`: what one does without it: the fork's `get_fp32_state_dict_from_zero_checkpoint` (the whole fp32 state
  dict), `from_pretrained`-free model from the config, `load_state_dict`, `save_pretrained`.

Per process: wall time, and resident memory sampled every 2 ms over the export minus what the process held before
it (`ResidentSampler`: anonymous memory, file pages mapped, their sum), in MB and in units of the largest tensor
(the model's fused experts of one layer, as read from the checkpoint). Goal (export): peak resident increase within 4
largest tensors at both sizes, so that it grows with the largest tensor, not with the model. The outputs are checked
to hold the same tensors as the original checkpoint (keys, shapes, bytes for fp32). JSON under benchmarks/results/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_ep_zero3 import CACHE, MB, SIZES, build_checkpoints, checkpoint_dir, checkpoint_name  # noqa: E402
from proc_stats import ResidentSampler, resident_kb  # noqa: E402


NPROC = 2
EP_SIZE = 2
WAYS = ("export", "in_memory")
GOAL_LARGEST_TENSORS = 4.0


# ---------------------------------------------------------------------------------------------------------------------
# The ZeRO checkpoint: 2 ranks, EP 2, one AdamW step, `engine.save_checkpoint` (rank side, then the driver's build)


def zero_checkpoint_dir(size: str) -> Path:
    return CACHE / f"{checkpoint_name(SIZES[size])}-zero3-ep{EP_SIZE}"


def save_zero_checkpoint(size: str) -> dict:
    """Rank side, under torchrun."""
    import deepspeed
    import torch

    from tests.fork_utils.worker import init_process_group, rank
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations import HfDeepSpeedConfig

    init_process_group()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    registered = HfDeepSpeedConfig(config)  # noqa: F841  (transformers holds it weakly)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_dir(rank(), SIZES[size]), distributed_config=DistributedConfig(ep_size=EP_SIZE),
        dtype=torch.float32,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    rows = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(rank()))
    engine.backward(engine(input_ids=rows, labels=rows).loss)
    engine.step()
    engine.save_checkpoint(str(zero_checkpoint_dir(size) / "staging"))
    return {"rank": rank()}


def build_zero_checkpoint(size: str, timeout: float) -> Path:
    from tests.fork_utils.launcher import launch

    target = zero_checkpoint_dir(size)
    if (target / ".complete").exists():
        return target
    build_checkpoints(SIZES[size])
    print(f"building the ZeRO-3 checkpoint of the {size} model under {target} (once)", flush=True)
    shutil.rmtree(target, ignore_errors=True)
    launch(Path(__file__), ["--rank-side", size], nproc=NPROC, timeout=timeout).check()
    for entry in (target / "staging").iterdir():
        entry.rename(target / entry.name)
    (target / "staging").rmdir()
    (target / ".complete").touch()
    return target


# ---------------------------------------------------------------------------------------------------------------------
# One export, in a process of its own


def measure(way: str, size: str, dtype: str, out: Path) -> dict:
    """Process side: one export of the size's ZeRO checkpoint into `out`, measured."""
    import torch

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import deepspeed_expert_parallel_checkpoint as offline
    from transformers.integrations.deepspeed_expert_parallel_export import export_zero_checkpoint_to_hf_checkpoint

    checkpoint, config_dir = zero_checkpoint_dir(size), checkpoint_dir(0, SIZES[size])
    shutil.rmtree(out, ignore_errors=True)
    # What both ways import on first use (DeepSpeed, whose objects the checkpoint files hold; the model's module; the
    # writers), imported before the baseline: their code and data are not the export's memory.
    import deepspeed  # noqa: F401
    import huggingface_hub  # noqa: F401
    import safetensors.torch  # noqa: F401

    from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: F401
    before = resident_kb()
    started = time.perf_counter()
    with ResidentSampler() as sampler:
        if way == "export":
            export_zero_checkpoint_to_hf_checkpoint(checkpoint, out, config=config_dir, dtype=dtype)
        else:
            state_dict = offline.get_fp32_state_dict_from_zero_checkpoint(checkpoint)
            config = AutoConfig.from_pretrained(config_dir)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(state_dict)
            del state_dict
            model.to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])).save_pretrained(out)
    seconds = time.perf_counter() - started
    base_total = before["anon"] + before["file"] + before["shmem"]
    return {
        "seconds": seconds,
        "peak_anon_mb": (sampler.peak["anon"] - before["anon"]) * 1024 / MB,
        "peak_file_mb": (sampler.peak["file"] - before["file"]) * 1024 / MB,
        "peak_total_mb": (sampler.peak["total"] - base_total) * 1024 / MB,
        "samples": sampler.samples,
    }


def run_measure(way: str, size: str, dtype: str, timeout: float) -> dict:
    out = CACHE / "exports" / f"{size}-{way}-{dtype}"
    command = [sys.executable, __file__, "--measure", way, size, dtype, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{way} {size} {dtype} failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["same_tensors"] = same_keys_and_shapes(out, checkpoint_dir(0, SIZES[size]))
    return figures


def same_keys_and_shapes(exported: Path, original: Path) -> bool:
    """The export holds the original checkpoint's keys and shapes (one AdamW step moved the weights: the values are
    compared by the tests, tests/deepspeed/test_ep_zero3_hf_export.py)."""
    from tests.fork_utils.tiny_models import checkpoint_keys_and_shapes

    return checkpoint_keys_and_shapes(exported) == checkpoint_keys_and_shapes(original)


def model_bytes_and_largest_tensor(size: str) -> tuple[int, int]:
    """The model's bytes (fp32) and its largest tensor as the checkpoint holds it (one layer's fused experts)."""
    from transformers.integrations.deepspeed_expert_parallel_checkpoint import unread_state_dict
    from transformers.integrations.deepspeed_expert_parallel_reshard import SavedZero3Checkpoint, resolve_checkpoint_dir

    saved = SavedZero3Checkpoint(resolve_checkpoint_dir(str(zero_checkpoint_dir(size))))
    unread = unread_state_dict(saved, exclude_frozen_parameters=False)
    sizes = [value.shape.numel() * 4 for value in unread.values()]
    return sum(sizes), max(sizes)


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def main() -> int:
    import argparse

    if sys.argv[1:2] == ["--measure"]:
        way, size, dtype, out = sys.argv[2:6]
        print(json.dumps(measure(way, size, dtype, Path(out))))
        return 0
    if sys.argv[1:2] == ["--rank-side"]:
        from tests.fork_utils.worker import run_rank

        size = sys.argv[2]
        run_rank(lambda: save_zero_checkpoint(size))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/export-<time>.json)")
    parser.add_argument("--strict", action="store_true", help="exit with status 2 when the goal is not met")
    args = parser.parse_args()

    started, rows = time.monotonic(), []
    for size in args.sizes:
        build_zero_checkpoint(size, args.timeout)
        model_bytes, largest = model_bytes_and_largest_tensor(size)
        for dtype in args.dtypes:
            for way in args.ways:
                figures = run_measure(way, size, dtype, args.timeout)
                rows.append({"size": size, "dtype": dtype, "way": way, "model_mb": model_bytes / MB,
                             "largest_tensor_mb": largest / MB, **figures,
                             "peak_total_over_largest": figures["peak_total_mb"] / (largest / MB),
                             "peak_total_over_model": figures["peak_total_mb"] / (model_bytes / MB)})
                print(json.dumps(rows[-1]), flush=True)

    print("\n| size | model (fp32) | largest tensor | dtype | way | time | peak anon | peak file pages | peak total "
          "| total / largest | total / model | tensors as the original |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['size']} | {row['model_mb']:.0f} MB | {row['largest_tensor_mb']:.0f} MB | {row['dtype']} | "
              f"{row['way']} | {row['seconds']:.1f} s | {row['peak_anon_mb']:.0f} MB | {row['peak_file_mb']:.0f} MB | "
              f"{row['peak_total_mb']:.0f} MB | {row['peak_total_over_largest']:.2f} | "
              f"{row['peak_total_over_model']:.2f} | {row['same_tensors']} |")
    exports = [row for row in rows if row["way"] == "export"]
    ok = all(row["peak_total_over_largest"] <= GOAL_LARGEST_TENSORS and row["same_tensors"] for row in exports)
    print(f"\ngoal: export peak resident increase <= {GOAL_LARGEST_TENSORS} largest tensors at every size: "
          f"{'met' if ok else 'NOT met'}")
    from bench_driver import RESULTS

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"export-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rows": rows, "goal_met": ok, "elapsed_s": time.monotonic() - started}, indent=1))
    print(f"results: {out}  ({time.monotonic() - started:.0f} s)")
    return 2 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
