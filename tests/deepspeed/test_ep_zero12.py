"""Prototype (issue 24): expert parallelism under DeepSpeed ZeRO stages 1 and 2.

2 CPU ranks under torchrun, tiny Qwen3-MoE loaded with `DistributedConfig(ep_size=2)` under a ZeRO stage 1 or 2 config
(the prototype switched on with `TRANSFORMERS_EP_ZERO12_PROTOTYPE=1`), `deepspeed.initialize` with a torch AdamW of one
group, which `deepspeed.initialize` splits into dense and expert groups (the fork's hand-over), and the `Trainer`:
3 steps at parity with one process on the same global batches (ep_reshard's batches; the losses, the gradient norms,
and the weights within the noise floor of `test_ep_zero3_reshard`). Negative control: the expert tags removed before
`deepspeed.initialize` land off the reference. Also with the optimizer offloaded to the CPU (the torch AdamW as
given), and with gradient accumulation 2 at stage 2, after which `save_pretrained` on every rank reloads in one process
to exactly the trained weights.
"""

import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
from parameterized import parameterized

import torch

from tests.deepspeed.test_ep_zero3_reshard import CLIP, MOMENT_KEYS, global_batch, train_reference
from tests.fork_utils.expert_state import assemble_experts, max_diff
from tests.fork_utils.launcher import launch
from tests.fork_utils.tiny_models import make_checkpoint


SCRIPT = Path(__file__).parent / "scripts" / "ep_zero12.py"
TIMEOUT = 240
STEPS = 3
GLOBAL_BATCH = 4  # train_reference's
LR = 1e-2  # train_reference's
PROTOTYPE_ENV = {"TRANSFORMERS_EP_ZERO12_PROTOTYPE": "1"}


