"""DeepSpeed's own expert parallelism (AutoEP) under ZeRO-3 runs with the fork (patch 0007) and trains correctly:
the alternative users compare the fork's EP with."""

import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from parameterized import parameterized

from tests.deepspeed.test_ep_zero3_train import train_reference
from tests.fork_utils.launcher import launch
from tests.fork_utils.tiny_models import make_checkpoint


SCRIPT = Path(__file__).parent / "scripts" / "autoep_train.py"


@pytest.mark.multiprocess
class AutoEPTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="autoep-"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_autoep(self, family, *extra):
        checkpoint = make_checkpoint(family, self.tmp / family, seed=31).path
        args = ["--checkpoint", checkpoint, "--preset", family, *extra]
        results = launch(SCRIPT, args, nproc=2, timeout=180).check().results()
        self.assertTrue(all(r["has_moe_layers"] for r in results.values()), "AutoEP did not replace the MoE blocks")
        return checkpoint, results

    @parameterized.expand([("qwen3_moe",), ("mixtral",)])
    def test_losses_match_single_process(self, family):
        checkpoint, results = self.run_autoep(family)
        steps = len(results[0]["losses"])
        global_batches = [torch.cat([results[r]["inputs"][s] for r in (0, 1)]) for s in range(steps)]
        reference, _ = train_reference(checkpoint, global_batches, "adamw", 1e-2, results[0]["clip"])
        for step in range(steps):
            mean = (results[0]["losses"][step] + results[1]["losses"][step]) / 2
            self.assertLessEqual(abs(mean - reference[step]) / reference[step], 1e-5, f"step {step}")

    def test_router_logits_are_still_recorded(self):
        """With the aux loss on, AutoEP retargets transformers' router-logit recorder to its own router: the first
        step's aux loss of each rank equals that of the single-process model on the rank's rows."""
        from transformers import AutoModelForCausalLM

        checkpoint, results = self.run_autoep("qwen3_moe", "--aux-loss")
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        model.config.output_router_logits = True
        for rank, report in results.items():
            input_ids = report["inputs"][0]
            with torch.no_grad():
                expected = model(input_ids=input_ids, labels=input_ids)
            self.assertIsNotNone(report["aux_losses"][0], f"rank {rank}: no aux loss, router logits not recorded")
            self.assertLess(abs(report["aux_losses"][0] - expected.aux_loss.item()), 1e-5 * expected.aux_loss.item())
            self.assertLess(abs(report["losses"][0] - expected.loss.item()), 1e-5 * expected.loss.item())
