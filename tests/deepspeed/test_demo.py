"""The README's demo command runs: every rank's experts equal the checkpoint, and training matches one process."""

import re
import subprocess
import sys
import unittest

import pytest

from tests.fork_utils.launcher import REPO_ROOT


@pytest.mark.multiprocess
class DemoTest(unittest.TestCase):
    def test_demo_loads_each_ranks_experts(self):
        proc = subprocess.run(
            [sys.executable, "examples/ep_deepspeed/run_demo.py", "--timeout", "200"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        )
        output = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, output[-5000:])
        self.assertEqual(len(re.findall(r"\[rank \d\] loaded with EP 2 under DeepSpeed ZeRO-3: experts equal", output)), 2)
        self.assertIn("[rank 0] model.layers.0.mlp.experts.gate_up_proj: holds experts 0..1, MATCH", output)
        self.assertIn("[rank 1] model.layers.0.mlp.experts.gate_up_proj: holds experts 2..3, MATCH", output)
        self.assertNotIn("MISMATCH", output)
        self.assertEqual(len(re.findall(r"(?m)^demo: +\d+ \|", output)), 5, "one loss line per training step")
        self.assertIn("demo: training losses match the single-process reference", output)
        self.assertIn("weights match the single-process reference", output)
