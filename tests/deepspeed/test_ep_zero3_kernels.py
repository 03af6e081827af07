"""Hub kernels (on by default since transformers 5.25) and expert parallelism under DeepSpeed ZeRO-3.

`from_pretrained` kernelizes the model right after the hand-over to DeepSpeed, and again at every `train()` / `eval()`.
The default mapping has no CPU entry and none for MoE experts: the EP model must load, train and save as with kernels
off, without any network access. A mapping that does target the experts or the sparse MoE block would replace their
forward with one written for all experts on one device, dropping the expert-parallel token dispatch: `kernelize` must
leave those layers of an EP-under-ZeRO-3 model alone and say so once. The same mapping does swap the layers of a model
without EP (one process, and plain ZeRO-3 on 2 ranks): the kernel used here is real, and doubles their output.

One launch per case (scripts/ep_kernels.py): the default load trained and saved, a load with `use_kernels=False`, a
load with the expert mapping.
"""

import json
import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from parameterized import parameterized

from tests.deepspeed.test_ep_zero3_train import train_reference
from tests.fork_utils.expert_state import assemble_experts, is_expert_param, max_abs_diff, max_diff
from tests.fork_utils.launcher import launch
from tests.fork_utils.tiny_models import make_checkpoint, reference_state_dict


SCRIPT = Path(__file__).parent / "scripts" / "ep_kernels.py"
TIMEOUT = 180
LR = 1e-2

# A local kernel repository (as `kernels` reads one: build/<variant>/<package> with its metadata.json) whose layers
# run the layer's own forward and double its output
KERNEL_LAYERS = '''import torch


class ScaledExperts(torch.nn.Module):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return 2.0 * type(self).forward(self, hidden_states, top_k_index, top_k_weights)


class ScaledBlock(torch.nn.Module):
    def forward(self, hidden_states):
        return 2.0 * type(self).forward(self, hidden_states)
'''


def write_kernel_repository(path: Path) -> Path:
    package = path / "build" / "torch-universal" / "scaledmoe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import layers\n")
    (package / "layers.py").write_text(KERNEL_LAYERS)
    metadata = {"name": "scaledmoe", "id": "scaledmoe", "version": 1, "license": "Apache-2.0",
                "backend": {"type": "universal"}, "python-depends": []}
    (package.parent / "metadata.json").write_text(json.dumps(metadata))
    return path


