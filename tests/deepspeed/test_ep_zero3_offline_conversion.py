"""`python <checkpoint>/zero_to_fp32.py <checkpoint> <out>` gives the trained weights of an expert-parallel MoE,
whatever wrote the DeepSpeed ZeRO-3 checkpoint (issue 23's test matrix).

Each case trains 3 AdamW steps through a real launcher (torchrun, `accelerate launch`; CPU, gloo) with the rank script
of the topology tests (scripts/ep_reshard.py: every step has the same global batch whatever the number of ranks) and
saves a DeepSpeed checkpoint with
- `accelerator.save_state(dir)` under `accelerate launch` (and `engine.save_checkpoint(dir)` in the same launch),
- `engine.save_checkpoint(dir)` under torchrun,
- the Trainer with `stage3_gather_16bit_weights_on_model_save: false` (its `checkpoint-N`),
then runs the `zero_to_fp32.py` DeepSpeed copied into the folder, as users do, in a process without GPUs. The folder's
script is the fork's, and its `pytorch_model.bin` holds every parameter in fp32, equal bit for bit to the fp32 weights
the ranks ended with (under bf16: the optimizer's fp32 master weights, `safe_get_full_fp32_param`), the frozen ones to
the loaded checkpoint's (in the dtype they trained in); and it is at parity with one process trained on the same
global batches: in fp32 within 10x the noise floor (the reference summed in the ranks' parts), in bf16 within twice
the distance of a one-process bf16 run (bf16 weights, fp32 master, the same steps) from the fp32 reference.
Negative control: with the expert-parallel part switched off, the fork's script stops as DeepSpeed's does.

The same run without EP (`--ep-size 1`, plain ZeRO-3, the twin) keeps DeepSpeed's script in its folder, and the fork's
script writes DeepSpeed's files, byte for byte, also at parity with one process.

Covering set, not the cross product: every entry point, Qwen3-MoE and Mixtral, 2 ranks EP 2 and 4 ranks EP 2 x
expert-data-parallel 2, fp32 and bf16, frozen parameters (embeddings, some experts) and none, accelerate's generated
yaml (`accelerate config`'s) and docs/configs', a twin for each entry point. `make test` runs FAST_CASES (about 3 min
here), `make test-multinode` (EPFORK_MULTINODE_FULL=1) also FULL_CASES.
"""

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

from tests.deepspeed import test_ep_zero3_reshard as reshard
from tests.fork_utils.accelerate_config import generated_accelerate_yaml
from tests.fork_utils.expert_state import assemble_experts, max_diff
from tests.fork_utils.launcher import CONFIG_DIR, launch, run_commands
from tests.fork_utils.tiny_models import make_checkpoint


STEPS = reshard.STEPS_PER_HOP
TIMEOUT = {2: 180, 4: 300}  # seconds per launch; 25-35 s (2 ranks) and 45-60 s (4 ranks) here
CONVERT_TIMEOUT = 240
FULL = reshard.FULL
# Relative to the distance of a one-process bf16 run from the fp32 reference (0.26 here): a lost or misplaced expert is
# off by more than its whole update (above 1)
BF16_FACTOR = 2.0

# name, entry, family, ranks, precision, frozen parameters (regular expression), accelerate's generated yaml, twin
FAST_CASES = [
    ("accelerate_save_state_qwen3_moe_2_ranks_fp32_generated_yaml", "accelerate", "qwen3_moe", 2, "fp32", None, True,
     True),
    ("trainer_mixtral_2_ranks_bf16_frozen_embeddings_and_down_proj", "trainer", "mixtral", 2, "bf16",
     r"embed_tokens|experts\.down_proj", False, True),
    # EP 2 x expert-data-parallel 2: experts partitioned over 2 ranks each, the frozen ones too
    ("save_checkpoint_qwen3_moe_4_ranks_bf16_frozen_layer0_experts", "deepspeed", "qwen3_moe", 4, "bf16",
     r"layers\.0\.mlp\.experts", False, False),
]
FULL_CASES = [
    ("accelerate_save_state_mixtral_4_ranks_fp32_frozen_embeddings", "accelerate", "mixtral", 4, "fp32",
     r"embed_tokens", False, True),
    ("trainer_qwen3_moe_4_ranks_fp32", "trainer", "qwen3_moe", 4, "fp32", None, False, False),
]


