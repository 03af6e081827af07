"""Training an expert-parallel MoE under DeepSpeed ZeRO-3 matches a single process trained on the global batch.

Every rank feeds its own batch. After `deepspeed.initialize` (directly, through `accelerate`, through `Trainer`) each
rank must still hold its experts; K steps must give the single-process reference's losses (relative 1e-5) and
weights: SGD within 1e-6; AdamW within 10x the noise floor measured here (the reference rerun with its batch summed in
another order) or lr/100, far below one update (~lr). Expert gradients are reduced only within the expert-data-parallel group: the
partition groups say so, and a run without the expert tag, whose expert gradients DeepSpeed then averages like dense
ones, lands off the reference.
"""

import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from parameterized import parameterized

from tests.fork_utils.expert_state import assemble_experts, is_expert_param, max_diff
from tests.fork_utils.launcher import CONFIG_DIR, launch
from tests.fork_utils.tiny_models import make_checkpoint, reference_state_dict


SCRIPT = Path(__file__).parent / "scripts" / "ep_train.py"
ACCELERATE_ZERO3 = CONFIG_DIR / "accelerate_deepspeed_zero3.yaml"
TIMEOUT = 180


def train_reference(checkpoint, global_batches, optimizer_name, lr, clip, chunks=1, router_aux_loss=False):
    """Single process on each step's global batch; `chunks > 1` averages the losses of its `chunks` parts: the same
    mean loss in another order, or with `router_aux_loss` (not additive over rows) what `chunks` ranks train on."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.config.output_router_logits = router_aux_loss
    model.train()
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for batch in global_batches:
        loss = sum(model(input_ids=part, labels=part).loss for part in batch.chunk(chunks)) / chunks
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {name: param.detach().clone() for name, param in model.named_parameters()}


class TrainChecks:
    """Training runs of ep_train.py and their comparison with one process, shared with the stage-1/2 tests
    (test_ep_zero12.py)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-train-"))
        cls.checkpoints = {
            "qwen3_moe": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=21).path,
            "mixtral": make_checkpoint("mixtral", cls.tmp / "mixtral", seed=22).path,
            "qwen3_moe_8": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe_8", seed=23, num_experts=8).path,
            "gemma4_text": make_checkpoint("gemma4_text", cls.tmp / "gemma4_text", seed=24).path,
        }

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_training(self, checkpoint, entry, optimizer, nproc=2, ep_size=2, steps=5, extra=(), launcher=None,
                     env=None):
        """`launcher`: accelerate launch for the accelerate entry, torchrun for the others, unless named."""
        args = ["--checkpoint", self.checkpoints[checkpoint], "--entry", entry, "--ep-size", ep_size,
                "--steps", steps, "--optimizer", optimizer, *extra]
        launcher = launcher or ("accelerate" if entry == "accelerate" else "torchrun")
        config = ACCELERATE_ZERO3 if launcher == "accelerate" else None
        result = launch(SCRIPT, args, nproc=nproc, launcher=launcher, accelerate_config=config, timeout=TIMEOUT,
                        env=env)
        return result.check().results()

    def compare_with_reference(self, checkpoint, results, optimizer, ep_size, lr=1e-2, router_aux_loss=False):
        nproc = len(results)
        steps = len(results[0]["losses"])
        global_batches = [torch.cat([results[r]["inputs"][s] for r in range(nproc)]) for s in range(steps)]
        for s in range(steps):
            rows = [tuple(results[r]["inputs"][s].flatten().tolist()) for r in range(nproc)]
            self.assertEqual(len(set(rows)), nproc, f"step {s}: the ranks did not feed batches of their own")
        clip = results[0]["clip"]
        # The aux loss of a batch is not the mean of its rows' aux losses: the reference averages the ranks' losses.
        chunks = nproc if router_aux_loss else 1
        ref_losses, ref_weights = train_reference(
            self.checkpoints[checkpoint], global_batches, optimizer, lr, clip, chunks, router_aux_loss
        )

        # Right after initialize: every rank's experts unchanged, dense weights equal to the checkpoint on all ranks.
        checkpoint_state = reference_state_dict(self.checkpoints[checkpoint])
        for rank, report in results.items():
            for name, tensor in report["initial"].items():
                want = checkpoint_state[name]
                if is_expert_param(name):
                    n = want.shape[0] // ep_size
                    want = want[report["ep_rank"] * n : (report["ep_rank"] + 1) * n]
                self.assertTrue(torch.equal(tensor, want), f"rank {rank}: {name} changed by initialize")

        mean_losses = [sum(results[r]["losses"][s] for r in range(nproc)) / nproc for s in range(steps)]
        for step, (got, want) in enumerate(zip(mean_losses, ref_losses)):
            self.assertLessEqual(abs(got - want) / want, 1e-5, f"step {step}: loss {got} vs reference {want}")

        final = assemble_experts(results, "final", ep_size)
        diff, worst = max_diff(final, ref_weights)
        if optimizer == "sgd":
            self.assertLessEqual(diff, 1e-6, f"final weights differ by {diff} at {worst}")
        else:
            _, reordered = train_reference(self.checkpoints[checkpoint], global_batches, optimizer, lr, clip, chunks=nproc)
            floor, _ = max_diff(reordered, ref_weights)
            # The floor itself moves with the summation order (threads, ranks): ~5e-6 to 4e-5 here. A stale or
            # misplaced expert is off by whole Adam updates (~lr each step), orders of magnitude more.
            self.assertLessEqual(diff, max(10 * floor, lr / 100), f"final weights off by {diff} at {worst}; floor {floor}")
            self.assertLess(diff, lr / 10, "off by a whole update: a stale or misplaced expert")
        return mean_losses, ref_losses

    def assert_experts_reduced_within_expert_data_parallel_groups(self, results, ep_size):
        """Each expert partitioned (and its gradient reduced) over the ranks of its expert-data-parallel group, each
        dense parameter over all ranks."""
        nproc = len(results)
        for rank, report in results.items():
            edp_group = [r for r in range(nproc) if r % ep_size == rank % ep_size]
            for name, ranks in report["partition_groups"].items():
                self.assertEqual(ranks, edp_group if is_expert_param(name) else list(range(nproc)), f"{rank}: {name}")


