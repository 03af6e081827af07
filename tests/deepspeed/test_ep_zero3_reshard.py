"""A DeepSpeed ZeRO-3 checkpoint of an expert-parallel MoE resumes on another topology with its Adam state.

Each hop of a chain trains 3 steps on one topology from the previous hop's DeepSpeed checkpoint
(`engine.save_checkpoint`), loaded with `load_checkpoint_on_new_topology`, and saves its own. Every step has the same
global batch whatever the number of ranks, so after hop k the run has trained on the global batches of one
uninterrupted run of 3(k+1) steps, which one process trains as the reference: the losses of every step, the final
weights and Adam's moments must match it.
Right after each load, the weights and moments every rank holds must equal, bit for bit, those the previous hop ended
with (the resharding is exact). A hop whose moments are zeroed after the load lands off the reference (negative
control), and DeepSpeed's own `engine.load_checkpoint` refuses the other topologies on every rank.

EP size 1 is a model loaded without a `DistributedConfig`: plain ZeRO-3, every parameter partitioned over all ranks.

`make test` runs the 2-rank chains; `make test-multinode` (EPFORK_MULTINODE_FULL=1) also the 4-rank one (80 s here).
"""

import json
import os
import re
import runpy
import shutil
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
from parameterized import parameterized
from safetensors.torch import load_file

from tests.fork_utils.accelerate_config import generated_accelerate_yaml
from tests.fork_utils.expert_state import assemble_experts, is_expert_param, max_diff
from tests.fork_utils.launcher import launch, run_commands
from tests.fork_utils.tiny_models import make_checkpoint


SCRIPT = Path(__file__).parent / "scripts" / "ep_reshard.py"
TIMEOUT = 180
STEPS_PER_HOP = 3
GLOBAL_BATCH = 4
LR = 1e-2
CLIP = 1.0  # DeepSpeed's default gradient clipping, which the ranks train with
SEQ_LEN = 12
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
FULL = os.environ.get("EPFORK_MULTINODE_FULL") == "1"


def global_batch(step: int, vocab_size: int) -> torch.Tensor:
    """What every rank of the script draws for `step` (ep_reshard.global_batch)."""
    generator = torch.Generator().manual_seed(1_000 + step)
    return torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=generator)


def train_reference(checkpoint, steps: int, chunks: int = 1):
    """One process, AdamW (gradients clipped as DeepSpeed clips them) on each step's global batch; `chunks` > 1
    averages the losses of that many parts (the same mean in another summation order: the noise floor). Returns the
    losses, the weights and Adam's moments by name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(steps):
        batch = global_batch(step, model.config.vocab_size)
        loss = sum(model(input_ids=part, labels=part).loss for part in batch.chunk(chunks)) / chunks
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = {"param": {name: param.detach().clone() for name, param in model.named_parameters()}}
    for key in MOMENT_KEYS:
        state[key] = {name: optimizer.state[param][key].clone() for name, param in model.named_parameters()}
    return losses, state


def assert_within_noise_floor(test, got: dict, reference: dict, reordered: dict, what: str):
    """`got` (whole tensors by name) against the one-process `reference`, within 10x its noise floor: its distance to
    `reordered`, the reference rerun with each batch summed in the ranks' parts (~1e-6 to 4e-5 here), or 1e-4 of the
    largest value. Lost or misplaced moments or experts are off by a fraction of an update (~lr) per step, orders of
    magnitude more."""
    floor, _ = max_diff(reordered, reference)
    scale = max(t.abs().max().item() for t in reference.values())
    diff, worst = max_diff(got, reference)
    test.assertLessEqual(diff, max(10 * floor, 1e-4 * scale), f"{what} off by {diff} at {worst}; floor {floor}")


def read_converted(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `zero_to_fp32.py` output folder: `pytorch_model*.bin` or `model*.safetensors` files."""
    tensors = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            tensors.update(load_file(path))
        elif path.suffix == ".bin":
            tensors.update(torch.load(path, weights_only=True))
    return tensors


