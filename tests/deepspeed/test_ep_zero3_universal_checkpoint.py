"""DeepSpeed's Universal Checkpoint (`ds_to_universal`, then `"checkpoint": {"load_universal": true}`) and the fork's
expert-parallel models under ZeRO-3.

What DeepSpeed 0.19.8 does with them, unguarded:
- `ds_to_universal` runs on a checkpoint of an expert-parallel model and joins the partitions of an expert tensor in
  rank order. With as many EP ranks as ranks (2 ranks, EP 2 here) that is the whole tensor by chance; with more ranks
  than EP ranks it scrambles the experts, silently (4 ranks, EP 2: experts 1 and 2 swapped, `make test-multinode`).
- Its universal loader, into an expert-parallel model, cuts each rank's partition out of the whole tensor as if the
  rank held every expert: on 2 ranks with EP 2 it stops with "start (24576) + length (16384) exceeds dimension size",
  whatever model the checkpoint came from.

So the fork refuses, on every rank and before anything is loaded: any Universal Checkpoint into an expert-parallel
model, and one converted from an expert-parallel checkpoint into a model without EP, naming its own way to change
topology (`engine.load_checkpoint` / `load_checkpoint_on_new_topology` on the checkpoint `ds_to_universal` read).
The twin without EP keeps DeepSpeed's Universal Checkpoint as upstream: a checkpoint of one process resumes on 2 ranks
at parity with one process trained on the same global batches, also through the fork's wrap of `load_checkpoint`.
"""

import os
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

import pytest
import torch

from tests.deepspeed.test_ep_zero3_reshard import MOMENT_KEYS, train_reference, whole_state
from tests.fork_utils.expert_state import is_expert_param, max_diff
from tests.fork_utils.launcher import launch, run_commands
from tests.fork_utils.tiny_models import make_checkpoint


SCRIPTS = Path(__file__).parent / "scripts"
TRAIN_SCRIPT = SCRIPTS / "ep_reshard.py"
UNIVERSAL_SCRIPT = SCRIPTS / "ep_universal.py"
TIMEOUT = 180
STEPS = 3
FULL = os.environ.get("EPFORK_MULTINODE_FULL") == "1"
REFUSED_FOR_EP_MODELS = "DeepSpeed's Universal Checkpoint cannot be loaded into an expert-parallel model"
REFUSED_FROM_EP_CHECKPOINTS = "is a Universal Checkpoint converted from a checkpoint of an expert-parallel model"
# What both refusals must name: the fork's way to change topology, from the checkpoint ds_to_universal read
FORKS_WAY = ("load_checkpoint_on_new_topology(engine, load_dir)", "without `load_universal`|remove `load_universal`")


def universal_tensor(universal_dir: Path, name: str, key: str = "fp32") -> torch.Tensor:
    """What `ds_to_universal` wrote for one parameter: a flat tensor for ZeRO-3 (or a dict holding it)."""
    tensor = torch.load(universal_dir / "zero" / name / f"{key}.pt", weights_only=False)
    return tensor["param"] if isinstance(tensor, dict) else tensor