def reference_grad_norms(checkpoint, steps: int) -> list[float]:
    """The total gradient norm before clipping at each step of `train_reference`'s run (the same steps)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    norms = []
    for step in range(steps):
        batch = global_batch(step, model.config.vocab_size)
        model(input_ids=batch, labels=batch).loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        optimizer.step()
        optimizer.zero_grad()
    return norms


@pytest.mark.multiprocess
class EPZero12PrototypeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero12-"))
        cls.checkpoint = make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=31).path
        cls.reference = train_reference(cls.checkpoint, STEPS)
        cls.reference_norms = reference_grad_norms(cls.checkpoint, STEPS)
        # The noise floor: the reference with its batch summed in the ranks' two parts
        cls.reordered = train_reference(cls.checkpoint, STEPS, chunks=2)[1]
        cls.floor, _ = max_diff(cls.reordered["param"], cls.reference[1]["param"])

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_ranks(self, stage, *extra):
        args = ["--checkpoint", self.checkpoint, "--ep-size", 2, "--stage", stage, "--steps", STEPS,
                "--global-batch", GLOBAL_BATCH, "--lr", LR, *extra]
        return launch(SCRIPT, args, nproc=2, timeout=TIMEOUT, env=PROTOTYPE_ENV).check().results()

    def off_reference(self, results):
        """The largest relative loss difference and the largest weight difference against one process."""
        ref_losses, ref_state = self.reference
        mean_losses = [sum(r["losses"][s] for r in results.values()) / len(results) for s in range(STEPS)]
        relative = max(abs(got - want) / want for got, want in zip(mean_losses, ref_losses))
        weights = assemble_experts(
            {r: {"ep_rank": report["ep_rank"], "final": report["final"]["param"]} for r, report in results.items()},
            "final", 2,
        )
        diff, worst = max_diff(weights, ref_state["param"])
        return relative, diff, worst

    def assert_moments_at_parity(self, results):
        """Adam's moments (experts assembled over the EP ranks) within the noise floor, as test_ep_zero3_reshard's."""
        for key in MOMENT_KEYS:
            self.assertEqual(results[0]["final"].get("moment_errors"), None)
            got = assemble_experts(
                {r: {"ep_rank": report["ep_rank"], "final": report["final"][key]} for r, report in results.items()},
                "final", 2,
            )
            floor, _ = max_diff(self.reordered[key], self.reference[1][key])
            scale = max(t.abs().max().item() for t in self.reference[1][key].values())
            diff, worst = max_diff(got, self.reference[1][key])
            self.assertLessEqual(diff, max(10 * floor, 1e-4 * scale), f"{key} off by {diff} at {worst}; floor {floor}")

    @parameterized.expand([("stage_1", 1), ("stage_2", 2), ("stage_2_optimizer_offload", 2, "--offload")])
    def test_ep2_trains_at_parity_with_one_process(self, _name, stage, *extra):
        results = self.run_ranks(stage, *extra)
        for report in results.values():
            self.assertTrue(report["has_moe_layers"])
            self.assertTrue(report["unchanged_by_initialize"], "deepspeed.initialize changed this rank's experts")
            self.assertEqual(len(report["moe_params"]), 4)  # gate_up_proj and down_proj of 2 layers
            self.assertIn(["ep_size_2", True], [list(group) for group in report["optimizer_groups"]])
        # the experts differ across EP ranks
        self.assertFalse(all(
            (results[0]["final"]["param"][n] == results[1]["final"]["param"][n]).all()
            for n in results[0]["moe_params"]
        ))
        # The norm the gradients are clipped by (1.0, under every step's norm here): experts counted once each
        for report in results.values():
            for got, want in zip(report["grad_norms"], self.reference_norms):
                self.assertLess(abs(got - want) / want, 1e-5, f"grad norms {report['grad_norms']} vs "
                                f"{self.reference_norms}")
        relative, diff, worst = self.off_reference(results)
        self.assertLessEqual(relative, 1e-5)
        self.assertLessEqual(diff, max(10 * self.floor, 1e-6), f"weights off by {diff} at {worst}; floor {self.floor}")
        self.assert_moments_at_parity(results)

    def test_trainer_at_stage_2_trains_at_parity_with_one_process(self):
        results = self.run_ranks(2, "--entry", "trainer")
        for report in results.values():
            self.assertTrue(report["has_moe_layers"])
            self.assertIn(["ep_size_2", True], [list(group) for group in report["optimizer_groups"]])
        relative, diff, worst = self.off_reference(results)
        self.assertLessEqual(relative, 1e-5)
        self.assertLessEqual(diff, max(10 * self.floor, 1e-6), f"weights off by {diff} at {worst}; floor {self.floor}")

    def test_gradient_accumulation_2_then_save_pretrained_on_every_rank(self):
        """Stage 2, 2 micro batches per step: at parity; `save_pretrained` on every rank writes every expert, and the
        checkpoint reloads in one process to exactly the trained weights."""
        from transformers import AutoModelForCausalLM

        saved = self.tmp / "saved-gas2"
        results = self.run_ranks(2, "--gas", 2, "--save-pretrained", saved)
        relative, diff, worst = self.off_reference(results)
        self.assertLessEqual(relative, 1e-5)
        self.assertLessEqual(diff, max(10 * self.floor, 1e-6), f"weights off by {diff} at {worst}; floor {self.floor}")
        self.assertEqual([report["save_pretrained"] for report in results.values()], ["ok", "ok"])
        trained = assemble_experts(
            {r: {"ep_rank": report["ep_rank"], "final": report["final"]["param"]} for r, report in results.items()},
            "final", 2,
        )
        reloaded = dict(AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).named_parameters())
        self.assertEqual(max_diff({name: reloaded[name].detach() for name in trained}, trained)[0], 0.0)

    def test_negative_control_untagged_experts_land_off_the_reference(self):
        results = self.run_ranks(2, "--untag")
        self.assertFalse(results[0]["has_moe_layers"])
        relative, diff, worst = self.off_reference(results)
        self.assertGreater(diff, 100 * max(self.floor, 1e-6), f"untagged experts at the reference: {diff} at {worst}")
