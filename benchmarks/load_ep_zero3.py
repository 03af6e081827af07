"""Load benchmark: expert parallelism under DeepSpeed ZeRO-3 against EP-only and the upstream dense ZeRO-3 path.

    make bench-load                              # or: .venv/bin/python benchmarks/load_ep_zero3.py [--runs 3]
    make bench-load BENCH_ARGS="--size large"    # the same at 2.6 GB (hidden 1024, 12 layers), 5.5 x larger

One Qwen3MoeForCausalLM of 461 MB (8 layers, hidden 512, 16 experts, top-2, moe_intermediate 512, vocab 8000, fp32,
per-expert checkpoint layout, 4 safetensors shards of <= 150 MB) is built once under `.cache/bench/` and copied once
per rank, so that each rank reads a copy of its own from disk and page-cache hits are never credited to the other
rank. Each case runs on 2 CPU ranks through its real launcher (under a hard timeout):

- `ep_only`:    torchrun, `DistributedConfig(fsdp_size=2, ep_size=2)` (FSDP2 shards the dense weights)
- `ep_zero3`:   accelerate launch + docs/configs/accelerate_deepspeed_zero3.yaml, `DistributedConfig(ep_size=2)`
- `zero3_shard_on_read`: the same launch without a distributed config: `zero.Init`, then this fork's shard-on-read
  path (each rank fills its ZeRO-3 partitions, experts fused one layer at a time; for its memory at load)
- `dense_zero3`: the same launch without a distributed config, TRANSFORMERS_ZERO3_SHARD_ON_READ=0: upstream's
  `zero.Init` path (rank 0 reads everything; this fork's shard-on-read path for dense models: load_zero3_dense.py)

Per rank, around `from_pretrained` only (imports, process group and DeepSpeed init before, barriers around it):
- load wall time with a warm page cache: 1 warm-up, then the median [min-max] of `--runs` loads;
- peak RSS: VmHWM after resetting it (`echo 5 > /proc/self/clear_refs`) right before the load;
- peak anonymous and file-backed resident memory apart (RssAnon / RssFile of /proc/self/status, sampled every 2 ms
  in a thread): anonymous memory cannot be reclaimed (no swap), mapped checkpoint pages can. Against the rank's share
  (the bytes of the tensors it holds after the load), goal: peak anonymous growth over the load <= 1.15 x the share;
- cold bytes from disk: the rank's own copy is evicted (posix_fadvise DONTNEED) before one more load, then its
  page-cache residency (mincore) says which bytes were pulled in for this rank, split into dense weights, this
  rank's experts and other ranks' experts; `/proc/self/io` read_bytes over the load is reported beside it;
- experts: the expert elements this rank read from the checkpoint (counted at `safe_open`) and holds after the load.

The results go to a table on stdout and to JSON under benchmarks/results/ (git-ignored), with the ratios against the
goals: EP+ZeRO-3 / EP-only load time <= 1.15, no rank reads or holds all experts, cold bytes per rank <= 1.1 x the
layout minimum (EP under ZeRO-3: the headers, every dense weight and this rank's experts).
"""

from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import re
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
from proc_stats import ResidentSampler, proc_status_kb, resident_kb  # noqa: E402

CACHE = REPO_ROOT / ".cache" / "bench"
NPROC = 2
EP_SIZE = 2
MODEL = dict(
    num_hidden_layers=8,
    hidden_size=512,
    intermediate_size=1024,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=512,
    vocab_size=8000,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
# `--size`: the default model, and one 5.5 x larger (2.6 GB: per-expert tensors of 4 MB instead of 1 MB)
SIZES = {
    "small": MODEL,
    "large": {
        **MODEL,
        "num_hidden_layers": 12,
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "moe_intermediate_size": 1024,
    },
}


def checkpoint_name(model: dict) -> str:
    return (f"qwen3moe-l{model['num_hidden_layers']}-h{model['hidden_size']}-e{model['num_experts']}"
            f"-v{model['vocab_size']}-fp32-150MB")


def model_with_layers(layers: int) -> dict:
    """`MODEL` with another number of layers (the save benchmark's second size); its checkpoint is cached beside."""
    return {**MODEL, "num_hidden_layers": layers}


CHECKPOINT_NAME = checkpoint_name(MODEL)  # "qwen3moe-l8-h512-e16-v8000-fp32-150MB"
# case -> (launcher, from_pretrained's distributed config as DistributedConfig kwargs, or None)
CASES = {
    "ep_only": ("torchrun", {"fsdp_size": 2, "ep_size": EP_SIZE}),
    "ep_zero3": ("accelerate", {"ep_size": EP_SIZE}),
    "zero3_shard_on_read": ("accelerate", None),
    "dense_zero3": ("accelerate", None),
}
GOAL_TIME_RATIO = 1.15
GOAL_COLD_RATIO = 1.1
GOAL_ANON_RATIO = 1.15
MB = 1e6
EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.")


# ---------------------------------------------------------------------------------------------------------------------
# The checkpoint: built once, one copy per rank


def checkpoint_dir(rank: int, model: dict = MODEL) -> Path:
    return per_rank_checkpoint(CACHE / checkpoint_name(model), rank)


def build_checkpoints(model: dict = MODEL) -> None:
    def make_model():
        import torch

        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**model)).to(torch.float32)

    build_per_rank_checkpoints(CACHE / checkpoint_name(model), NPROC, make_model)