@pytest.mark.multiprocess
class EPZero3KernelsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-kernels-"))
        cls.kernel_repo = write_kernel_repository(cls.tmp / "scaledmoe")
        cls.checkpoints = {
            "qwen3_moe": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=31).path,
        }

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_ranks(self, checkpoint, ep_size, save_dir=None):
        args = ["--checkpoint", self.checkpoints[checkpoint], "--ep-size", ep_size, "--kernel-repo", self.kernel_repo]
        if save_dir is not None:
            args += ["--save-dir", save_dir]
        return launch(SCRIPT, args, nproc=2, timeout=TIMEOUT).check().results()

    def assert_trained_like_one_process(self, checkpoint, results, ep_size):
        nproc = len(results)
        runs = [results[r]["default"] for r in range(nproc)]
        steps = len(runs[0]["losses"])
        global_batches = [torch.cat([run["inputs"][s] for run in runs]) for s in range(steps)]
        ref_losses, ref_weights = train_reference(self.checkpoints[checkpoint], global_batches, "adamw", LR,
                                                  runs[0]["clip"])
        for step in range(steps):
            got = sum(run["losses"][step] for run in runs) / nproc
            self.assertLessEqual(abs(got - ref_losses[step]) / ref_losses[step], 1e-5, f"step {step}: loss {got}")
        final = assemble_experts({r: results[r]["default"] | {"ep_rank": results[r]["ep_rank"]} for r in results},
                                 "final", ep_size)
        diff, worst = max_diff(final, ref_weights)
        _, reordered = train_reference(self.checkpoints[checkpoint], global_batches, "adamw", LR, runs[0]["clip"],
                                       chunks=nproc)
        floor, _ = max_diff(reordered, ref_weights)
        self.assertLessEqual(diff, max(10 * floor, LR / 100), f"final weights off by {diff} at {worst}")
        return final

    def assert_no_network_access(self, results):
        for rank, report in results.items():
            self.assertEqual(report["network_attempts"], [], f"rank {rank} tried to reach the network")

    # Mixtral passes too (add ("mixtral",): about 40 s more)
    @parameterized.expand([("qwen3_moe",)])
    def test_expert_parallel_layers_left_alone(self, checkpoint):
        save_dir = self.tmp / f"saved-{checkpoint}"
        results = self.run_ranks(checkpoint, ep_size=2, save_dir=save_dir)
        self.assert_no_network_access(results)
        state = reference_state_dict(self.checkpoints[checkpoint])
        for rank, report in results.items():
            default, off, mapped, again = report["default"], report["off"], report["mapped"], report["mapped_again"]
            # The 5.25 default kernelizes (no CPU entries: every layer keeps its forward), kernels off does not
            self.assertTrue(default["use_kernels"], rank)
            self.assertFalse(off["use_kernels"], rank)
            self.assertEqual(default["kernelized"], [], rank)
            self.assertTrue(default["expert_forward_kept"], rank)
            self.assertTrue(default["kernels_after_training"]["expert_forward_kept"], rank)
            for name, tensor in default["initial"].items():
                want = state[name].chunk(2)[report["ep_rank"]] if is_expert_param(name) else state[name]
                self.assertTrue(torch.equal(tensor, want), f"rank {rank}: {name} as loaded")
                self.assertTrue(torch.equal(tensor, off["initial"][name]), f"rank {rank}: {name} kernels on / off")
            self.assertTrue(torch.equal(default["logits"], off["logits"]), f"rank {rank}: logits kernels on / off")
            # The expert mapping: nothing swapped, the expert-parallel forward kept, the same logits, also after the
            # kernelization of train() / eval(); said once
            for case in (mapped, again):
                self.assertTrue(case["use_kernels"], rank)
                self.assertEqual(case["kernelized"], [], f"rank {rank}: expert-parallel layers kernelized")
                self.assertTrue(case["expert_forward_kept"], f"rank {rank}: the expert-parallel forward was replaced")
            for logits in (mapped["logits"], again["logits"]):
                diff = max_abs_diff(logits, off["logits"])
                self.assertEqual(diff, 0.0, f"rank {rank}: the expert mapping changed the logits by {diff}")
            self.assertEqual(len(report["kernel_log_lines"]), 1, f"rank {rank}: {report['kernel_log_lines']}")
            line = report["kernel_log_lines"][0]
            for layer in ("Experts", "SparseMoeBlock", "ScaledExperts", "ScaledBlock"):
                self.assertIn(layer, line)

        final = self.assert_trained_like_one_process(checkpoint, results, ep_size=2)
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32, use_kernels=False).state_dict()
        for name, tensor in final.items():
            self.assertTrue(torch.equal(saved[name], tensor), f"{name} saved")

    def test_plain_zero3_twin(self):
        """Without EP under ZeRO-3 the default trains like one process, and the expert mapping is applied."""
        results = self.run_ranks("qwen3_moe", ep_size=1)
        self.assert_no_network_access(results)
        for rank, report in results.items():
            self.assertTrue(report["default"]["use_kernels"])
            self.assertEqual(report["default"]["kernelized"], [])
            for name, tensor in report["default"]["initial"].items():
                self.assertTrue(torch.equal(tensor, report["off"]["initial"][name]), f"rank {rank}: {name}")
            kernelized = report["mapped"]["kernelized"]
            self.assertIn("model.layers.0.mlp", kernelized)
            self.assertIn("model.layers.0.mlp.experts", kernelized)
            self.assertEqual(report["kernel_log_lines"], [])
        self.assert_trained_like_one_process("qwen3_moe", results, ep_size=1)


class ExpertKernelNegativeControlTest(unittest.TestCase):
    """One process, no EP: the expert mapping swaps the experts and the MoE block, and changes the result."""

    def test_mapping_swaps_layers_without_expert_parallelism(self):
        from kernels import LocalLayerRepository, register_kernel_mapping, replace_kernel_forward_from_hub

        from transformers import AutoModelForCausalLM
        from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = make_checkpoint("qwen3_moe", Path(tmp) / "ckpt", seed=33).path
            repo = write_kernel_repository(Path(tmp) / "scaledmoe")
            probe = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))
            off = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, use_kernels=False)
            with torch.no_grad():
                want = off(input_ids=probe).logits
            classes = (qwen3_moe.Qwen3MoeExperts, qwen3_moe.Qwen3MoeSparseMoeBlock)
            try:
                replace_kernel_forward_from_hub(classes[0], "ScaledExperts")
                replace_kernel_forward_from_hub(classes[1], "ScaledBlock")
                register_kernel_mapping({
                    "ScaledExperts": {"cpu": LocalLayerRepository(repo_path=repo, layer_name="ScaledExperts")},
                    "ScaledBlock": {"cpu": LocalLayerRepository(repo_path=repo, layer_name="ScaledBlock")},
                })
                mapped = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
                kernelized = [name for name, module in mapped.named_modules() if "_kernel_repo" in module.__dict__]
                with torch.no_grad():
                    got = mapped(input_ids=probe).logits
            finally:
                for cls in classes:
                    for attribute in ("kernel_layer_name", "kernel_condition"):
                        if attribute in cls.__dict__:
                            delattr(cls, attribute)
        self.assertIn("model.layers.0.mlp", kernelized)
        self.assertIn("model.layers.0.mlp.experts", kernelized)
        self.assertGreater(max_abs_diff(got, want), 1e-3, "the kernel did not change the result")
