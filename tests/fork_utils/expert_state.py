"""Comparing what the ranks of an expert-parallel job hold with whole tensors: which parameters are experts, which
slice of an expert tensor a rank holds, the whole tensors rebuilt from the ranks, and the largest difference."""

from __future__ import annotations

import torch


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def expert_slice(full: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
    """The experts EP rank `ep_rank` of `ep_size` holds: [ep_rank * E/ep_size, (ep_rank + 1) * E/ep_size)."""
    return full.chunk(ep_size)[ep_rank]


def expected_local(name: str, full: torch.Tensor, rank: int, ep_size: int) -> torch.Tensor:
    """What global rank `rank` holds of `full`: its experts' slice (EP groups of consecutive ranks), else all of it."""
    return expert_slice(full, rank % ep_size, ep_size) if is_expert_param(name) else full


def assemble_experts(results: dict, key: str, ep_size: int) -> dict[str, torch.Tensor]:
    """Whole tensors from the ranks' gathered states: dense from rank 0, experts concatenated in EP-rank order."""
    by_ep_rank = {}
    for report in results.values():
        by_ep_rank.setdefault(report["ep_rank"], report[key])
    full = {}
    for name, tensor in results[0][key].items():
        full[name] = torch.cat([by_ep_rank[r][name] for r in range(ep_size)]) if is_expert_param(name) else tensor
    return full


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    """The largest absolute difference over the tensors of `a` (each must be in `b`), and its key."""
    worst = max(a, key=lambda k: max_abs_diff(a[k], b[k]))
    return max_abs_diff(a[worst], b[worst]), worst