class HFWeightsWritten(AssertionError):
    """A checkpoint folder holds HF weights that its save was configured not to write."""


def hf_weights_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(("model", "pytorch_model")))


def train_one_process(checkpoint, steps: int, chunks: int = 1, frozen: str | None = None, bf16: bool = False):
    """One process on each step's global batch (`chunks` parts: the ranks' summation order), AdamW over the parameters
    `frozen` does not match, gradients clipped as DeepSpeed clips them. `bf16`: as DeepSpeed's bf16 trains, bf16
    weights and gradients, fp32 master weights that AdamW updates. Returns the final (master) weights, fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.train()
    params = {name: p for name, p in model.named_parameters() if frozen is None or not re.search(frozen, name)}
    for name, param in model.named_parameters():
        param.requires_grad_(name in params)
    master = {name: p.detach().float().clone().requires_grad_(True) for name, p in params.items()} if bf16 else params
    optimizer = torch.optim.AdamW(master.values(), lr=reshard.LR, weight_decay=0.0)
    for step in range(steps):
        batch = reshard.global_batch(step, model.config.vocab_size)
        loss = sum(model(input_ids=part, labels=part).loss for part in batch.chunk(chunks)) / chunks
        loss.backward()
        if bf16:
            for name, param in params.items():
                master[name].grad, param.grad = param.grad.float(), None
        torch.nn.utils.clip_grad_norm_(master.values(), reshard.CLIP)
        optimizer.step()
        optimizer.zero_grad()
        if bf16:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(master[name])
    return {name: p.detach().float().clone() for name, p in model.named_parameters()} | {
        name: p.detach().clone() for name, p in master.items()
    }


def update_error(got: dict, want: dict, initial: dict) -> tuple[float, str]:
    """The largest `|got - want| / |want - initial|` (Frobenius norms) over the parameters `want` moved: how far off
    `got` lands, relative to the training update."""
    errors = {
        name: ((got[name] - want[name]).norm() / (want[name] - initial[name]).norm()).item()
        for name in want if not torch.equal(want[name], initial[name])
    }
    worst = max(errors, key=errors.get)
    return errors[worst], worst


@pytest.mark.multiprocess
class EPZero3OfflineConversionTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-offline-conversion-"))
        cls.checkpoints, cls.initials, cls.references, cls.runs = {}, {}, {}, {}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def checkpoint(self, family):
        if family not in self.checkpoints:
            self.checkpoints[family] = make_checkpoint(family, self.tmp / family, seed=31).path
        return self.checkpoints[family]

    def reference(self, family, chunks=1, frozen=None, bf16=False):
        key = (family, chunks, frozen, bf16)
        if key not in self.references:
            self.references[key] = train_one_process(self.checkpoint(family), STEPS, chunks, frozen, bf16)
        return self.references[key]

    def initial(self, family):
        from transformers import AutoModelForCausalLM

        if family not in self.initials:
            model = AutoModelForCausalLM.from_pretrained(self.checkpoint(family), dtype=torch.float32)
            self.initials[family] = {name: p.detach().clone() for name, p in model.named_parameters()}
        return self.initials[family]

    def train(self, name, entry, family, nproc, precision, frozen, generated_yaml, ep_size):
        """One launch of the rank script (cached: the tests of a case share it). Returns the ranks' reports and the
        checkpoint folders it wrote, by the call that wrote them."""
        key = (name, ep_size)
        if key in self.runs:
            return self.runs[key]
        out = self.tmp / f"{name}-ep{ep_size}"
        args = ["--checkpoint", self.checkpoint(family), "--ep-size", ep_size, "--steps", STEPS, "--global-batch",
                reshard.GLOBAL_BATCH, "--lr", reshard.LR]
        args += ["--freeze", frozen] if frozen else []
        args += ["--bf16"] if precision == "bf16" else []
        options = {}
        if entry == "accelerate":
            folders = {"save_state": out / "save_state", "save_checkpoint": out / "save_checkpoint"}
            args += ["--save-state", folders["save_state"], "--save-checkpoint", folders["save_checkpoint"]]
            if generated_yaml:
                args += ["--launch-config"]
                config = generated_accelerate_yaml(self.tmp / f"{name}.yaml", param="none", optimizer="none")
            else:
                config = CONFIG_DIR / "accelerate_deepspeed_zero3.yaml"
            options = {"launcher": "accelerate", "accelerate_config": config}
        elif entry == "deepspeed":
            folders = {"save_checkpoint": out / "save_checkpoint"}
            args += ["--save-checkpoint", folders["save_checkpoint"]]
        else:
            folders = {"trainer": out / "trainer" / f"checkpoint-{STEPS}"}
            args += ["--entry", "trainer", "--zero3-save-16bit", "false", "--save-steps", STEPS, "--output-dir",
                     out / "trainer"]
        results = launch(reshard.SCRIPT, args, nproc=nproc, timeout=TIMEOUT[nproc], **options).check().results()
        self.runs[key] = results, folders
        return self.runs[key]

    @parameterized.expand(FAST_CASES)
    def test_zero_to_fp32_py_gives_the_trained_weights(self, *case):
        self.assert_conversion(*case)

    @parameterized.expand(FULL_CASES)
    @pytest.mark.topology
    @unittest.skipUnless(FULL, "make test-multinode runs it (EPFORK_MULTINODE_FULL=1)")
    def test_zero_to_fp32_py_gives_the_trained_weights_full(self, *case):
        self.assert_conversion(*case)

    def assert_conversion(self, name, entry, family, nproc, precision, frozen, generated_yaml, twin):
        import deepspeed

        from transformers.integrations import deepspeed_expert_parallel_checkpoint as offline

        runs = {2: self.train(name, entry, family, nproc, precision, frozen, generated_yaml, ep_size=2)}
        if twin:
            runs[1] = self.train(name, entry, family, nproc, precision, frozen, generated_yaml, ep_size=1)
        deepspeed_script = (Path(deepspeed.__file__).parent / "utils" / "zero_to_fp32.py").read_bytes()
        ours = next(iter(runs[2][1].values())) / "zero_to_fp32.py"

        # Every folder's own script, as users run it; on the twin's folders the fork's script beside it
        commands, outputs, converted = [], {}, self.tmp / f"{name}-converted"
        for ep_size, (_, folders) in runs.items():
            for saved_with, folder in folders.items():
                script = folder / "zero_to_fp32.py"
                expected = Path(offline.RECOVERY_SCRIPT).read_bytes() if ep_size > 1 else deepspeed_script
                self.assertEqual(script.read_bytes(), expected, f"{saved_with}, EP {ep_size}: not the script expected")
                if entry == "trainer":
                    self.assertTrue((folder / "latest").is_file(), f"{folder}: no DeepSpeed checkpoint")
                    if ep_size == 1:  # with EP: test_trainer_without_16bit_gather_writes_no_hf_weights
                        self.assertEqual(hf_weights_in(folder), [], f"{folder}: HF weights without the 16-bit gather")
                scripts = {"own": script, **({"fork's": ours} if ep_size == 1 else {})}
                for which, path in scripts.items():
                    outputs[ep_size, saved_with, which] = converted / f"ep{ep_size}-{saved_with}-{which}"
                    commands.append([sys.executable, path, folder, outputs[ep_size, saved_with, which]])
        for result in run_commands(commands, timeout=CONVERT_TIMEOUT):
            self.assertEqual(result.returncode, 0, f"{result.command}\n{result.output[-3000:]}")

        for ep_size, (results, folders) in runs.items():
            final = reshard.whole_state(results, "final", ep_size)["param"]
            if precision == "bf16":  # what the ranks ended with in fp32: the optimizer's master weights
                reports = {r: {"ep_rank": report["ep_rank"], "final": report["final"]["master"]}
                           for r, report in results.items()}
                final = assemble_experts(reports, "final", ep_size)
            for saved_with in folders:
                where = f"{saved_with}, EP {ep_size}"
                weights = reshard.read_converted(outputs[ep_size, saved_with, "own"])
                self.assertEqual(os.listdir(outputs[ep_size, saved_with, "own"]), ["pytorch_model.bin"], where)
                self.assertEqual(sorted(weights), sorted(final), where)
                for param, tensor in final.items():
                    self.assertEqual(weights[param].dtype, torch.float32, f"{where}: {param}")
                    self.assertTrue(torch.equal(weights[param], tensor), f"{where}: {param} is not the ranks' weights")
                self.assert_frozen_as_loaded(weights, family, frozen, precision, where)
                self.assert_at_parity_with_one_process(weights, family, nproc, precision, frozen, where)
                if ep_size == 1:
                    self.assert_same_files(outputs[1, saved_with, "own"], outputs[1, saved_with, "fork's"], where)

        # Negative control: with its expert-parallel part switched off, the fork's script stops as DeepSpeed's does
        folder = next(iter(runs[2][1].values()))
        with mock.patch.object(offline, "is_expert_parallel_checkpoint", return_value=False), \
                mock.patch.object(sys, "argv", [str(ours), str(folder), str(self.tmp / f"{name}-switched-off")]):
            with self.assertRaisesRegex(ValueError, "consumed .* numels out of"):
                runpy.run_path(str(ours), run_name="__main__")

    def assert_frozen_as_loaded(self, weights, family, frozen, precision, where):
        """Frozen parameters hold the loaded checkpoint's values, in the dtype they trained in."""
        if frozen is None:
            return
        names = [name for name in weights if re.search(frozen, name)]
        self.assertTrue(names, frozen)
        for name in names:
            loaded = self.initial(family)[name]
            if precision == "bf16":
                loaded = loaded.bfloat16().float()
            self.assertTrue(torch.equal(weights[name], loaded), f"{where}: {name} frozen, but not as loaded")

    def assert_at_parity_with_one_process(self, weights, family, nproc, precision, frozen, where):
        reference = self.reference(family, frozen=frozen)
        if precision == "fp32":
            # The noise floor: the reference summed in the ranks' parts (1e-6 to 1e-5 here)
            floor, _ = max_diff(self.reference(family, chunks=nproc, frozen=frozen), reference)
            scale = max(t.abs().max().item() for t in reference.values())
            bound = max(10 * floor, 1e-4 * scale)
            diff, worst = max_diff(weights, reference)
        else:
            # bf16 rounding flips Adam's steps on tiny gradients: an elementwise bound would be the whole update. The
            # floor is a one-process bf16 run's distance from the fp32 reference, relative to the update.
            initial = self.initial(family)
            one_process_bf16 = self.reference(family, chunks=nproc, frozen=frozen, bf16=True)
            floor, _ = update_error(one_process_bf16, reference, initial)
            bound = BF16_FACTOR * floor
            diff, worst = update_error(weights, reference, initial)
        print(f"{where}: {precision} off the one-process reference by {diff:.3g} at {worst}; bound {bound:.3g}")
        self.assertLessEqual(diff, bound, f"{where}: off the one-process reference by {diff} at {worst}")

    def assert_same_files(self, deepspeeds, forks, where):
        """The fork's script on a checkpoint without EP writes DeepSpeed's script's files, byte for byte."""
        self.assertEqual(sorted(os.listdir(forks)), sorted(os.listdir(deepspeeds)), where)
        for file in os.listdir(deepspeeds):
            self.assertEqual((forks / file).read_bytes(), (deepspeeds / file).read_bytes(), f"{where}: {file}")

    def test_trainer_without_16bit_gather_writes_no_hf_weights(self):
        """With `stage3_gather_16bit_weights_on_model_save: false` the Trainer writes no HF weights into its
        `checkpoint-N`, only the ZeRO checkpoint (and `config.json`), as without EP (docs/ep_deepspeed.md: use the
        folder's `zero_to_fp32.py`, or the HF export). Patch 0021: the fork's gathering save of EP models once took
        no notice of that setting and wrote `model.safetensors`. The launches are the Trainer case's."""
        _, folders = self.train(*FAST_CASES[1][:7], ep_size=2)
        if written := hf_weights_in(folders["trainer"]):
            raise HFWeightsWritten(f"the Trainer wrote {written} into {folders['trainer']}")
        self.assertTrue((folders["trainer"] / "config.json").is_file())