def whole_state(results: dict, key: str, ep_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """The whole tensors of the ranks' `key` snapshot ("loaded" or "final"): parameters and moments."""
    by_kind = {}
    for kind in ("param", *MOMENT_KEYS):
        reports = {r: {"ep_rank": report["ep_rank"], key: report[key][kind]} for r, report in results.items()}
        by_kind[kind] = assemble_experts(reports, key, ep_size)
    return by_kind


class ResumeChecks:
    """Hops of the rank script (each trains `STEPS_PER_HOP` steps, resumes from a previous hop's checkpoint, saves
    its own) and the checks against one process, shared with the stage-1/2 resume tests (test_ep_zero12.py)."""

    tmp_prefix = "ep-resume-"

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix=cls.tmp_prefix))
        cls.checkpoint = make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=31).path
        cls.references = {}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def reference(self, steps: int, chunks: int = 1):
        if (steps, chunks) not in self.references:
            self.references[steps, chunks] = train_reference(self.checkpoint, steps, chunks)
        return self.references[steps, chunks]

    def hop(self, name, nproc, ep_size, resume_from=None, first_step=0, extra=(), **launch_options):
        """One launch of the rank script; `launch_options` go to `launch` (e.g. another launcher and its config)."""
        args = ["--checkpoint", self.checkpoint, "--ep-size", ep_size, "--steps", STEPS_PER_HOP,
                "--first-step", first_step, "--global-batch", GLOBAL_BATCH, "--lr", LR,
                "--save-checkpoint", self.tmp / name]
        if resume_from is not None:
            args += ["--resume-from", self.tmp / resume_from]
        result = launch(SCRIPT, [*args, *extra], nproc=nproc, timeout=TIMEOUT, **launch_options)
        return result.check().results()

    def assert_at_parity_with_one_process(self, results, ep_size, steps):
        """Losses of the hop's steps, final weights and moments against one process trained `steps` steps."""
        nproc = len(results)
        ref_losses, ref_state = self.reference(steps)
        mean_losses = [sum(results[r]["losses"][s] for r in range(nproc)) / nproc for s in range(STEPS_PER_HOP)]
        relative = [abs(got - want) / want for got, want in zip(mean_losses, ref_losses[-STEPS_PER_HOP:])]
        self.assertLessEqual(
            max(relative), 1e-5, f"steps {steps - STEPS_PER_HOP}..{steps - 1}: losses {mean_losses} vs the "
            f"reference's {ref_losses[-STEPS_PER_HOP:]} (relative differences {relative})"
        )
        final = whole_state(results, "final", ep_size)
        for kind in ("param", *MOMENT_KEYS):
            self.assert_close_to_reference(final[kind], kind, steps, nproc)
        return final

    def assert_close_to_reference(self, got, kind, steps, nproc):
        """`got` (whole tensors by name) against one process's `kind` ("param" or a moment) after `steps` steps."""
        _, ref_state = self.reference(steps)
        _, reordered = self.reference(steps, chunks=nproc)
        assert_within_noise_floor(self, got, ref_state[kind], reordered[kind], f"{kind} after {steps} steps")

    def assert_loaded_exactly(self, results, ep_size, previous_final, saved_at_step):
        """Right after the load, every rank holds exactly what the previous hop ended with."""
        loaded = whole_state(results, "loaded", ep_size)
        for kind in ("param", *MOMENT_KEYS):
            for name, tensor in previous_final[kind].items():
                self.assertTrue(torch.equal(loaded[kind][name], tensor), f"{kind} {name} not loaded exactly")
        for rank, report in results.items():
            self.assertEqual(report["global_steps_after_load"], saved_at_step, f"rank {rank}: the engine's step count")