def read_layout(directory: Path) -> dict:
    """Every tensor's byte range in its file (from the safetensors headers), and the header sizes."""
    files = {}
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        start = 8 + header_len
        tensors = {
            key: (start + info["data_offsets"][0], start + info["data_offsets"][1])
            for key, info in header.items()
            if key != "__metadata__"
        }
        files[str(path)] = {"size": path.stat().st_size, "header": start, "tensors": tensors}
    return files


def expert_of(key: str) -> int | None:
    match = EXPERT_KEY.search(key)
    return int(match.group(1)) if match else None


def owned_experts(num_experts: int, rank: int, ep_size: int | None) -> set[int]:
    """Rank r of an EP group of consecutive ranks owns experts [r % ep * E/ep, (r % ep + 1) * E/ep)."""
    if not ep_size:
        return set()
    per_rank = num_experts // ep_size
    first = (rank % ep_size) * per_rank
    return set(range(first, first + per_rank))


def rank_share(layout: dict, case: str) -> float:
    """The bytes of the tensors a rank holds once loaded: every dense weight and its experts (EP under ZeRO-3), its
    FSDP half of the dense weights and its experts (EP-only), its ZeRO-3 partition of everything (dense ZeRO-3)."""
    dense = sum(e - s for f in layout.values() for k, (s, e) in f["tensors"].items() if expert_of(k) is None)
    experts = sum(e - s for f in layout.values() for k, (s, e) in f["tensors"].items() if expert_of(k) is not None)
    if case == "ep_zero3":
        return dense + experts / EP_SIZE
    if case == "ep_only":
        return dense / NPROC + experts / EP_SIZE
    return (dense + experts) / NPROC


def layout_minimum(layout: dict, case: str, rank: int) -> float:
    """The bytes this rank must read for its share: headers, then the dense weights (all of them, or its FSDP half)
    and its experts; rank 0 reads everything on the dense ZeRO-3 path, the other ranks only the headers."""
    headers = sum(f["header"] for f in layout.values())
    dense = sum(e - s for f in layout.values() for k, (s, e) in f["tensors"].items() if expert_of(k) is None)
    experts = sum(e - s for f in layout.values() for k, (s, e) in f["tensors"].items() if expert_of(k) is not None)
    if case == "ep_zero3":
        return headers + dense + experts / EP_SIZE
    if case == "ep_only":
        return headers + dense / NPROC + experts / EP_SIZE
    if case == "zero3_shard_on_read":
        return headers + (dense + experts) / NPROC
    return headers + dense + experts if rank == 0 else headers


# ---------------------------------------------------------------------------------------------------------------------
# Rank side: /proc readings, page-cache residency, read counting


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
PAGE = mmap.PAGESIZE


