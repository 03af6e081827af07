"""Loading a Mixture-of-Experts model with expert parallelism under DeepSpeed ZeRO-3, through real launchers.

Every rank must finish loading within the timeout and hold exactly its experts, bit-identical to the checkpoint's
slice and to an EP-only load; dense weights must equal the checkpoint; dense models keep the ZeRO-3 (`zero.Init`)
path. The pristine release fails the same launch (refusal or hang): that test keeps the bug from coming back.
"""

import shutil
import sys
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from parameterized import parameterized

from tests.fork_utils.expert_state import expected_local, is_expert_param, max_abs_diff
from tests.fork_utils.launcher import CONFIG_DIR, REPO_ROOT, launch
from tests.fork_utils.tiny_models import make_checkpoint, num_experts, reference_state_dict


SCRIPT = Path(__file__).parent / "scripts" / "ep_load.py"
ACCELERATE_ZERO3 = CONFIG_DIR / "accelerate_deepspeed_zero3.yaml"
LAUNCH_TIMEOUT = 120  # seconds; a healthy 2-rank load takes ~15 s here, most of it imports


@pytest.mark.multiprocess
class EPZero3LoadTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-load-"))
        cls.checkpoints = {
            "qwen3_moe": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=11).path,
            "mixtral": make_checkpoint("mixtral", cls.tmp / "mixtral", seed=12).path,
            # save_pretrained writes the per-expert layout (the conversion mapping fuses it at load); this one is
            # already in the model's fused layout, so it loads without conversion.
            "qwen3_moe_fused": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe_fused", seed=13, fused_layout=True).path,
            "qwen3_moe_8": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe_8", seed=14, num_experts=8).path,
            "llama": make_checkpoint("llama", cls.tmp / "llama", seed=15).path,
            "qwen3_moe_3": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe_3", seed=16, num_experts=3).path,
        }

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def launch_load(self, checkpoint, *extra, nproc=2, launcher="accelerate", env=None):
        args = ["--checkpoint", self.checkpoints[checkpoint], *extra]
        if launcher == "accelerate":
            args = ["--mode", "accelerate", *args]
            return launch(SCRIPT, args, nproc=nproc, launcher="accelerate", accelerate_config=ACCELERATE_ZERO3,
                          timeout=LAUNCH_TIMEOUT, env=env)
        return launch(SCRIPT, args, nproc=nproc, launcher="torchrun", timeout=LAUNCH_TIMEOUT, env=env)

    def assert_rank_holds_its_shard(self, report, reference, ep_size):
        rank = report["rank"]
        self.assertTrue(report["zero3"], "the DeepSpeed ZeRO-3 config was not registered: the test proves nothing")
        self.assertTrue(report["has_ep"])
        self.assertEqual(report["ep_size"], ep_size)
        self.assertEqual(report["meta"], [])
        self.assertEqual(set(report["params"]), set(reference))
        experts = 0
        for name, entry in report["params"].items():
            want = expected_local(name, reference[name], rank, ep_size)
            self.assertFalse(entry["ds_id"], f"rank {rank}: {name} went through zero.Init")
            self.assertEqual(entry["local"].shape, want.shape, f"rank {rank}: {name}")
            self.assertTrue(torch.equal(entry["local"], want), f"rank {rank}: {name} differs by "
                            f"{max_abs_diff(entry['local'], want)}")
            experts += is_expert_param(name)
        self.assertGreater(experts, 0)

    def assert_forward_matches_single_process(self, results, checkpoint):
        from transformers import AutoModelForCausalLM

        reference_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        batches = [r["forward"]["input_ids"] for r in results.values()]
        self.assertFalse(torch.equal(batches[0], batches[1]), "each rank must feed a batch of its own")
        for rank, report in results.items():
            with torch.no_grad():
                expected = reference_model(report["forward"]["input_ids"]).logits
            diff = max_abs_diff(report["forward"]["logits"], expected)
            self.assertLess(diff, 1e-5, f"rank {rank}: logits differ from the single-process model by {diff}")

    def test_pristine_release_refuses_or_hangs(self):
        """The bug: the unpatched release cannot load this (it refuses the device map, or hangs). It only accepts the
        explicit `fsdp_size` form, so that is the one it is given."""
        sys.path.insert(0, str(REPO_ROOT / "utils"))
        import patchq

        pristine_src = patchq.fetch(REPO_ROOT) / "src"
        result = launch(
            SCRIPT, ["--mode", "accelerate", "--checkpoint", self.checkpoints["qwen3_moe"], "--ep-size", "2",
             "--fsdp-size", "2"],
            nproc=2, launcher="accelerate", accelerate_config=ACCELERATE_ZERO3, timeout=60,
            env={"PYTHONPATH": f"{pristine_src}:{REPO_ROOT}"},
        )
        self.assertFalse(result.ok, "the pristine release loaded EP under ZeRO-3: is the pristine tree in use?")
        self.assertIn(f"{pristine_src}/transformers", result.output + "".join(r.log for r in result.ranks.values()))
        refused = "DeepSpeed Zero-3 is not compatible with passing a `device_map`" in result.report()
        self.assertTrue(refused or result.timed_out, result.report())

    @parameterized.expand([("qwen3_moe",), ("mixtral",), ("qwen3_moe_fused",)])
    def test_each_rank_loads_its_experts_under_accelerate_zero3(self, checkpoint):
        config_dir = self.tmp / f"saved-config-{checkpoint}"
        result = self.launch_load(checkpoint, "--ep-size", "2", "--forward", "--save-config", config_dir).check()
        results = result.results()
        reference = reference_state_dict(self.checkpoints[checkpoint])
        self.assertEqual(sorted(results), [0, 1])
        for report in results.values():
            self.assert_rank_holds_its_shard(report, reference, ep_size=2)
            self.assertEqual(report["local_num_experts"], [num_experts_of(self.checkpoints[checkpoint]) // 2])
        self.assert_forward_matches_single_process(results, self.checkpoints[checkpoint])
        # A config saved from an EP model says nothing of how it was loaded.
        self.assertNotIn("distributed_config", results[0]["saved_config"])

    def test_ep_zero3_load_equals_ep_only_load(self):
        under_zero3 = self.launch_load("qwen3_moe", "--ep-size", "2").check().results()
        # Without DeepSpeed, EP over data-parallel ranks is spelled with the explicit FSDP size (FSDP2 is applied).
        ep_only = self.launch_load("qwen3_moe", "--mode", "plain", "--ep-size", "2", "--fsdp-size", "2",
                                   launcher="torchrun")
        ep_only = ep_only.check().results()
        for rank in (0, 1):
            self.assertFalse(ep_only[rank]["zero3"])
            for name, entry in ep_only[rank]["params"].items():
                if is_expert_param(name):
                    self.assertTrue(torch.equal(under_zero3[rank]["params"][name]["local"], entry["local"]), name)

    def test_explicit_data_parallel_size_is_deepspeeds(self):
        """`fsdp_size=2, ep_size=2`, the form EP-only users write: under DeepSpeed, no FSDP2 may be applied."""
        results = self.launch_load("qwen3_moe", "--ep-size", "2", "--fsdp-size", "2").check().results()
        reference = reference_state_dict(self.checkpoints["qwen3_moe"])
        for report in results.values():
            self.assert_rank_holds_its_shard(report, reference, ep_size=2)
            self.assertFalse(report["fsdp_managed"])

    def test_model_loaded_before_the_deepspeed_config_keeps_its_decision(self):
        """`DistributedConfig(ep_size=2, fsdp_size=2)` loaded before `TrainingArguments(deepspeed=...)` exists: FSDP2
        shards the model and nothing is handed over to DeepSpeed. Later gates ask the model, not the ZeRO-3 config
        registered since: `save_pretrained` takes upstream's distributed save (a complete checkpoint), and a Trainer
        with DeepSpeed, `Accelerator.prepare` (model alone, or with its optimizer) and `deepspeed.initialize` refuse
        the model on every rank, saying what to do, instead of failing in torch ("Couldn't swap
        FSDPEmbedding.weight"). A dense module still gets its engine."""
        saved = self.tmp / "saved-before-deepspeed"
        results = self.launch_load("qwen3_moe", "--mode", "plain", "--ep-size", "2", "--fsdp-size", "2",
                                   "--deepspeed-after-load", saved, launcher="torchrun").check().results()
        for rank, report in results.items():
            self.assertFalse(report["zero3"])
            self.assertTrue(report["has_ep"])
            self.assertTrue(report["fsdp_managed"])
            after = report["after_load"]
            self.assertTrue(after["zero3_after_load"], "TrainingArguments registered no ZeRO-3: the test proves nothing")
            self.assertFalse(after["ep_under_zero3_after_load"], f"rank {rank}")
            self.assertFalse(after["handed_over"], f"rank {rank}")
            self.assertIsNone(after["save_error"], f"rank {rank}")
            self.assertIn("while no DeepSpeed ZeRO-3 config was registered", after["trainer_error"] or "",
                          f"rank {rank}: {after['trainer_error']}")
            self.assertIn("before `from_pretrained`", after["trainer_error"])
            for way in ("prepare_model", "prepare_model_optimizer", "initialize"):
                error = after[f"{way}_error"] or ""
                for part in ("ValueError: This model was loaded with expert parallelism", "create the `Accelerator`",
                             "before `from_pretrained`"):
                    self.assertIn(part, error, f"rank {rank}: {way}")
            self.assertIsNone(after["dense_initialize_error"], f"rank {rank}")
            self.assertTrue(after["dense_partitioned"], f"rank {rank}: no ZeRO-3 engine was built on the dense module")

        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).state_dict()
        reference = reference_state_dict(self.checkpoints["qwen3_moe"])
        self.assertEqual(set(reloaded), set(reference))
        for name, tensor in reference.items():
            self.assertTrue(torch.equal(reloaded[name], tensor), f"{name} differs by {max_abs_diff(reloaded[name], tensor)}")

    def test_deprecated_enable_expert_parallel_shards_over_all_ranks(self):
        results = self.launch_load("qwen3_moe", "--enable-expert-parallel").check().results()
        reference = reference_state_dict(self.checkpoints["qwen3_moe"])
        for report in results.values():
            self.assert_rank_holds_its_shard(report, reference, ep_size=2)

    def test_in_process_deepspeed_config_under_torchrun(self):
        results = self.launch_load("mixtral", "--mode", "hf_deepspeed_config", "--ep-size", "2", launcher="torchrun")
        reference = reference_state_dict(self.checkpoints["mixtral"])
        for report in results.check().results().values():
            self.assert_rank_holds_its_shard(report, reference, ep_size=2)

    @pytest.mark.slow
    def test_ep_times_expert_data_parallel_on_4_ranks(self):
        """ep_size 2 on 4 ranks: ranks {0, 2} and {1, 3} hold the same experts (expert-data-parallel groups)."""
        results = self.launch_load("qwen3_moe_8", "--ep-size", "2", "--forward", nproc=4).check().results()
        reference = reference_state_dict(self.checkpoints["qwen3_moe_8"])
        self.assertEqual(sorted(results), [0, 1, 2, 3])
        for report in results.values():
            self.assert_rank_holds_its_shard(report, reference, ep_size=2)
            self.assertEqual(report["local_num_experts"], [4])
        self.assert_forward_matches_single_process(results, self.checkpoints["qwen3_moe_8"])

    @parameterized.expand([
        ("experts_not_divisible", "qwen3_moe_3", "Cannot evenly shard 3 experts"),
        ("model_without_ep_plan", "llama", "has no `ep_plan`"),
    ])
    def test_impossible_expert_parallelism_raises_on_every_rank(self, _name, checkpoint, message):
        """Every rank either holds its correct shard or raises: never a silently wrong or unsharded model."""
        result = self.launch_load(checkpoint, "--ep-size", "2")
        self.assertFalse(result.ok)
        self.assertFalse(result.timed_out, "a rank hung instead of raising")
        self.assertLess(result.elapsed, 60)
        for rank in (0, 1):
            self.assertIsNotNone(result.ranks[rank].error, f"rank {rank} did not raise:\n{result.report()}")
            self.assertIn(message, result.ranks[rank].error.splitlines()[-1])

    def test_dense_model_keeps_the_zero3_path(self):
        results = self.launch_load("llama", "--no-distributed-config").check().results()
        reference = reference_state_dict(self.checkpoints["llama"])
        for rank, report in results.items():
            self.assertTrue(report["zero3"])
            self.assertFalse(report["has_ep"])
            for name, entry in report["params"].items():
                self.assertTrue(entry["ds_id"], f"rank {rank}: {name} was not created under zero.Init")
                partition = -(-entry["ds_numel"] // report["world_size"])
                self.assertEqual(entry["ds_local_numel"], partition, f"rank {rank}: {name} is not a partition")
                self.assertTrue(torch.equal(entry["gathered"], reference[name]), f"rank {rank}: {name}")


def num_experts_of(checkpoint) -> int:
    from transformers import AutoConfig

    return num_experts(AutoConfig.from_pretrained(checkpoint))