@pytest.mark.multiprocess
class EPZero3ReshardTest(ResumeChecks, unittest.TestCase):
    tmp_prefix = "ep-zero3-reshard-"

    def first_hop(self):
        """The first 3 steps on 2 ranks with EP 2, saved: where every chain starts (run once for the class)."""
        if "first_hop" not in self.references:
            results = self.hop("hop0-2ranks-ep2", 2, 2)
            self.references["first_hop"] = self.assert_at_parity_with_one_process(results, 2, STEPS_PER_HOP)
        return "hop0-2ranks-ep2", self.references["first_hop"]

    def run_chain(self, topologies):
        """After the first hop, hops on (nproc, ep_size[, resume_with]) in turn, each from the previous hop's
        checkpoint, loaded with `load_checkpoint_on_new_topology` unless `resume_with` names another loader; checked
        after each hop."""
        previous, final = self.first_hop()
        for index, (nproc, ep_size, *resume_with) in enumerate(topologies, start=1):
            name = f"hop{index}-{nproc}ranks-ep{ep_size}"
            extra = ["--resume-with", *resume_with] if resume_with else []
            results = self.hop(name, nproc, ep_size, resume_from=previous, first_step=STEPS_PER_HOP * index,
                               extra=extra)
            self.assert_loaded_exactly(results, ep_size, final, STEPS_PER_HOP * index)
            final = self.assert_at_parity_with_one_process(results, ep_size, STEPS_PER_HOP * (index + 1))
            previous = name
        return previous

    def test_ep2_to_ep1_on_2_ranks_and_lost_moments_are_caught(self):
        """EP 2 -> without EP (plain ZeRO-3), on 2 ranks. Negative control: the same hop with Adam's moments zeroed
        after the load lands off the reference, and DeepSpeed's own loader refuses the checkpoint on every rank."""
        self.run_chain([(2, 1)])
        results = self.hop("lost-moments", 2, 1, resume_from="hop0-2ranks-ep2", first_step=3, extra=["--zero-moments"])
        with self.assertRaisesRegex(AssertionError, "vs the reference|off by"):  # losses, or else weights
            self.assert_at_parity_with_one_process(results, 1, 6)
        refused = self.hop("refused", 2, 1, resume_from="hop0-2ranks-ep2", first_step=3, extra=["--resume-with",
                                                                                                  "deepspeed"])
        for rank, report in refused.items():
            self.assertRegex(report.get("resume_error", ""), "same parameter placement topology", f"rank {rank}")

    @parameterized.expand([
        # `accelerate launch` with the yaml `accelerate config` writes: `{device: none}` offload sections, which the
        # resume once refused on every rank (read as "offloaded")
        ("accelerate_config_yaml", ["--launch-config"], {"optimizer": "none", "param": "none"}),
        # the ZeRO-3 example of transformers' DeepSpeed docs offloads the parameters and the optimizer to the CPU
        ("offload_to_cpu", ["--offload", "param", "optimizer"], {"optimizer": "cpu", "param": "cpu"}),
    ])
    def test_ep2_to_ep1_on_2_ranks_under_config(self, name, extra, offload_sections):
        """The EP 2 -> without EP hop (2 ranks) of the test above, under another DeepSpeed config: exact load, then at
        parity with one process."""
        launch_options = {}
        if "--launch-config" in extra:
            yaml_path = generated_accelerate_yaml(self.tmp / f"{name}.yaml", param="none", optimizer="none")
            launch_options = {"launcher": "accelerate", "accelerate_config": yaml_path}
        previous, final = self.first_hop()
        results = self.hop(f"hop1-{name}", 2, 1, resume_from=previous, first_step=STEPS_PER_HOP, extra=extra,
                           **launch_options)
        for rank, report in results.items():
            self.assertNotIn("resume_error", report, f"rank {rank} could not resume")
            self.assertEqual(report["offload_sections"], offload_sections, f"rank {rank}: not the config meant")
            offloaded = sorted(what for what, device in offload_sections.items() if device != "none")
            self.assertEqual(report["offloaded"], offloaded, f"rank {rank}: offload read from the config")
        self.assert_loaded_exactly(results, 1, final, STEPS_PER_HOP)
        self.assert_at_parity_with_one_process(results, 1, 2 * STEPS_PER_HOP)

    def checkpoint_without_ep(self):
        """The EP 2 -> without EP hop's checkpoint (2 ranks, plain ZeRO-3, 6 steps trained): the chain test's, or the
        hop run here when that test did not run."""
        name = "hop1-2ranks-ep1"
        if not (self.tmp / name).is_dir():
            previous, _ = self.first_hop()
            self.hop(name, 2, 1, resume_from=previous, first_step=STEPS_PER_HOP)
        return self.tmp / name

    def test_fp32_weights_read_offline_from_ep_and_plain_checkpoints(self):
        """The fork's `get_fp32_state_dict_from_zero_checkpoint`, in this one process: from the first hop's checkpoint
        (2 ranks, EP 2) every expert, equal bit for bit to what the ranks ended with and at parity with one process;
        from a checkpoint without EP, DeepSpeed's own output, identical. Negative control: with the expert-parallel
        part switched off, DeepSpeed's reader raises on the EP checkpoint."""
        from deepspeed.utils import zero_to_fp32

        from transformers.integrations import deepspeed_expert_parallel_checkpoint as offline

        ep_checkpoint, final = self.first_hop()
        weights = offline.get_fp32_state_dict_from_zero_checkpoint(str(self.tmp / ep_checkpoint))
        self.assertEqual(sorted(weights), sorted(final["param"]))
        for name, tensor in final["param"].items():
            self.assertEqual(weights[name].dtype, torch.float32, name)
            self.assertTrue(torch.equal(weights[name], tensor), f"{name}: not the weights the ranks ended with")
        self.assert_close_to_reference(weights, "param", STEPS_PER_HOP, 2)

        plain = str(self.checkpoint_without_ep())
        ours, deepspeeds = (read(plain) for read in (offline.get_fp32_state_dict_from_zero_checkpoint,
                                                     zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint))
        self.assertEqual(list(ours), list(deepspeeds))
        for name, tensor in deepspeeds.items():
            self.assertTrue(torch.equal(ours[name], tensor) and ours[name].dtype == tensor.dtype, name)
        self.assert_close_to_reference(ours, "param", 2 * STEPS_PER_HOP, 2)

        with mock.patch.object(offline, "is_expert_parallel_checkpoint", return_value=False):
            with self.assertRaisesRegex(ValueError, "consumed .* numels out of"):
                offline.get_fp32_state_dict_from_zero_checkpoint(str(self.tmp / ep_checkpoint))

    def test_zero_to_fp32_py_in_the_checkpoint_folder(self):
        """`python <checkpoint>/zero_to_fp32.py <checkpoint> <out>` as users run it, in processes without GPUs. The EP
        checkpoint's folder holds the fork's script: its `pytorch_model.bin`, and its safetensors shards and index
        (`--safe_serialization --max_shard_size`), hold every expert, equal bit for bit to what the ranks ended with
        and at parity with one process. On the checkpoint without EP the fork's script writes DeepSpeed's files, byte
        for byte those of DeepSpeed's own script (in that checkpoint's folder). Negative control: with the
        expert-parallel part switched off, the fork's script fails on the EP checkpoint as DeepSpeed's does."""
        import deepspeed

        from transformers.integrations import deepspeed_expert_parallel_checkpoint as offline

        ep_name, final = self.first_hop()
        ep, plain = self.tmp / ep_name, self.checkpoint_without_ep()
        ours, deepspeeds = ep / "zero_to_fp32.py", plain / "zero_to_fp32.py"
        self.assertEqual(ours.read_bytes(), Path(offline.RECOVERY_SCRIPT).read_bytes(), "not the fork's script")
        deepspeed_script = Path(deepspeed.__file__).parent / "utils" / "zero_to_fp32.py"
        self.assertEqual(deepspeeds.read_bytes(), deepspeed_script.read_bytes(), "a model without EP: DeepSpeed's")

        out = self.tmp / "zero_to_fp32"
        sharded = ["--safe_serialization", "--max_shard_size", "100KB"]
        runs = {
            "ep": [ours, ep, out / "ep"],
            "ep-sharded": [ours, ep, out / "ep-sharded", *sharded],
            "plain-ours": [ours, plain, out / "plain-ours"],
            "plain-deepspeeds": [deepspeeds, plain, out / "plain-deepspeeds"],
            "plain-ours-sharded": [ours, plain, out / "plain-ours-sharded", *sharded],
            "plain-deepspeeds-sharded": [deepspeeds, plain, out / "plain-deepspeeds-sharded", *sharded],
        }
        results = run_commands([[sys.executable, *args] for args in runs.values()], timeout=TIMEOUT)
        for name, result in zip(runs, results):
            self.assertEqual(result.returncode, 0, f"{name}: {result.command}\n{result.output[-3000:]}")

        weights = torch.load(out / "ep" / "pytorch_model.bin", weights_only=True)
        self.assertEqual(os.listdir(out / "ep"), ["pytorch_model.bin"])
        self.assertEqual(sorted(weights), sorted(final["param"]))
        for name, tensor in final["param"].items():
            self.assertEqual(weights[name].dtype, torch.float32, name)
            self.assertTrue(torch.equal(weights[name], tensor), f"{name}: not the weights the ranks ended with")
        self.assert_close_to_reference(weights, "param", STEPS_PER_HOP, 2)

        shards = sorted(os.listdir(out / "ep-sharded"))
        index = json.loads((out / "ep-sharded" / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        self.assertGreater(len(files), 1)
        self.assertEqual(files, [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)])
        self.assertEqual(shards, sorted([*files, "model.safetensors.index.json"]))
        sharded_weights = read_converted(out / "ep-sharded")
        self.assertEqual(sorted(sharded_weights), sorted(weights))
        for name, tensor in weights.items():
            self.assertTrue(torch.equal(sharded_weights[name], tensor), f"{name}: the shards differ from the .bin")
        plain_index = json.loads((out / "plain-deepspeeds-sharded" / "model.safetensors.index.json").read_text())
        self.assertEqual(index["metadata"], plain_index["metadata"], "not the same model's total size")

        for twin in ("", "-sharded"):
            ours_out, deepspeeds_out = out / f"plain-ours{twin}", out / f"plain-deepspeeds{twin}"
            self.assertEqual(sorted(os.listdir(ours_out)), sorted(os.listdir(deepspeeds_out)))
            for name in os.listdir(deepspeeds_out):
                self.assertEqual((ours_out / name).read_bytes(), (deepspeeds_out / name).read_bytes(), name)
        self.assert_close_to_reference(read_converted(out / "plain-ours"), "param", 2 * STEPS_PER_HOP, 2)

        with mock.patch.object(offline, "is_expert_parallel_checkpoint", return_value=False), \
                mock.patch.object(sys, "argv", [str(ours), str(ep), str(out / "switched-off")]):
            with self.assertRaisesRegex(ValueError, "consumed .* numels out of"):
                runpy.run_path(str(ours), run_name="__main__")

    def test_fp32_weights_read_offline_with_frozen_experts_and_embeddings(self):
        """2 ranks, EP 2, the experts and the embeddings frozen (trained: attention, norms, routers, head): the reader
        returns every parameter equal bit for bit to what the ranks ended with (the frozen ones as loaded, whole), and
        leaves the frozen ones out with `exclude_frozen_parameters`. Negative control: DeepSpeed's own reader (the
        expert-parallel part switched off) returns one rank's experts, silently, without raising."""
        from deepspeed.utils import zero_to_fp32

        frozen = r"mlp\.experts|embed_tokens"
        final, checkpoint = self.assert_frozen_read_offline(2, frozen)
        deepspeeds = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint)
        wrong = [name for name, tensor in final.items() if deepspeeds[name].shape != tensor.shape]
        self.assertTrue(wrong and all(is_expert_param(name) for name in wrong), wrong)

    @pytest.mark.topology
    @unittest.skipUnless(FULL, "make test-multinode runs it (EPFORK_MULTINODE_FULL=1)")
    def test_fp32_weights_read_offline_on_4_ranks_with_frozen_and_trained_experts(self):
        """4 ranks, EP 2 x expert-data-parallel 2: frozen experts (`down_proj`) partitioned over 2 ranks each, next to
        trained ones (`gate_up_proj`), and frozen embeddings over all 4."""
        self.assert_frozen_read_offline(4, r"mlp\.experts\.down_proj|embed_tokens")

    def assert_frozen_read_offline(self, nproc, frozen):
        """Train on `nproc` ranks (EP 2) with the parameters `frozen` matches frozen, save, and read the checkpoint
        offline: every parameter equal to the ranks' (the frozen ones as loaded), none of the frozen ones with
        `exclude_frozen_parameters`. Returns the ranks' final weights and the checkpoint."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations import deepspeed_expert_parallel_checkpoint as offline

        run = f"frozen-{nproc}ranks"
        results = self.hop(run, nproc, 2, extra=["--freeze", frozen])
        final = whole_state(results, "final", 2)["param"]
        checkpoint = str(self.tmp / run)
        weights = offline.get_fp32_state_dict_from_zero_checkpoint(checkpoint)
        self.assertEqual(sorted(weights), sorted(final))
        for name, tensor in final.items():
            self.assertTrue(torch.equal(weights[name], tensor), f"{name}: not the weights the ranks ended with")
        loaded = dict(AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=torch.float32).named_parameters())
        for name in final:
            if re.search(frozen, name):
                self.assertTrue(torch.equal(weights[name], loaded[name]), f"{name}: frozen, but not as loaded")
        trained = offline.get_fp32_state_dict_from_zero_checkpoint(checkpoint, exclude_frozen_parameters=True)
        self.assertEqual(sorted(trained), sorted(name for name in final if not re.search(frozen, name)))
        # The same through the checkpoint folder's `zero_to_fp32.py` (the fork's), run here
        script, out = os.path.join(checkpoint, "zero_to_fp32.py"), self.tmp / f"{run}-zero_to_fp32"
        for extra, names in (([], final), (["--exclude_frozen_parameters"], trained)):
            with mock.patch.object(sys, "argv", [script, checkpoint, str(out), *extra]):
                runpy.run_path(script, run_name="__main__")
            converted = read_converted(out)
            self.assertEqual(sorted(converted), sorted(names), extra)
            for name in names:
                self.assertTrue(torch.equal(converted[name], weights[name]), f"{name}: the script's differs")
            shutil.rmtree(out)
        return final, checkpoint

    @pytest.mark.topology
    @unittest.skipUnless(FULL, "make test-multinode runs it (EPFORK_MULTINODE_FULL=1)")
    def test_2_to_4_ranks_then_ep2_to_ep4_then_back_to_2_ranks(self):
        """2 ranks EP 2 -> 4 ranks EP 2 (EP x expert-data-parallel 2) -> 4 ranks EP 4 -> 2 ranks EP 2 (fewer ranks,
        smaller EP). The EP 2 -> EP 4 hop resumes with DeepSpeed's own `engine.load_checkpoint`, which reshards once
        an expert-parallel model was handed over to DeepSpeed."""
        self.run_chain([(4, 2), (4, 4, "deepspeed"), (2, 2)])

    def test_trainer_resumes_without_ep_checkpoint_with_ep2(self):
        """`Trainer.train(resume_from_checkpoint=...)` on 2 ranks with EP 2 from a checkpoint of 2 ranks without EP."""
        common = ["--checkpoint", self.checkpoint, "--entry", "trainer", "--steps", STEPS_PER_HOP, "--global-batch",
                  GLOBAL_BATCH, "--lr", LR, "--output-dir", self.tmp / "trainer"]
        launch(SCRIPT, [*common, "--ep-size", 1, "--save-steps", STEPS_PER_HOP], nproc=2, timeout=TIMEOUT).check()
        checkpoint = self.tmp / "trainer" / f"checkpoint-{STEPS_PER_HOP}"
        resumed = launch(SCRIPT, [*common, "--ep-size", 2, "--first-step", STEPS_PER_HOP, "--resume-from", checkpoint],
                         nproc=2, timeout=TIMEOUT).check().results()
        for rank, report in resumed.items():
            self.assertEqual(len(report["losses"]), STEPS_PER_HOP, f"rank {rank} did not skip the trained steps")
        self.assert_at_parity_with_one_process(resumed, 2, 2 * STEPS_PER_HOP)