@pytest.mark.multiprocess
class EPZero3TrainTest(TrainChecks, unittest.TestCase):
    @parameterized.expand([("qwen3_moe", "adamw"), ("qwen3_moe", "sgd"), ("mixtral", "adamw"), ("mixtral", "sgd")])
    def test_deepspeed_initialize_matches_single_process(self, checkpoint, optimizer):
        results = self.run_training(checkpoint, "deepspeed", optimizer)
        self.compare_with_reference(checkpoint, results, optimizer, ep_size=2)
        self.assert_experts_reduced_within_expert_data_parallel_groups(results, ep_size=2)

    @pytest.mark.gpu
    def test_nccl_training_matches_single_process(self):
        """With 2+ CUDA devices the launcher runs the ranks on NCCL, one device each: the same comparison there."""
        results = self.run_training("qwen3_moe", "deepspeed", "adamw")
        self.assertEqual({report["backend"] for report in results.values()}, {"nccl"})
        self.compare_with_reference("qwen3_moe", results, "adamw", ep_size=2)
        self.assert_experts_reduced_within_expert_data_parallel_groups(results, ep_size=2)

    @parameterized.expand([("qwen3_moe",), ("mixtral",)])
    def test_router_aux_loss_trains_at_parity(self, checkpoint):
        """`output_router_logits=True`: the router logits are recorded under EP, every rank's first aux loss is that of
        the single-process model on its rows, and training with the aux loss matches the single-process reference."""
        from transformers import AutoModelForCausalLM

        results = self.run_training(checkpoint, "deepspeed", "sgd", steps=3, extra=["--aux-loss"])
        model = AutoModelForCausalLM.from_pretrained(self.checkpoints[checkpoint], dtype=torch.float32)
        model.config.output_router_logits = True
        for rank, report in results.items():
            self.assertNotIn(None, report["aux_losses"], f"rank {rank}: no aux loss, router logits not recorded")
            input_ids = report["inputs"][0]
            with torch.no_grad():
                expected = model(input_ids=input_ids, labels=input_ids).aux_loss.item()
            self.assertLessEqual(abs(report["aux_losses"][0] - expected), 1e-5 * expected, f"rank {rank}")
        self.compare_with_reference(checkpoint, results, "sgd", ep_size=2, router_aux_loss=True)

    def test_dense_rules_of_the_ep_plan_are_left_to_deepspeed(self):
        """Gemma 4's EP plan also shards its dense MLP over the EP group (`colwise` / `rowwise`), tensor parallelism
        that needs the EP group to share a batch: under ZeRO-3 the MLP stays whole and DeepSpeed partitions it."""
        results = self.run_training("gemma4_text", "deepspeed", "sgd", steps=2)
        self.compare_with_reference("gemma4_text", results, "sgd", ep_size=2)
        self.assert_experts_reduced_within_expert_data_parallel_groups(results, ep_size=2)

    @parameterized.expand([("sgd",), ("adamw",)])
    @pytest.mark.slow
    def test_ep_times_expert_data_parallel_on_4_ranks(self, optimizer):
        results = self.run_training("qwen3_moe_8", "deepspeed", optimizer, nproc=4)
        self.compare_with_reference("qwen3_moe_8", results, optimizer, ep_size=2)
        self.assert_experts_reduced_within_expert_data_parallel_groups(results, ep_size=2)

    @parameterized.expand([("optimizer", ["optimizer"]), ("optimizer_and_params", ["optimizer", "param"])])
    def test_zero3_offload_matches_single_process(self, _name, offload):
        results = self.run_training("qwen3_moe", "deepspeed", "adamw", extra=["--offload", *offload])
        self.assertEqual(results[0]["offloaded"], sorted(offload), "DeepSpeed did not offload: the test proves nothing")
        self.compare_with_reference("qwen3_moe", results, "adamw", ep_size=2)
        self.assert_experts_reduced_within_expert_data_parallel_groups(results, ep_size=2)

    def test_accelerate_prepare_matches_single_process(self):
        results = self.run_training("mixtral", "accelerate", "adamw")
        self.compare_with_reference("mixtral", results, "adamw", ep_size=2)

    @parameterized.expand([("torchrun",), ("deepspeed",)])
    def test_trainer_matches_single_process(self, launcher):
        results = self.run_training("qwen3_moe", "trainer", "adamw", launcher=launcher)
        self.assertEqual(results[0]["engine"], "DeepSpeedEngine", "the Trainer must build a DeepSpeed engine")
        mean_losses, ref_losses = self.compare_with_reference("qwen3_moe", results, "adamw", ep_size=2)
        logged = results[0]["logged_losses"]
        self.assertEqual(len(logged), len(ref_losses))
        for step, (got, want) in enumerate(zip(logged, ref_losses)):
            # The Trainer logs 4 significant digits.
            self.assertLessEqual(abs(got - want) / want, 1e-3, f"step {step}: logged loss {got} vs {want}")

    @pytest.mark.slow
    def test_negative_control_expert_gradients_averaged_like_dense_ones_are_wrong(self):
        """Without the expert tag DeepSpeed averages expert gradients by the expert-data-parallel size instead of
        the world size: the comparison above must catch it (with the placement check off, which would refuse it)."""
        results = self.run_training("qwen3_moe", "deepspeed", "sgd",
                                    extra=["--drop-expert-family-tag", "--skip-placement-check"])
        with self.assertRaises(AssertionError):
            self.compare_with_reference("qwen3_moe", results, "sgd", ep_size=2)

    @parameterized.expand(["deepspeed", "trainer"])
    def test_deepspeed_placement_check_refuses_a_dropped_expert_tag_on_every_rank(self, entry):
        """The check at the first forward after `deepspeed.initialize`: DeepSpeed placed the experts as dense
        parameters (the tag it reads was removed), so every rank raises before the first step, naming them."""
        args = ["--checkpoint", self.checkpoints["qwen3_moe"], "--entry", entry, "--ep-size", 2, "--steps", 2,
                "--optimizer", "sgd", "--drop-expert-family-tag"]
        result = launch(SCRIPT, args, nproc=2, timeout=TIMEOUT)
        self.assertFalse(result.ok)
        self.assertFalse(result.timed_out, result.report())
        for rank in (0, 1):
            error = result.ranks[rank].error or ""
            self.assertIn("did not place", error, f"rank {rank}:\n{result.report()}")
            self.assertRegex(error, rf"experts\.gate_up_proj: partitioned over ranks \[{rank}\] as 'replicated', "
                                    rf"expected \(\[{rank}\], 'autoep_expert'\)")
