"""Random-access advice for checkpoint files that a rank of a sharded load reads only part of (patch 0010, own module
utils/sharded_read_advice.py; `from_pretrained` calls it through the names it imports into modeling_utils).

What it changes on disk (bytes read per rank) is measured by `make bench-load`; here, in one process: the advice
reaches the mapping safetensors reads through, slices read the same values, the pages of a slice are released once its
tensor is gone (and read the same values again through another view), and single-process loads take no advice.
"""

import gc
import mmap
import os
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.fork_utils.tiny_models import make_checkpoint, reference_state_dict, tiny_config
from transformers import AutoModelForCausalLM, modeling_utils
from transformers.integrations.deepspeed_expert_parallel import (
    expert_load_conversions,
    rows_of_largest_partition,
    zero3_load_peak_bytes,
)


def smaps_fields_of_mappings(path: str, field: str) -> list[list[str]]:
    """The values of `field` (e.g. "VmFlags:", "Rss:") for each mapping of `path` in this process (/proc/self/smaps)."""
    inode = str(os.stat(path).st_ino)
    values, current = [], False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                current = fields[4] == inode
            elif current and fields[0] == field:
                values.append(fields[1:])
    return values


def vm_flags_of_mappings(path: str) -> list[list[str]]:
    return smaps_fields_of_mappings(path, "VmFlags:")


def resident_bytes_of_mappings(path: str) -> int:
    """The resident bytes (Rss, in kB in smaps) of this process's mappings of `path`."""
    return sum(int(values[0]) * 1024 for values in smaps_fields_of_mappings(path, "Rss:"))


