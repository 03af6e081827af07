"""Record which collectives a rank runs, over which ranks, with how many bytes: the layout checks of multi-node tests.

`record_collectives()` must run before transformers and DeepSpeed are imported (they bind some collectives by name at
import). It wraps the collectives of `torch.distributed` and of its functional collectives (the expert-parallel
all-to-all, DTensor), counting per (operation, group ranks): calls and payload bytes (the tensor this rank sends or
contributes). `recorded()` returns the tally; `clear()` starts a new one (e.g. after loading, to count the steps only).
"""

from __future__ import annotations

import functools
from collections import defaultdict


_TALLY: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(lambda: [0, 0])
_INSTALLED = False

# name -> index of the tensor argument this rank contributes, and whether the group is given by name (functional)
_C10D = {
    "all_reduce": 0, "reduce": 0, "broadcast": 0, "all_gather": 1, "all_gather_into_tensor": 1, "gather": 0,
    "scatter": 0, "reduce_scatter": 1, "reduce_scatter_tensor": 1, "all_to_all": 1, "all_to_all_single": 1,
    "barrier": None, "all_gather_object": 1, "broadcast_object_list": 0,
}
# functional collectives: name -> positional index of the group argument (the tensor is the first)
_FUNCTIONAL = {
    "all_reduce": 2, "all_gather_tensor": 2, "all_gather_tensor_autograd": 2, "reduce_scatter_tensor": 3,
    "reduce_scatter_tensor_autograd": 3, "all_to_all_single": 3, "all_to_all_single_autograd": 3,
}


def _nbytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _group_ranks(group) -> tuple[int, ...]:
    import torch.distributed as dist

    if group is None:
        return tuple(range(dist.get_world_size()))
    if isinstance(group, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group)
    elif isinstance(group, (list, tuple)):
        # functional collectives also take a list of ranks
        return tuple(group)
    elif not isinstance(group, dist.ProcessGroup):
        # a DeviceMesh (functional collectives accept one): its group for a 1-D mesh
        group = group.get_group()
    return tuple(dist.get_process_group_ranks(group))


def _wrap(module, name: str, tensor_index: int | None, group_position: int | None) -> None:
    original = getattr(module, name, None)
    if original is None or getattr(original, "_records_collectives", False):
        return

    @functools.wraps(original)
    def recording(*args, **kwargs):
        group = kwargs.get("group")
        if group is None and group_position is not None and len(args) > group_position:
            group = args[group_position]
        try:
            ranks = _group_ranks(group)
        except Exception:
            ranks = ("?",)
        sent = _nbytes(args[tensor_index]) if tensor_index is not None and len(args) > tensor_index else 0
        tally = _TALLY[(name, ranks)]
        tally[0] += 1
        tally[1] += sent
        return original(*args, **kwargs)

    recording._records_collectives = True
    setattr(module, name, recording)


def record_collectives() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    for name, index in _C10D.items():
        _wrap(dist, name, index, None)
        _wrap(dist.distributed_c10d, name, index, None)
    for name, group_position in _FUNCTIONAL.items():
        _wrap(funcol, name, 0, group_position)
    _INSTALLED = True


def recorded() -> dict[tuple[str, tuple[int, ...]], tuple[int, int]]:
    """(operation, ranks of its group) -> (calls, payload bytes of this rank)."""
    return {key: tuple(value) for key, value in _TALLY.items()}


def clear() -> None:
    _TALLY.clear()
