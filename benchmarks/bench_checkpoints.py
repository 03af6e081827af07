"""Benchmark checkpoints: built once under `.cache/bench/`, then copied once per rank, so that each rank reads a copy
of its own from disk and page-cache hits are never credited to the other rank."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def per_rank_checkpoint(base: Path, rank: int) -> Path:
    return base / f"rank{rank}"


def build_per_rank_checkpoints(base: Path, nproc: int, make_model: Callable, max_shard_size: str = "150MB") -> None:
    """Save `make_model()` (seeded) under `base`, then copy it per rank; a copy is complete once its marker exists."""
    if all((per_rank_checkpoint(base, r) / ".complete").exists() for r in range(nproc)):
        return
    import torch

    print(f"building the benchmark checkpoint under {base} (once)", flush=True)
    shutil.rmtree(base, ignore_errors=True)
    torch.manual_seed(0)
    staging = base / "staging"
    model = make_model()
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    del model
    for rank in range(nproc):
        shutil.copytree(staging, per_rank_checkpoint(base, rank))
        (per_rank_checkpoint(base, rank) / ".complete").touch()
    shutil.rmtree(staging)
