# Copyright 2026 The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Random-access advice for the checkpoint files that a rank of a sharded load reads only part of.

With a device mesh (expert, tensor or FSDP shard-on-read, expert parallelism under DeepSpeed ZeRO-3 included) each rank
takes only its slices of each safetensors file, but every rank pulled the whole checkpoint from disk: safetensors maps
the whole file for the `mmap` backend, through a descriptor that torch advised `POSIX_FADV_SEQUENTIAL` and closed, so
each page fault reads twice the device's read-ahead around it, and the experts of different ranks interleave in the file
(keys sort e0, e1, e10, ..., e2, ...). For a sharded load with the mmap backend, `from_pretrained` gives the file's
mappings `MADV_RANDOM` (`_advise_random_access`) and reads each slice it takes ahead, exactly its bytes, with
`MADV_WILLNEED` (`_RandomAccessSlice`). The proper home for this is safetensors (an access-pattern option for
`safe_open`); until it has one, it stays here.

The same loads also keep their memory to what they hold plus one conversion group (docs/ep_deepspeed.md, "Memory at
load"): the mapped pages of each slice are released once the tensor taken out of it is gone (consumed by a conversion,
or copied into the model), and the heap a conversion freed is given back to the OS after each group
(`_release_freed_heap`).
"""

import ctypes
import functools
import mmap
import os
import sys
import weakref

import torch


# The address ranges of the checkpoint mappings advised by `_advise_random_access`, per (device, inode) of the file,
# replaced each time that file is advised again: only pages inside them are ever released (`_release_pages`)
_advised_mappings: dict[tuple[str, int], list[tuple[int, int]]] = {}


@functools.lru_cache(maxsize=1)
def _libc_madvise():
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) on [address, address + length), widened to whole pages; best effort (it is only advice)."""
    start = address - address % mmap.PAGESIZE
    _libc_madvise()(start, address + length - start, advice)


def _release_pages(storage, address: int, length: int) -> None:
    """Drop this process's mapping of the whole pages inside [address, address + length) (`MADV_DONTNEED`).

    Only for pages of a private file mapping that nothing wrote to: their contents stay in the page cache (the kernel's
    reclaimable memory, and a later touch maps them again from it), they just no longer count in this process's
    resident memory. Pages at the edges, which a neighbouring tensor may share, are left mapped. `storage` is the
    mapping's: held until now, it keeps the range mapped (never reused by another allocation) while it is advised.
    """
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _libc_madvise()(start, end - start, mmap.MADV_DONTNEED)


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_heap() -> None:
    """Give the heap memory freed since the last call back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    A weight conversion builds each fused tensor out of intermediates (e.g. per-expert tensors stacked, then gate and
    up concatenated) and frees them. glibc raises its mmap threshold to the size of the freed blocks (up to 32 MB), so
    the next group's intermediates come from the heap, and the freed holes between the tensors the model keeps are not
    returned: measured on the load benchmark (8 MB intermediates), the anonymous memory of each rank grew by 1.4 x what
    it loaded. Called after each conversion group of a sharded load, it keeps the working set to one group.
    """
    malloc_trim = _libc_malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


def _advise_random_access(checkpoint_file: str) -> bool:
    """Give random-access advice to this process's mappings of a safetensors file it reads only part of.

    A rank of a sharded load (expert, tensor or FSDP shard-on-read) takes only its slices of each file. safetensors
    maps the whole file for the `mmap` backend, through a file descriptor that torch advised `POSIX_FADV_SEQUENTIAL`
    and closed, so every page fault reads around it twice the device's read-ahead (16 MB for `read_ahead_kb=8192`):
    with the experts of different ranks interleaved in the file (keys sort e0, e1, e10, ..., e2, ...), each rank
    pulled the whole checkpoint from disk. `posix_fadvise(POSIX_FADV_RANDOM)` on a descriptor of our own does not
    change that read-ahead, which belongs to the closed one; `madvise(MADV_RANDOM)` on the mapping does. Slices are
    then read ahead exactly, see `_RandomAccessSlice`. Returns whether a mapping of the file was found (Linux only).
    """
    if sys.platform != "linux" or not hasattr(mmap, "MADV_RANDOM"):
        return False
    stat = os.stat(checkpoint_file)
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}"
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and fields[4] == str(stat.st_ino) and fields[3] == device:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    _madvise(start, end - start, mmap.MADV_RANDOM)
                    ranges.append((start, end))
    except OSError:
        return False
    _advised_mappings[device, stat.st_ino] = ranges
    return bool(ranges)


def _in_advised_mapping(address: int, length: int) -> bool:
    """Whether [address, address + length) lies in a checkpoint mapping advised by `_advise_random_access`: a tensor
    that safetensors copied instead of viewing the mapping (anonymous memory) must never be released."""
    return any(
        start <= address and address + length <= end for ranges in _advised_mappings.values() for start, end in ranges
    )


class _RandomAccessSlice:
    """A safetensors slice of a file mapped with random-access advice (`_advise_random_access`). The kernel no longer
    reads ahead around page faults there, so a tensor taken out of the slice is read ahead here, exactly its bytes
    (`MADV_WILLNEED`), instead of one 4 KB read per page fault. Once that tensor is gone (e.g. a per-expert view
    stacked into the fused parameter), its pages are released from this process (`_release_pages`), so the mapped
    pages of a load do not add up to the checkpoint's size while the mapping stays open."""

    def __init__(self, safe_slice):
        self._slice = safe_slice

    def __getitem__(self, index):
        tensor = self._slice[index]
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.numel():
            if tensor.is_contiguous():
                length = tensor.nbytes
            else:  # a strided view (e.g. sharded along an inner dim) spans from its first to its last element
                length = (sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())) + 1) * tensor.element_size()
            _madvise(tensor.data_ptr(), length, mmap.MADV_WILLNEED)
            if _in_advised_mapping(tensor.data_ptr(), length):
                weakref.finalize(tensor, _release_pages, tensor.untyped_storage(), tensor.data_ptr(), length)
        return tensor

    def get_shape(self):
        return self._slice.get_shape()

    def get_dtype(self):
        return self._slice.get_dtype()