@pytest.mark.multiprocess
class EPZero3UniversalCheckpointTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-universal-"))
        cls.checkpoint = make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=31).path
        cls.runs = {}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def train_and_convert(self, name: str, nproc: int, ep_size: int):
        """`STEPS` steps on `nproc` ranks with `ep_size`, saved (`engine.save_checkpoint`), then converted with
        `python -m deepspeed.checkpoint.ds_to_universal` as DeepSpeed documents it. Returns the checkpoint folder (with
        `latest` and `latest_universal`), the Universal Checkpoint's folder and the ranks' final weights and moments
        (whole tensors). Run once per class."""
        if name not in self.runs:
            folder = self.tmp / name
            args = ["--checkpoint", self.checkpoint, "--ep-size", ep_size, "--steps", STEPS,
                    "--save-checkpoint", folder]
            results = launch(TRAIN_SCRIPT, args, nproc=nproc, timeout=TIMEOUT).check().results()
            universal = folder / f"global_step{STEPS}_universal"
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                       folder / f"global_step{STEPS}", "--output_folder", universal, "--num_extract_workers", "1",
                       "--num_merge_workers", "1"]
            (converted,) = run_commands([command], timeout=TIMEOUT)
            self.assertEqual(converted.returncode, 0, converted.output[-3000:])
            self.assertEqual((folder / "latest_universal").read_text(), universal.name)
            self.runs[name] = folder, universal, whole_state(results, "final", ep_size)
        return self.runs[name]

    def ep_run(self):
        return self.train_and_convert("2ranks-ep2", 2, 2)

    def plain_run(self):
        return self.train_and_convert("1rank-plain", 1, 1)

    def assert_refused(self, message: str, error: str | None, what: str):
        self.assertIsNotNone(error, f"{what}: loaded, not refused")
        self.assertIn(message, error, what)
        self.assertRegex(error, "NotImplementedError")
        self.assertIn(FORKS_WAY[0], error, f"{what}: does not name the fork's way")
        self.assertRegex(error, FORKS_WAY[1], f"{what}: does not say to load without load_universal")

    def test_ds_to_universal_joins_expert_partitions_in_rank_order(self):
        """`ds_to_universal` runs on the expert-parallel checkpoint of 2 ranks with EP 2, and writes each parameter as
        the fork's offline reader reads it (experts flat, whole: each rank's partition was its EP rank's experts, and
        the ranks are in EP order). The fork tells the two Universal Checkpoints apart by the expert sub-groups of
        their optimizer states (`universal_checkpoint_has_experts`)."""
        from transformers.integrations.deepspeed_expert_parallel_checkpoint import (
            get_fp32_state_dict_from_zero_checkpoint,
        )
        from transformers.integrations.deepspeed_expert_parallel_reshard import universal_checkpoint_has_experts

        folder, universal, final = self.ep_run()
        weights = get_fp32_state_dict_from_zero_checkpoint(str(folder))
        self.assertEqual(sorted(weights), sorted(final["param"]))
        self.assertTrue(any(is_expert_param(name) for name in weights))
        for name, tensor in weights.items():
            self.assertTrue(torch.equal(tensor, final["param"][name]), f"{name}: the offline reader")
            converted = universal_tensor(universal, name)
            self.assertEqual(converted.numel(), tensor.numel(), f"{name}: not the whole tensor")
            self.assertTrue(torch.equal(converted.reshape(tensor.shape), tensor), f"{name}: ds_to_universal")
        self.assertTrue(universal_checkpoint_has_experts(str(universal)))
        self.assertFalse(universal_checkpoint_has_experts(str(self.plain_run()[1])))

    def test_expert_parallel_model_refuses_universal_checkpoints_on_every_rank(self):
        """2 ranks, EP 2, `load_universal`: `engine.load_checkpoint` (the fork's wrap) and the Trainer's resume refuse
        the Universal Checkpoints of the expert-parallel and of the plain run on every rank, naming the fork's way.
        Negative control: DeepSpeed's own loader, unwrapped, does not load it either (it stops on a size mismatch)."""
        (ep_folder, *_), (plain_folder, *_) = self.ep_run(), self.plain_run()
        tries = [("load_checkpoint", ep_folder), ("load_checkpoint", plain_folder), ("trainer", ep_folder),
                 ("trainer", plain_folder), ("deepspeed_only", ep_folder)]
        args = ["--checkpoint", self.checkpoint, "--ep-size", 2]
        for loader, folder in tries:
            args += ["--try", loader, folder]
        results = launch(UNIVERSAL_SCRIPT, args, nproc=2, timeout=TIMEOUT).check().results()
        self.assertEqual(sorted(results), [0, 1])
        for rank, report in results.items():
            self.assertTrue(report["load_universal"], f"rank {rank}: the config's load_universal not read")
            self.assertEqual([(loader, Path(folder)) for loader, folder, _ in report["tries"]], tries)
            *refused, (_, _, deepspeeds) = report["tries"]
            for loader, folder, error in refused:
                self.assert_refused(REFUSED_FOR_EP_MODELS, error, f"rank {rank}, {loader} of {Path(folder).name}")
            self.assertIsNotNone(deepspeeds, f"rank {rank}: DeepSpeed's own universal loader loaded it")
            self.assertNotIn(REFUSED_FOR_EP_MODELS, deepspeeds)
            self.assertRegex(deepspeeds, "exceeds dimension size", f"rank {rank}")

    def test_plain_model_resumes_universal_checkpoint_on_2_ranks_and_refuses_one_from_ep(self):
        """The twin without EP, on 2 ranks with the fork's wrap of `load_checkpoint` in place: the Universal Checkpoint
        of the plain run of one process loads exactly (weights and moments the run ended with, its step count) and the
        next steps are at parity with one process trained on the same global batches (losses, weights, moments). Before
        that, the one converted from the expert-parallel checkpoint is refused on every rank, by `load_checkpoint` and
        by the Trainer's resume."""
        (ep_folder, ep_universal, _), (plain_folder, _, saved) = self.ep_run(), self.plain_run()
        args = ["--checkpoint", self.checkpoint, "--ep-size", 1, "--install-fork-wrap", "--try", "load_checkpoint",
                ep_folder, "--try", "trainer", ep_folder, "--resume-from", plain_folder, "--first-step", STEPS,
                "--steps", STEPS]
        results = launch(UNIVERSAL_SCRIPT, args, nproc=2, timeout=TIMEOUT).check().results()
        self.assertEqual(sorted(results), [0, 1])
        for rank, report in results.items():
            self.assertEqual(len(report["tries"]), 2)
            for loader, _, error in report["tries"]:
                self.assert_refused(REFUSED_FROM_EP_CHECKPOINTS, error, f"rank {rank}, {loader}")
                self.assertIn(str(ep_universal), error)
            self.assertEqual(report["global_steps_after_load"], STEPS, f"rank {rank}: the engine's step count")

        loaded = whole_state(results, "loaded", 1)
        for kind in ("param", *MOMENT_KEYS):
            for name, tensor in saved[kind].items():
                self.assertTrue(torch.equal(loaded[kind][name], tensor), f"{kind} {name} not loaded exactly")

        ref_losses, ref_state = train_reference(self.checkpoint, 2 * STEPS)
        mean_losses = [sum(report["losses"][step] for report in results.values()) / 2 for step in range(STEPS)]
        for got, want in zip(mean_losses, ref_losses[STEPS:]):
            self.assertLessEqual(abs(got - want) / want, 1e-5, f"losses {mean_losses} vs {ref_losses[STEPS:]}")
        # The noise floor: the reference's global batch summed in the ranks' two halves
        _, reordered = train_reference(self.checkpoint, 2 * STEPS, chunks=2)
        final = whole_state(results, "final", 1)
        for kind in ("param", *MOMENT_KEYS):
            floor, _ = max_diff(reordered[kind], ref_state[kind])
            scale = max(tensor.abs().max().item() for tensor in ref_state[kind].values())
            diff, worst = max_diff(final[kind], ref_state[kind])
            self.assertLessEqual(diff, max(10 * floor, 1e-4 * scale), f"{kind} off by {diff} at {worst}")

    @pytest.mark.topology
    @unittest.skipUnless(FULL, "make test-multinode runs it (EPFORK_MULTINODE_FULL=1)")
    def test_ds_to_universal_scrambles_experts_of_4_ranks_with_ep2(self):
        """4 ranks, EP 2 (each EP rank's experts partitioned over 2 ranks): `ds_to_universal` runs without a word and
        writes experts 1 and 2 swapped (the partitions of ranks 0, 1, 2, 3 joined in rank order: EP rank 0's first
        half, EP rank 1's first half, ...). The load refusal above is what stops it."""
        from transformers.integrations.deepspeed_expert_parallel_reshard import universal_checkpoint_has_experts

        _, universal, final = self.train_and_convert("4ranks-ep2", 4, 2)
        self.assertTrue(universal_checkpoint_has_experts(str(universal)))
        experts = [name for name in final["param"] if is_expert_param(name)]
        self.assertTrue(experts)
        for name in experts:
            whole = final["param"][name]
            converted = universal_tensor(universal, name).reshape(whole.shape)
            in_place = [torch.equal(converted[e], whole[e]) for e in range(len(whole))]
            self.assertEqual(in_place, [True, False, False, True], name)
            self.assertTrue(torch.equal(converted[1], whole[2]) and torch.equal(converted[2], whole[1]), name)
        for name in set(final["param"]) - set(experts):
            self.assertTrue(torch.equal(universal_tensor(universal, name), final["param"][name].reshape(-1)), name)


if __name__ == "__main__":
    unittest.main()