def resident_pages(path: str) -> bytes:
    """mincore() of a fresh read-only mapping of `path`: one byte per page, bit 0 set if the page is cached.
    Mapping a file reads nothing, so this does not change what it measures."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return bytes(vec)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def residency(layout: dict, own: set[int]) -> dict:
    """Cached bytes of this rank's checkpoint copy, split into headers/dense, own experts and other experts."""
    out = {"total": 0, "dense": 0, "own_experts": 0, "other_experts": 0}
    for path, info in layout.items():
        vec = resident_pages(path)
        out["total"] += min(sum(b & 1 for b in vec) * PAGE, info["size"])
        for key, (start, end) in [("__header__", (0, info["header"]))] + list(info["tensors"].items()):
            if end <= start:
                continue
            # count whole pages overlapping the tensor, weighted by the overlap (pages are shared at the edges)
            cached = 0
            for page in range(start // PAGE, (end - 1) // PAGE + 1):
                if vec[page] & 1:
                    cached += min(end, (page + 1) * PAGE) - max(start, page * PAGE)
            expert = expert_of(key)
            bucket = "dense" if expert is None else ("own_experts" if expert in own else "other_experts")
            out[bucket] += cached
    return out


def evict(layout: dict) -> None:
    for path in layout:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proc_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0



def release_free_memory() -> None:
    """Give the heap that earlier loads freed back to the OS, so that each load starts from about the same RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class ReadCounter:
    """Wraps `safe_open` where transformers looks it up, and counts the elements of every tensor that is sliced or
    fetched out of the checkpoint, per key."""

    def __init__(self):
        self.elements: dict[str, int] = {}

    def install(self):
        import transformers.modeling_utils as modeling_utils

        original = modeling_utils.safe_open
        counter = self

        class CountingSlice:
            def __init__(self, inner, key):
                self._inner, self._key = inner, key

            def __getitem__(self, index):
                tensor = self._inner[index]
                counter.add(self._key, tensor.numel())
                return tensor

            def __getattr__(self, name):
                return getattr(self._inner, name)

        class CountingHandle:
            def __init__(self, *args, **kwargs):
                self._inner = original(*args, **kwargs)

            def __enter__(self):
                self._inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self._inner.__exit__(*exc)

            def get_slice(self, key):
                return CountingSlice(self._inner.get_slice(key), key)

            def get_tensor(self, key):
                tensor = self._inner.get_tensor(key)
                counter.add(key, tensor.numel())
                return tensor

            def __getattr__(self, name):
                return getattr(self._inner, name)

        modeling_utils.safe_open = CountingHandle

    def add(self, key, numel):
        self.elements[key] = self.elements.get(key, 0) + numel

    def reset(self):
        self.elements = {}

    def summary(self):
        per_layer: dict[str, set[int]] = {}
        expert_elems = 0
        for key, numel in self.elements.items():
            expert = expert_of(key)
            if expert is not None and numel:
                expert_elems += numel
                per_layer.setdefault(key.split(".experts.")[0], set()).add(expert)
        return {
            "expert_elems_read": expert_elems,
            "max_experts_read_per_layer": max((len(v) for v in per_layer.values()), default=0),
            "elems_read": sum(self.elements.values()),
        }


def expert_elements_held(model) -> tuple[int, int]:
    """(elements of expert params this rank holds, local experts per layer); ZeRO-3 params count their partition."""
    from torch.distributed.tensor import DTensor

    held, per_layer = 0, 0
    for name, param in model.named_parameters():
        if ".experts." not in name:
            continue
        if hasattr(param, "ds_tensor"):
            held += param.ds_tensor.numel()
        elif isinstance(param, DTensor):
            held += param.to_local().numel()
        else:
            held += param.numel()
    for name, module in model.named_modules():
        if name.endswith("mlp.experts") and hasattr(module, "num_experts"):
            per_layer = module.num_experts
    return held, per_layer


def measure_load(load, layout: dict, own: set[int], cold: bool, describe) -> dict:
    """
    One `load()` (a `from_pretrained`, every rank at once) with the figures of the load benchmarks: wall time until
    loaded and until every rank is, peak RSS over it, bytes read (`/proc/self/io`) and, for a `cold` load, page-cache
    residency of the rank's checkpoint copy before (evicted) and after; `describe(model)` adds the case's own figures.
    """
    import torch.distributed as dist

    gc.collect()
    release_free_memory()
    before = {}
    if cold:
        evict(layout)
        before = residency(layout, own)
    dist.barrier()
    reset_peak_rss()
    rss_before = proc_status_kb("VmRSS")
    parts_before = resident_kb()
    io_before = proc_read_bytes()
    start = time.perf_counter()
    with ResidentSampler() as sampler:
        model = load()
        seconds = time.perf_counter() - start
    parts_after = resident_kb()
    read_bytes = proc_read_bytes() - io_before
    peak = proc_status_kb("VmHWM")
    dist.barrier()
    seconds_barrier = time.perf_counter() - start
    run = {
        "seconds": seconds,
        "seconds_barrier": seconds_barrier,
        "peak_rss_mb": peak * 1024 / MB,
        "rss_before_mb": rss_before * 1024 / MB,
        "read_bytes": read_bytes,
        # anonymous and file-backed resident memory apart (sampled): before, peak over the load, and after it
        "anon_before_mb": parts_before["anon"] * 1024 / MB,
        "file_before_mb": parts_before["file"] * 1024 / MB,
        "peak_anon_mb": sampler.peak["anon"] * 1024 / MB,
        "peak_file_mb": sampler.peak["file"] * 1024 / MB,
        "anon_after_mb": parts_after["anon"] * 1024 / MB,
        "file_after_mb": parts_after["file"] * 1024 / MB,
        **describe(model),
    }
    if cold:
        run["resident_before"] = before
        run["resident_after"] = residency(layout, own)
    del model
    gc.collect()
    return run


ORIGINAL_RELEASES: dict = {}


def set_memory_releases(on: bool) -> None:
    """Switch the two releases of "Memory at load" (docs/ep_deepspeed.md) on or off in this process (`--ab-releases`):
    `malloc_trim` after each converter group, `MADV_DONTNEED` of the checkpoint pages of consumed tensors."""
    import transformers.core_model_loading as loading
    import transformers.integrations.deepspeed_shard_on_read as shard_on_read
    import transformers.utils.sharded_read_advice as advice

    originals = ORIGINAL_RELEASES.setdefault("functions", (advice._release_freed_heap, advice._release_pages))
    release_heap, release_pages = originals if on else (lambda: None, lambda storage, address, length: None)
    loading._release_freed_heap = shard_on_read._release_freed_heap = release_heap
    advice._release_pages = release_pages


def ab_release_rounds(load_once, rounds: int) -> dict:
    """Warm loads with the releases on and off, interleaved in the same processes, the order swapped each round (so
    that neither mode always follows the other): wall and process CPU seconds of each."""
    times = {"on": [], "off": []}
    for round_index in range(rounds):
        for mode in ("on", "off") if round_index % 2 == 0 else ("off", "on"):
            set_memory_releases(mode == "on")
            cpu, wall = time.process_time(), time.perf_counter()
            run = load_once(cold=False)
            # With the releases off, the checkpoint's pages are unmapped later, when the model is freed: the load's
            # wall and CPU time up to and with the model's release count both
            times[mode].append({"seconds": run["seconds"], "with_release_seconds": time.perf_counter() - wall,
                                "cpu_seconds": time.process_time() - cpu,
                                "peak_anon_mb": run["peak_anon_mb"] - run["anon_before_mb"]})
    set_memory_releases(True)
    return times


def rank_main(args) -> dict:
    import torch
    import torch.distributed as dist

    from tests.fork_utils.worker import rank

    launcher, dist_kwargs = CASES[args.case]
    keep_alive = start_rank(launcher)  # noqa: F841
    model_config = SIZES[args.size]

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    r = rank()
    path = checkpoint_dir(r, model_config)
    layout = read_layout(path)
    own = owned_experts(model_config["num_experts"], r, dist_kwargs.get("ep_size") if dist_kwargs else None)
    counter = ReadCounter()
    counter.install()
    total_expert_elems = (
        model_config["num_hidden_layers"] * model_config["num_experts"] * 3 * model_config["hidden_size"]
        * model_config["moe_intermediate_size"]
    )

    def load_once(cold: bool) -> dict:
        counter.reset()
        kwargs = {"dtype": torch.float32}
        if dist_kwargs is not None:
            kwargs["distributed_config"] = DistributedConfig(**dist_kwargs)

        def describe(model):
            held, local_experts = expert_elements_held(model)
            return {"expert_elems_held": held, "local_experts_per_layer": local_experts, **counter.summary()}

        return measure_load(lambda: AutoModelForCausalLM.from_pretrained(path, **kwargs), layout, own, cold, describe)

    # The model's module is imported here, not inside the first (cold) load.
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401

    # Cold first: later on, pages the previous model still maps (views into the mmapped checkpoint that something
    # keeps alive) could not be evicted. Then the warm-up load, then the measured warm loads.
    cold = load_once(cold=True)
    warm = [load_once(cold=False) for _ in range(1 + args.runs)][1:]
    ab = ab_release_rounds(load_once, args.ab_releases) if args.ab_releases else None
    dist.barrier()
    return {
        "ab_releases": ab,
        "case": args.case,
        "rank": r,
        "zero3": is_deepspeed_zero3_enabled(),
        "layout_minimum": layout_minimum(layout, args.case, r),
        "share": rank_share(layout, args.case),
        "total_expert_elems": total_expert_elems,
        "num_experts": model_config["num_experts"],
        "warm": warm,
        "cold": cold,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Driver: launch each case, summarize


def median_range(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def summarize(results: dict) -> dict:
    """Per case and rank: the figures of the table; then the ratios against the goals."""
    rows = []
    for case, ranks in results.items():
        for r, rep in sorted(ranks.items()):
            warm, cold = rep["warm"], rep["cold"]
            after = cold["resident_after"]
            all_experts = any(
                run["expert_elems_read"] >= rep["total_expert_elems"]
                or run["expert_elems_held"] >= rep["total_expert_elems"]
                or run["max_experts_read_per_layer"] >= rep["num_experts"]
                for run in [*warm, cold]
            )
            rows.append(
                {
                    "case": case,
                    "rank": r,
                    "load_s": statistics.median(w["seconds"] for w in warm),
                    "load_s_range": [min(w["seconds"] for w in warm), max(w["seconds"] for w in warm)],
                    "load_s_barrier": statistics.median(w["seconds_barrier"] for w in warm),
                    "peak_rss_mb": statistics.median(w["peak_rss_mb"] for w in warm),
                    "peak_rss_delta_mb": statistics.median(w["peak_rss_mb"] - w["rss_before_mb"] for w in warm),
                    "rss_before_mb": statistics.median(w["rss_before_mb"] for w in warm),
                    **memory_figures(warm, cold, rep["share"]),
                    "cold_load_s": cold["seconds"],
                    "cold_peak_rss_mb": cold["peak_rss_mb"],
                    "cold_read_bytes_mb": cold["read_bytes"] / MB,
                    "cold_resident_before_mb": cold["resident_before"]["total"] / MB,
                    "cold_resident_mb": after["total"] / MB,
                    "cold_resident_dense_mb": after["dense"] / MB,
                    "cold_resident_own_experts_mb": after["own_experts"] / MB,
                    "cold_resident_other_experts_mb": after["other_experts"] / MB,
                    "layout_min_mb": rep["layout_minimum"] / MB,
                    "cold_ratio": (after["total"] - cold["resident_before"]["total"]) / rep["layout_minimum"],
                    "expert_elems_read_m": max(run["expert_elems_read"] for run in [*warm, cold]) / 1e6,
                    "max_experts_read_per_layer": max(run["max_experts_read_per_layer"] for run in [*warm, cold]),
                    "expert_elems_held_m": warm[0]["expert_elems_held"] / 1e6,
                    "local_experts_per_layer": warm[0]["local_experts_per_layer"],
                    "all_experts": all_experts,
                    "warm_runs": warm,
                    "cold_run": cold,
                    "ab_releases": rep.get("ab_releases"),
                }
            )
    goals = {}
    by = {(row["case"], row["rank"]): row for row in rows}
    if "ep_zero3" in results and "ep_only" in results:
        ratios = [by["ep_zero3", r]["load_s"] / by["ep_only", r]["load_s"] for r in range(NPROC)]
        slowest = max(by["ep_zero3", r]["load_s_barrier"] for r in range(NPROC)) / max(
            by["ep_only", r]["load_s_barrier"] for r in range(NPROC)
        )
        goals["time_ep_zero3_over_ep_only"] = {
            "per_rank": ratios, "until_barrier": slowest, "goal": GOAL_TIME_RATIO,
            "ok": max(ratios) <= GOAL_TIME_RATIO,
        }
    for case in ("ep_zero3", "ep_only"):
        if case in results:
            ratios = [by[case, r]["cold_ratio"] for r in range(NPROC)]
            goals[f"cold_bytes_{case}_over_layout_min"] = {
                "per_rank": ratios, "goal": GOAL_COLD_RATIO, "ok": max(ratios) <= GOAL_COLD_RATIO,
            }
            goals[f"no_rank_all_experts_{case}"] = {"ok": not any(by[case, r]["all_experts"] for r in range(NPROC))}
    if "zero3_shard_on_read" in results:  # one layer's experts in full as working set: docs/ep_deepspeed.md
        ratios = [by["zero3_shard_on_read", r]["anon_ratio"] for r in range(NPROC)]
        goals["info_peak_anon_zero3_shard_on_read_over_share"] = {"per_rank": ratios, "ok": True}
    if "ep_zero3" in results:
        ratios = [by["ep_zero3", r]["anon_ratio"] for r in range(NPROC)]
        goals["peak_anon_ep_zero3_over_share"] = {
            "per_rank": ratios, "goal": GOAL_ANON_RATIO, "ok": max(ratios) <= GOAL_ANON_RATIO,
        }
    return {"rows": rows, "goals": goals}


def memory_figures(warm: list[dict], cold: dict, share: float) -> dict:
    """The memory columns of a summary row: median growth over the warm loads of peak anonymous and peak file-backed
    memory, and of both after the load, against the rank's `share` in bytes; the cold load's peaks beside."""
    def median_growth(key: str, base: str) -> float:
        return statistics.median(w[key] - w[base] for w in warm)

    anon = median_growth("peak_anon_mb", "anon_before_mb")
    return {
        "share_mb": share / MB,
        "peak_anon_delta_mb": anon,
        "peak_file_delta_mb": median_growth("peak_file_mb", "file_before_mb"),
        "anon_after_delta_mb": median_growth("anon_after_mb", "anon_before_mb"),
        "file_after_delta_mb": median_growth("file_after_mb", "file_before_mb"),
        "anon_ratio": anon * MB / share,
        "cold_peak_anon_delta_mb": cold["peak_anon_mb"] - cold["anon_before_mb"],
        "cold_peak_file_delta_mb": cold["peak_file_mb"] - cold["file_before_mb"],
    }


def print_memory_table(rows: list[dict]) -> None:
    """Anonymous and file-backed memory apart, per case and rank (the columns of `memory_figures`)."""
    header = (
        "| case | rank | share MB | peak anon MB over before (/ share) | peak file-backed MB over before | after the "
        "load: anon / file-backed MB over before | cold: peak anon / file-backed MB over before |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for row in rows:
        print(
            f"| {row['case']} | {row['rank']} | {row['share_mb']:.1f} | +{row['peak_anon_delta_mb']:.0f} "
            f"({row['anon_ratio']:.2f}) | +{row['peak_file_delta_mb']:.0f} | +{row['anon_after_delta_mb']:.0f} / "
            f"+{row['file_after_delta_mb']:.0f} | +{row['cold_peak_anon_delta_mb']:.0f} / "
            f"+{row['cold_peak_file_delta_mb']:.0f} |"
        )


def print_table(summary: dict) -> None:
    header = (
        "| case | rank | load s warm (median [min-max]) | +barrier s | peak RSS MB (+over before) | RSS before MB "
        "| cold load s "
        "| cold read_bytes MB | cold own copy cached MB (dense / own exp / other exp) | layout min MB | cold / min "
        "| expert elems read M (max experts/layer) | expert elems held M (local experts/layer) | all experts? |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for row in summary["rows"]:
        # a rank that only needs the headers (dense ZeRO-3, rank > 0) has no meaningful ratio
        ratio = f"{row['cold_ratio']:.2f}" if row["layout_min_mb"] >= 1 else "n/a"
        print(
            f"| {row['case']} | {row['rank']} | {row['load_s']:.2f} [{row['load_s_range'][0]:.2f}-"
            f"{row['load_s_range'][1]:.2f}] | {row['load_s_barrier']:.2f} | {row['peak_rss_mb']:.0f} "
            f"(+{row['peak_rss_delta_mb']:.0f}) | "
            f"{row['rss_before_mb']:.0f} | {row['cold_load_s']:.2f} | {row['cold_read_bytes_mb']:.1f} | "
            f"{row['cold_resident_mb']:.1f} ({row['cold_resident_dense_mb']:.1f} / "
            f"{row['cold_resident_own_experts_mb']:.1f} / {row['cold_resident_other_experts_mb']:.1f}) | "
            f"{row['layout_min_mb']:.1f} | {ratio} | {row['expert_elems_read_m']:.1f} "
            f"({row['max_experts_read_per_layer']}) | {row['expert_elems_held_m']:.1f} "
            f"({row['local_experts_per_layer']}) | {'YES' if row['all_experts'] else 'no'} |"
        )
    print()
    print_memory_table(summary["rows"])
    print()
    for name, goal in summary["goals"].items():
        ratios = ", ".join(f"{x:.2f}" for x in goal.get("per_rank", []))
        extra = f" (slowest rank until barrier: {goal['until_barrier']:.2f})" if "until_barrier" in goal else ""
        limit = f" <= {goal['goal']}" if "goal" in goal else ""
        status = "INFO" if name.startswith("info_") else ("PASS" if goal["ok"] else "FAIL")
        print(f"{status} {name}{limit}: {ratios}{extra}")


def print_release_comparison(results: dict) -> None:
    """`--ab-releases`: per case and rank, warm load time with the memory releases on against off."""
    for case, ranks in results.items():
        for r, rep in sorted(ranks.items()):
            if not rep.get("ab_releases"):
                continue
            ab = rep["ab_releases"]

            def figures(mode):
                runs = ab[mode]
                return (f"median {statistics.median(x['seconds'] for x in runs):.2f} s "
                        f"(min {min(x['seconds'] for x in runs):.2f}); with the model's release "
                        f"{statistics.median(x['with_release_seconds'] for x in runs):.2f} s, CPU "
                        f"{statistics.median(x['cpu_seconds'] for x in runs):.2f} s; peak anon "
                        f"+{statistics.median(x['peak_anon_mb'] for x in runs):.0f} MB")

            def paired(key):
                # Each round's two loads ran back to back: their difference is free of the drift between rounds, and
                # its mean over rounds of both orders free of what the first load of a pair does to the second
                return statistics.mean(a[key] - b[key] for a, b in zip(ab["on"], ab["off"]))

            on, off = ({key: statistics.median(x[key] for x in ab[m]) for key in ("seconds", "with_release_seconds")}
                       for m in ("on", "off"))
            print(f"{case} rank {r}, releases on: {figures('on')}; off: {figures('off')}; on / off: load "
                  f"{on['seconds'] / off['seconds']:.3f}, with the model's release "
                  f"{on['with_release_seconds'] / off['with_release_seconds']:.3f} ({len(ab['on'])} rounds, "
                  f"interleaved); mean difference on - off in a round: load {paired('seconds'):+.3f} s, "
                  f"with the model's release {paired('with_release_seconds'):+.3f} s")


def driver(args) -> int:
    model_config = SIZES[args.size]
    build_checkpoints(model_config)
    import safetensors
    import torch

    import transformers

    def options(case):
        # dense_zero3: upstream's dense path, not this fork's shard-on-read one (benchmarks/load_zero3_dense.py
        # compares them)
        env = {"TRANSFORMERS_ZERO3_SHARD_ON_READ": "0"} if case == "dense_zero3" else None
        return CASES[case][0], NPROC, env

    started = time.monotonic()
    rank_args = ["--runs", str(args.runs), "--size", args.size, "--ab-releases", str(args.ab_releases)]
    results, failures = launch_cases(Path(__file__), args, options, rank_args)
    if not results:
        return 1
    summary = summarize(results)
    print()
    print_table(summary)
    print_release_comparison(results)
    environment = {
        "transformers": transformers.__version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
        "python": sys.version.split()[0], "cpus": os.cpu_count(), "kernel": os.uname().release,
        "read_ahead_kb": read_ahead_kb(checkpoint_dir(0, model_config)),
    }
    payload = {"model": model_config, "size": args.size, "nproc": NPROC, "environment": environment, **summary}
    return finish("load_ep_zero3", args, payload, summary["goals"], failures, started)


def read_ahead_kb(path: Path) -> int | None:
    """read_ahead_kb of the block device that holds `path` (None when it cannot be told)."""
    try:
        dev = os.stat(path).st_dev
        block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
        for candidate in (block, block.parent):
            ra = candidate / "queue" / "read_ahead_kb"
            if ra.exists():
                return int(ra.read_text())
    except OSError:
        pass
    return None


def main() -> int:
    def add_size(parser):
        parser.add_argument("--size", choices=list(SIZES), default="small",
                            help="small: 461 MB (default); large: 2.6 GB, 5.5 x larger")
        parser.add_argument("--ab-releases", type=int, default=0, metavar="ROUNDS",
                            help="then ROUNDS pairs of warm loads with the memory releases on and off, interleaved")

    args = parse_args(
        __doc__, "load_ep_zero3", list(CASES), "warm loads measured after the warm-up load", 150, add_size
    )
    return run(args, rank_main, driver)


if __name__ == "__main__":
    sys.exit(main())
