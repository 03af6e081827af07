"""Random-access advice for checkpoint files that a rank of a sharded load reads only part of (patch 0010, own module
utils/sharded_read_advice.py; `from_pretrained` calls it through the names it imports into modeling_utils).

What it changes on disk (bytes read per rank) is measured by `make bench-load`; here, in one process: the advice
reaches the mapping safetensors reads through, slices read the same values, and single-process loads take no advice.
"""

import os
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.fork_utils.tiny_models import make_checkpoint, reference_state_dict
from transformers import AutoModelForCausalLM, modeling_utils


def vm_flags_of_mappings(path: str) -> list[list[str]]:
    """The VmFlags of each mapping of `path` in this process (from /proc/self/smaps)."""
    inode = str(os.stat(path).st_ino)
    flags, current = [], False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                current = fields[4] == inode
            elif current and fields[0] == "VmFlags:":
                flags.append(fields[1:])
    return flags


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
