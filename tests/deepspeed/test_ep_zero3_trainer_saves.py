"""The Trainer's save options with an expert-parallel model under DeepSpeed ZeRO-3.

`save_only_model` checkpoints and `push_to_hub` must hold the whole model (every expert gathered across the
expert-parallel group), equal to the training state; with `save_on_each_node` the main rank of each node writes.
"""

import json
import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes

from tests.deepspeed import test_ep_zero3_save as save_tests
from tests.fork_utils.expert_state import assemble_experts
from tests.fork_utils.launcher import launch
from tests.fork_utils.tiny_models import make_checkpoint


TRAIN = Path(__file__).parent / "scripts" / "ep_train.py"


@pytest.mark.multiprocess
class EPZero3TrainerSaveOptionsTest(unittest.TestCase):
    # Imported through the module: a test class imported by name would be collected here too
    assert_checkpoint_holds = save_tests.EPZero3SaveTest.assert_checkpoint_holds

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-trainer-saves-"))
        cls.checkpoint = make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=43).path

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def train(self, *extra, steps=3):
        args = ["--checkpoint", self.checkpoint, "--entry", "trainer", "--ep-size", 2, "--steps", steps,
                "--optimizer", "adamw", "--lr", "1e-3", *extra]
        return launch(TRAIN, args, nproc=2, timeout=save_tests.TIMEOUT).check().results()

    def test_save_only_model_checkpoints_hold_every_expert(self):
        output_dir = self.tmp / "save-only-model"
        results = self.train("--save-steps", 3, "--save-only-model", "--output-dir", output_dir)
        checkpoint = output_dir / "checkpoint-3"
        self.assertFalse(list(checkpoint.glob("global_step*")), "save_only_model must not write DeepSpeed's state")
        self.assert_checkpoint_holds(checkpoint, assemble_experts(results, "final", ep_size=2), self.checkpoint)

    def test_push_to_hub_uploads_the_whole_model(self):
        output_dir = self.tmp / "push-to-hub"
        results = self.train("--push-to-hub", "--output-dir", output_dir)
        uploaded = results[0]["pushed"]
        self.assertIsNone(results[1]["pushed"], "only rank 0 uploads")
        self.assertIn("config.json", uploaded)
        self.assertNotIn("distributed_config", json.loads(uploaded["config.json"]))
        # What was uploaded is the folder the Trainer saved: the whole model, equal to the training state.
        self.assert_checkpoint_holds(output_dir, assemble_experts(results, "final", ep_size=2), self.checkpoint)
        weights = load_safetensors_bytes(uploaded["model.safetensors"])
        saved = load_safetensors_bytes((output_dir / "model.safetensors").read_bytes())
        self.assertEqual(set(weights), set(saved))
        for name, tensor in saved.items():
            self.assertTrue(torch.equal(weights[name], tensor), name)


class WritingRanksTest(unittest.TestCase):
    """Which ranks write in a gathering save, from each rank's `(is_main_process, hostname)` (multi-node runs with each
    node's own disk: tests/deepspeed/test_ep_zero3_multinode.py)."""

    def writers(self, *calls):
        from transformers.integrations.deepspeed_expert_parallel_save import _writing_ranks

        return _writing_ranks(list(calls))

    def test_the_main_process_alone(self):
        # accelerate's `is_main_process`, the Trainer without `save_on_each_node`
        self.assertEqual(self.writers((True, "a"), (False, "a"), (False, "b"), (False, "b")), [0])

    def test_the_main_rank_of_each_node(self):
        # the Trainer's `save_on_each_node`, accelerate's `is_local_main_process`
        self.assertEqual(self.writers((True, "a"), (False, "a"), (True, "b"), (False, "b")), [0, 2])
        self.assertEqual(self.writers((True, "a"), (True, "b")), [0, 1])

    def test_the_default_on_every_rank_writes_once_per_host(self):
        self.assertEqual(self.writers((True, "a"), (True, "a")), [0])
        self.assertEqual(self.writers((True, "a"), (True, "a"), (True, "b"), (True, "b")), [0, 2])

    def test_nobody(self):
        self.assertEqual(self.writers((False, "a"), (False, "a")), [])