@unittest.skipUnless(sys.platform == "linux", "madvise and /proc are Linux-only")
class ShardedReadAdviceTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.path = str(Path(self.tmp.name) / "weights.safetensors")
        generator = torch.Generator().manual_seed(0)
        self.tensors = {
            "a": torch.randn(64, 96, generator=generator),
            "b": torch.randn(8, 32, 16, generator=generator),
            "c": torch.randn(5, generator=generator),
        }
        save_file(self.tensors, self.path)

    def test_mapping_gets_random_access_advice(self):
        handle = safe_open(self.path, framework="pt", device="cpu", backend="mmap")
        self.assertTrue(vm_flags_of_mappings(self.path), "safetensors no longer maps the file: revisit patch 0010")
        self.assertFalse(any("rr" in flags for flags in vm_flags_of_mappings(self.path)))
        self.assertTrue(modeling_utils._advise_random_access(self.path))
        self.assertTrue(all("rr" in flags for flags in vm_flags_of_mappings(self.path)))
        del handle

    def test_unmapped_file_is_reported(self):
        self.assertFalse(modeling_utils._advise_random_access(self.path))

    def test_random_access_slice_reads_the_same_values(self):
        handle = safe_open(self.path, framework="pt", device="cpu", backend="mmap")
        modeling_utils._advise_random_access(self.path)
        for key, index in [("a", ...), ("a", (slice(16, 48),)), ("a", (slice(None), slice(0, 48))),
                           ("b", (slice(2, 6),)), ("c", ...)]:
            wrapped = modeling_utils._RandomAccessSlice(handle.get_slice(key))
            self.assertEqual(wrapped.get_shape(), list(self.tensors[key].shape))
            self.assertEqual(wrapped.get_dtype(), "F32")
            self.assertTrue(torch.equal(wrapped[index], self.tensors[key][index]), f"{key}[{index}]")

    def test_slice_pages_are_released_once_the_tensor_is_gone(self):
        path = str(Path(self.tmp.name) / "large.safetensors")
        values = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))  # 1 MB: 256 pages
        save_file({"x": values, "y": values.flip(0)}, path)
        handle = safe_open(path, framework="pt", device="cpu", backend="mmap")
        self.assertTrue(modeling_utils._advise_random_access(path))
        kept = handle.get_slice("x")[...]  # another view of the same bytes, alive throughout
        for key, wrap, released in [("y", False, False), ("x", True, True)]:
            view = (modeling_utils._RandomAccessSlice(handle.get_slice(key)) if wrap else handle.get_slice(key))[...]
            view.sum()  # maps every page of the tensor
            before = resident_bytes_of_mappings(path)
            self.assertGreaterEqual(before, values.nbytes)
            del view
            gc.collect()
            after = resident_bytes_of_mappings(path)
            if released:  # all but the two pages at its edges, which a neighbour may share
                self.assertLessEqual(before - after, values.nbytes)
                self.assertGreaterEqual(before - after, values.nbytes - 2 * mmap.PAGESIZE)
            else:  # the negative control: a plain slice leaves its pages mapped
                self.assertEqual(after, before)
        # The released pages are mapped again from the file, unchanged, for the view still alive
        self.assertTrue(torch.equal(kept, values))
        del kept, handle

    def test_tensors_outside_the_checkpoint_mappings_are_never_released(self):
        # A slice that hands out anonymous memory (a copy, not a view of the mapped file) must keep its values
        handle = safe_open(self.path, framework="pt", device="cpu", backend="mmap")
        self.assertTrue(modeling_utils._advise_random_access(self.path))
        values = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2))
        expected = values.clone()

        class CopyingSlice:
            def __getitem__(self, index):
                return values[index]

        view = modeling_utils._RandomAccessSlice(CopyingSlice())[...]
        del view
        gc.collect()
        self.assertTrue(torch.equal(values, expected))
        del handle

    def test_zero3_load_peak_bytes_from_a_meta_model(self):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), dtype=torch.float32)
        params = dict(model.named_parameters())
        experts = {name: p.numel() * 4 for name, p in params.items() if ".experts." in name}
        dense = sum(p.numel() * 4 for name, p in params.items() if name not in experts)
        self.assertTrue(experts, "the tiny model has no fused expert parameters: revisit the test")
        ep = zero3_load_peak_bytes(model, world_size=2, ep_size=2)
        self.assertEqual(ep["share"], dense + sum(experts.values()) // 2)
        self.assertEqual(ep["working_set"], max(experts.values()) // 2)
        self.assertEqual(ep["peak"], ep["share"] + ep["working_set"])
        zero3 = zero3_load_peak_bytes(model, world_size=2)
        self.assertEqual(zero3["share"], sum(-(-p.numel() // 2) * 4 for p in params.values()))
        # Twice the experts of gate_up_proj a rank's partition spans (2 of 4): its gate and up stacks, then their
        # concatenation
        gate_up = max(n for name, n in experts.items() if name.endswith("gate_up_proj"))
        self.assertEqual(zero3["working_set"], 2 * gate_up // 2)
        conversions = expert_load_conversions(model)
        self.assertEqual(conversions["model.layers.0.mlp.experts.gate_up_proj"], (2, True))
        self.assertEqual(conversions["model.layers.0.mlp.experts.down_proj"], (1, True))

    def test_rows_of_largest_partition(self):
        self.assertEqual(rows_of_largest_partition(rows=4, numel=4 * 10, world_size=2), 2)  # rows 0-1, 2-3
        self.assertEqual(rows_of_largest_partition(rows=4, numel=4 * 10, world_size=3), 2)  # [0, 14) [14, 28) [28, 40)
        self.assertEqual(rows_of_largest_partition(rows=4, numel=4 * 10, world_size=8), 1)  # 5 elements, half a row
        self.assertEqual(rows_of_largest_partition(rows=3, numel=3 * 7, world_size=2), 2)  # [0, 11) spans rows 0-1
        self.assertEqual(rows_of_largest_partition(rows=16, numel=16 * 6, world_size=1), 16)

    def test_no_working_set_without_weight_converters(self):
        """gemma4 stores its experts fused: the shard-on-read path reads each partition as it is stored."""
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(tiny_config("gemma4_text"), dtype=torch.float32)
        self.assertEqual(expert_load_conversions(model), {})
        self.assertEqual(zero3_load_peak_bytes(model, world_size=2)["working_set"], 0)

    def test_single_process_load_takes_no_advice(self):
        checkpoint = make_checkpoint("qwen3_moe", Path(self.tmp.name) / "moe", seed=3)
        advise = modeling_utils._advise_random_access
        with mock.patch.object(modeling_utils, "_advise_random_access", wraps=advise) as spy:
            model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32)
        spy.assert_not_called()
        reference = reference_state_dict(checkpoint.path)
        for name, param in model.state_dict().items():
            self.assertTrue(torch.equal(param, reference[name]), name)


if __name__ == "__main__":
    unittest.main()
